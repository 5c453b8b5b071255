//! One task of the CPU attention (`attention_cpu`) with AVX-512 or AVX2 micro-kernels (one
//! generic kernel, compiled for each). The lanes of a vector are query rows: a task's rows are
//! `VECS` vectors (64 rows on AVX-512, 16 on AVX2), the scores of one key are `VECS` vectors,
//! and the online softmax's running max and sum are per lane (no horizontal reduction anywhere).
//! Neither K nor V is packed: their elements are broadcast from where they lie. Only the task's
//! queries are transposed, once, with the scale folded in.
//!
//! ```text
//! Qᵀ [d, rows]      Qᵀ[c, r] = Q[r, c] · scale  (zero past the last query)
//! Sᵀ [keys, rows]   Sᵀ[j] = Σ_c K[j, c] · Qᵀ[c] + bias[j]                6 keys × VECS vectors a tile
//! P = exp(Sᵀ − m')      m' = max(m, max_j Sᵀ[j]) per lane, sum' = sum · exp(m − m') + Σ_j P[j]
//! Oᵀ [d, rows]      Oᵀ[c] = Oᵀ[c] · exp(m − m') + Σ_j V[j, c] · P[j]      6 dims × VECS vectors a tile
//! ```
//!
//! A micro-tile keeps 6 × `VECS` accumulators, `VECS` operands and a broadcast in the vector
//! registers (29 of AVX-512's 32, 15 of AVX2's 16). The generic path (a GEMM per block) packs
//! both operands of both products for every 64 queries; this one reads each key and value once
//! per task from where it is.

use std::arch::x86_64::{
    __m256, __m512, _mm256_add_epi32, _mm256_add_ps, _mm256_and_ps, _mm256_castsi256_ps, _mm256_cmp_ps,
    _mm256_cmpgt_epi32, _mm256_cvtps_epi32, _mm256_div_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_loadu_ps,
    _mm256_mask_i32gather_ps, _mm256_maskstore_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_mullo_epi32,
    _mm256_round_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_slli_epi32,
    _mm256_storeu_ps, _mm256_sub_ps, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_fmadd_ps, _mm512_fnmadd_ps,
    _mm512_loadu_ps, _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_maskz_div_ps, _mm512_max_ps,
    _mm512_min_ps, _mm512_mul_ps, _mm512_mullo_epi32, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_epi32,
    _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps, _mm512_storeu_ps, _mm512_sub_ps, _CMP_GT_OQ,
    _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
};

/// Query rows per task on AVX-512 (4 vectors of 16 lanes).
pub(crate) const ROWS_AVX512: usize = 64;
/// Query rows per task on AVX2 (2 vectors of 8 lanes).
pub(crate) const ROWS_AVX2: usize = 16;
/// Keys per block of the online softmax: the block's probabilities (`KEY_BLOCK × rows` f32,
/// 16 KiB on AVX-512) stay in the L1 cache while every output tile reads them.
const KEY_BLOCK: usize = 64;
/// Keys per score tile and head dims per output tile.
const TILE: usize = 6;
/// The largest head size this kernel takes: Qᵀ and Oᵀ (`d × rows` f32 each) stay in the L2
/// cache. Larger heads (the VAE's single 512-wide head) take the generic path, whose GEMMs do
/// well there.
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// One task: `rows` queries of one (batch row, head) against its first `keys` keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task<'a> {
    /// The first query row; rows `q_stride` apart, `head_dim` contiguous elements each.
    pub q: *const f32,
    /// Distance between query rows (elements).
    pub q_stride: usize,
    /// Query rows (at most the kernel's rows per task).
    pub rows: usize,
    /// The first key row, rows `k_stride` apart.
    pub k: *const f32,
    /// Distance between key rows.
    pub k_stride: usize,
    /// The first value row, rows `v_stride` apart.
    pub v: *const f32,
    /// Distance between value rows.
    pub v_stride: usize,
    /// Keys attended to (the first `keys` rows of K and V).
    pub keys: usize,
    /// Additive bias per key (at least `keys` long), or empty.
    pub bias: &'a [f32],
    /// Elements per query, key, value and output row.
    pub head_dim: usize,
    /// The scores' scale.
    pub scale: f32,
    /// The first output row, rows `out_stride` apart.
    pub out: *mut f32,
    /// Distance between output rows.
    pub out_stride: usize,
}

/// Each thread's buffers: Qᵀ, the block's scores/probabilities and Oᵀ.
#[derive(Default)]
pub(crate) struct Scratch {
    queries_t: Vec<f32>,
    probs: Vec<f32>,
    acc: Vec<f32>,
}

/// Runs `task` with AVX-512 F, writing its `rows × head_dim` outputs.
///
/// # Safety
/// The CPU has AVX-512 F; the task's pointers address `rows` query rows, `keys` key and value
/// rows and `rows` output rows of `head_dim` elements at their strides, inside their
/// allocations; no one else writes those output rows during the call; `head_dim` ≤
/// [`MAX_HEAD_DIM`] and `rows` ≤ [`ROWS_AVX512`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn run_avx512(task: &Task, s: &mut Scratch) {
    // SAFETY: as the caller promises.
    unsafe { run::<__m512, 4>(task, s) }
}

/// Runs `task` with AVX2 and FMA, as [`run_avx512`] (`rows` ≤ [`ROWS_AVX2`]).
///
/// # Safety
/// As [`run_avx512`]'s, with AVX2 and FMA instead of AVX-512 F.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn run_avx2(task: &Task, s: &mut Scratch) {
    // SAFETY: as the caller promises.
    unsafe { run::<__m256, 2>(task, s) }
}

/// One vector of f32 lanes. Every method needs the vector's instruction set (hence `unsafe`)
/// and is inlined into the `#[target_feature]` entry point that enables it.
trait Lanes: Copy {
    /// f32 lanes per vector.
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Stores the first `count` lanes (`count ≤ N`).
    unsafe fn store_first(self, p: *mut f32, count: usize);
    /// Lane `i < count` from `base + i·stride`, the others zero (`count ≤ N`).
    unsafe fn gather(base: *const f32, stride: usize, count: usize) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self · b + c`.
    unsafe fn fmadd(self, b: Self, c: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    /// `1 / self` where positive, else 0.
    unsafe fn recip_or_zero(self) -> Self;
    /// `exp` as [`crate::fast_math::exp`] (same reduction and polynomial, within 2 ulp,
    /// clamped to [−87.3, 88.3]).
    unsafe fn exp(self) -> Self;
}

/// The polynomial of [`crate::fast_math::exp`] on `r`: `e^r` for |r| ≤ ln2 / 2.
#[inline(always)]
unsafe fn exp_poly<V: Lanes>(r: V) -> V {
    // SAFETY: the caller enables `V`'s instruction set.
    unsafe {
        let mut p = V::splat(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = p.fmadd(r, V::splat(c));
        }
        p.mul(r).fmadd(r, r.add(V::splat(1.0)))
    }
}

impl Lanes for __m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, count: usize) {
        unsafe { _mm512_mask_storeu_ps(p, ((1u32 << count) - 1) as u16, self) }
    }
    #[inline(always)]
    unsafe fn gather(base: *const f32, stride: usize, count: usize) -> Self {
        unsafe {
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride as i32));
            let mask = ((1u32 << count) - 1) as u16;
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, base.cast())
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { _mm512_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { _mm512_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { _mm512_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        unsafe { _mm512_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { _mm512_max_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn recip_or_zero(self) -> Self {
        unsafe {
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self, _mm512_setzero_ps());
            _mm512_maskz_div_ps(positive, _mm512_set1_ps(1.0), self)
        }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe {
            let x = _mm512_min_ps(_mm512_max_ps(self, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
            let scaled = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            _mm512_scalef_ps(exp_poly(r), n)
        }
    }
}

impl Lanes for __m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, count: usize) {
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lanes), self)
        }
    }
    #[inline(always)]
    unsafe fn gather(base: *const f32, stride: usize, count: usize) -> Self {
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let offsets = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(stride as i32));
            let mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lanes));
            _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), base, offsets, mask)
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { _mm256_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { _mm256_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { _mm256_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(self, b: Self, c: Self) -> Self {
        unsafe { _mm256_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { _mm256_max_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn recip_or_zero(self) -> Self {
        unsafe {
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(self, _mm256_setzero_ps());
            _mm256_and_ps(positive, _mm256_div_ps(_mm256_set1_ps(1.0), self))
        }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe {
            let x = _mm256_min_ps(_mm256_max_ps(self, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
            let scaled = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            // 2ⁿ from the exponent bits (n ≥ −126 after the clamp).
            let exponent = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
            _mm256_mul_ps(exp_poly(r), _mm256_castsi256_ps(exponent))
        }
    }
}

/// The task with `VECS` vectors of `V` per key: `V::N · VECS` query rows.
///
/// # Safety
/// As [`run_avx512`]'s, for `V`'s instruction set and `rows ≤ V::N · VECS`.
#[inline(always)]
unsafe fn run<V: Lanes, const VECS: usize>(task: &Task, s: &mut Scratch) {
    let (d, rows) = (task.head_dim, V::N * VECS);
    s.queries_t.resize(d * rows, 0.0);
    s.probs.resize(KEY_BLOCK * rows, 0.0);
    s.acc.resize(d * rows, 0.0);
    // SAFETY: as the caller promises; every buffer has the size its kernel addresses.
    unsafe {
        pack_queries::<V, VECS>(task, &mut s.queries_t);
        let mut max = [V::splat(f32::NEG_INFINITY); VECS];
        let mut sum = [V::zero(); VECS];
        for first in (0..task.keys).step_by(KEY_BLOCK) {
            let cols = KEY_BLOCK.min(task.keys - first);
            scores::<V, VECS>(task, first, cols, &s.queries_t, &mut s.probs);
            let bias = if task.bias.is_empty() { &[][..] } else { &task.bias[first..first + cols] };
            let factor = softmax_block::<V, VECS>(&mut s.probs[..cols * rows], bias, &mut max, &mut sum);
            accumulate::<V, VECS>(task, first, cols, &s.probs, &mut s.acc, (first > 0).then_some(factor));
        }
        write_out::<V, VECS>(task, &s.acc, &sum);
    }
}

/// `qt[c·rows + r] = q[r, c] · scale`, zero for `r ≥ task.rows`: one vector of rows of one
/// column at a time, gathered (element-wise transposing stores would stall on the loads they
/// alias).
///
/// # Safety
/// As [`run`]'s; `qt` holds `head_dim · V::N · VECS` elements.
#[inline(always)]
unsafe fn pack_queries<V: Lanes, const VECS: usize>(task: &Task, qt: &mut [f32]) {
    let rows = V::N * VECS;
    // SAFETY: the gathered lanes are elements c of query rows < task.rows (the caller's
    // promise); the others are not read. `qt` holds head_dim · rows elements.
    unsafe {
        let scale = V::splat(task.scale);
        for i in 0..VECS {
            let first = V::N * i;
            let valid = task.rows.saturating_sub(first).min(V::N);
            for c in 0..task.head_dim {
                let base = task.q.wrapping_add(first * task.q_stride + c);
                let column = V::gather(base, task.q_stride, valid);
                column.mul(scale).store(qt.as_mut_ptr().add(c * rows + first));
            }
        }
    }
}

/// The scores of keys `first..first + cols` into `probs` (`[cols, rows]`).
///
/// # Safety
/// As [`run`]'s; `first + cols ≤ keys`, `cols ≤ KEY_BLOCK`.
#[inline(always)]
unsafe fn scores<V: Lanes, const VECS: usize>(task: &Task, first: usize, cols: usize, qt: &[f32], probs: &mut [f32]) {
    let (qt, out, rows) = (qt.as_ptr(), probs.as_mut_ptr(), V::N * VECS);
    let mut j = 0;
    // SAFETY: each tile reads keys first + j.. inside the block and writes its rows of `probs`.
    unsafe {
        while j + TILE <= cols {
            score_tile::<V, VECS, TILE>(task, first + j, qt, out.add(j * rows));
            j += TILE;
        }
        let (key, out) = (first + j, out.add(j * rows));
        match cols - j {
            1 => score_tile::<V, VECS, 1>(task, key, qt, out),
            2 => score_tile::<V, VECS, 2>(task, key, qt, out),
            3 => score_tile::<V, VECS, 3>(task, key, qt, out),
            4 => score_tile::<V, VECS, 4>(task, key, qt, out),
            5 => score_tile::<V, VECS, 5>(task, key, qt, out),
            _ => {}
        }
    }
}

/// `out[t] = Σ_c K[key + t, c] · Qᵀ[c]` for `t < T` (`out` `[T, rows]`).
///
/// # Safety
/// As [`run`]'s; keys `key..key + T` exist; `qt` is `head_dim × rows`, `out` `T × rows`.
#[inline(always)]
unsafe fn score_tile<V: Lanes, const VECS: usize, const T: usize>(
    task: &Task,
    key: usize,
    qt: *const f32,
    out: *mut f32,
) {
    let rows = V::N * VECS;
    // SAFETY: as the caller promises.
    unsafe {
        let mut acc = [[V::zero(); VECS]; T];
        let k = task.k.add(key * task.k_stride);
        for c in 0..task.head_dim {
            let q = qt.add(c * rows);
            let mut qv = [V::zero(); VECS];
            for (i, v) in qv.iter_mut().enumerate() {
                *v = V::load(q.add(V::N * i));
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let kb = V::splat(*k.add(t * task.k_stride + c));
                for (a, &q) in acc.iter_mut().zip(&qv) {
                    *a = kb.fmadd(q, *a);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (i, &a) in acc.iter().enumerate() {
                a.store(out.add(t * rows + V::N * i));
            }
        }
    }
}

/// One key block of the online softmax on `probs` (`[cols, rows]` scores, `bias` empty or one
/// per key): the scores become `exp(s + bias − m')`, `max` and `sum` are updated, and the
/// returned factor `exp(m − m')` is what the outputs accumulated so far must be multiplied by.
///
/// # Safety
/// `V`'s instruction set is enabled.
#[inline(always)]
unsafe fn softmax_block<V: Lanes, const VECS: usize>(
    probs: &mut [f32],
    bias: &[f32],
    max: &mut [V; VECS],
    sum: &mut [V; VECS],
) -> [V; VECS] {
    // SAFETY: every vector access below is to `V::N` elements of a `rows`-long row of `probs`.
    unsafe {
        let mut block_max = *max;
        for (j, row) in probs.chunks_exact_mut(V::N * VECS).enumerate() {
            for (i, lanes) in row.chunks_exact_mut(V::N).enumerate() {
                let mut s = V::load(lanes.as_ptr());
                if let Some(&b) = bias.get(j) {
                    s = s.add(V::splat(b));
                    s.store(lanes.as_mut_ptr());
                }
                block_max[i] = block_max[i].max(s);
            }
        }
        let mut factor = [V::zero(); VECS];
        for i in 0..VECS {
            factor[i] = max[i].sub(block_max[i]).exp();
            sum[i] = sum[i].mul(factor[i]);
            max[i] = block_max[i];
        }
        for row in probs.chunks_exact_mut(V::N * VECS) {
            for (i, lanes) in row.chunks_exact_mut(V::N).enumerate() {
                let e = V::load(lanes.as_ptr()).sub(max[i]).exp();
                e.store(lanes.as_mut_ptr());
                sum[i] = sum[i].add(e);
            }
        }
        factor
    }
}

/// `Oᵀ = Oᵀ · factor + Σ_j V[first + j] ⊗ P[j]` (`factor` None: `Oᵀ` starts at zero).
///
/// # Safety
/// As [`run`]'s; `first + cols ≤ keys`; `acc` is `head_dim × rows`, `probs` at least
/// `cols × rows`.
#[inline(always)]
unsafe fn accumulate<V: Lanes, const VECS: usize>(
    task: &Task,
    first: usize,
    cols: usize,
    probs: &[f32],
    acc: &mut [f32],
    factor: Option<[V; VECS]>,
) {
    let (d, rows, probs, acc) = (task.head_dim, V::N * VECS, probs.as_ptr(), acc.as_mut_ptr());
    // SAFETY: value rows first..first + cols exist; each tile covers head dims c.. of them.
    unsafe {
        let values = task.v.add(first * task.v_stride);
        let mut c = 0;
        while c + TILE <= d {
            output_tile::<V, VECS, TILE>(task, values.add(c), cols, probs, acc.add(c * rows), factor);
            c += TILE;
        }
        let (values, acc) = (values.add(c), acc.add(c * rows));
        match d - c {
            1 => output_tile::<V, VECS, 1>(task, values, cols, probs, acc, factor),
            2 => output_tile::<V, VECS, 2>(task, values, cols, probs, acc, factor),
            3 => output_tile::<V, VECS, 3>(task, values, cols, probs, acc, factor),
            4 => output_tile::<V, VECS, 4>(task, values, cols, probs, acc, factor),
            5 => output_tile::<V, VECS, 5>(task, values, cols, probs, acc, factor),
            _ => {}
        }
    }
}

/// `T` head dims of [`accumulate`]: `acc[t] = acc[t] · factor + Σ_j values[j, t] · probs[j]`.
///
/// # Safety
/// `V`'s instruction set is enabled; `values` addresses `cols` rows (`v_stride` apart) of at
/// least `T` elements, `probs` `cols × rows`, `acc` `T × rows`.
#[inline(always)]
unsafe fn output_tile<V: Lanes, const VECS: usize, const T: usize>(
    task: &Task,
    values: *const f32,
    cols: usize,
    probs: *const f32,
    acc: *mut f32,
    factor: Option<[V; VECS]>,
) {
    let rows = V::N * VECS;
    // SAFETY: as the caller promises.
    unsafe {
        let mut out = [[V::zero(); VECS]; T];
        if let Some(factor) = factor {
            for (t, out) in out.iter_mut().enumerate() {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = V::load(acc.add(t * rows + V::N * i)).mul(factor[i]);
                }
            }
        }
        for j in 0..cols {
            let p = probs.add(j * rows);
            let mut pv = [V::zero(); VECS];
            for (i, v) in pv.iter_mut().enumerate() {
                *v = V::load(p.add(V::N * i));
            }
            let row = values.add(j * task.v_stride);
            for (t, out) in out.iter_mut().enumerate() {
                let vb = V::splat(*row.add(t));
                for (o, &p) in out.iter_mut().zip(&pv) {
                    *o = vb.fmadd(p, *o);
                }
            }
        }
        for (t, out) in out.iter().enumerate() {
            for (i, &o) in out.iter().enumerate() {
                o.store(acc.add(t * rows + V::N * i));
            }
        }
    }
}

/// `out[r, c] = Oᵀ[c, r] / sum[r]` for the task's rows (0 where nothing was attended to).
///
/// # Safety
/// As [`run`]'s; `acc` is `head_dim × rows`.
#[inline(always)]
unsafe fn write_out<V: Lanes, const VECS: usize>(task: &Task, acc: &[f32], sum: &[V; VECS]) {
    let (d, rows) = (task.head_dim, V::N * VECS);
    let mut inv = [0f32; ROWS_AVX512];
    // SAFETY: `inv` has V::N lanes per vector of `sum` (rows ≤ ROWS_AVX512); the gathered lanes are Oᵀ[c.., r] for
    // c < head_dim, inside `acc`; output row `r < rows` holds `d` elements written by this task
    // only (lanes past `d` are neither read nor written).
    unsafe {
        for (i, s) in sum.iter().enumerate() {
            s.recip_or_zero().store(inv.as_mut_ptr().add(V::N * i));
        }
        for (r, &inv) in inv[..rows].iter().enumerate().take(task.rows) {
            let inv = V::splat(inv);
            for c in (0..d).step_by(V::N) {
                let count = (d - c).min(V::N);
                let column = V::gather(acc.as_ptr().add(c * rows + r), rows, count);
                column.mul(inv).store_first(task.out.add(r * task.out_stride + c), count);
            }
        }
    }
}
