//! One task of the CPU attention (`attention_cpu`) with AVX-512 micro-kernels. The 16 lanes of
//! a vector are 16 query rows: the task's 64 query rows are four vectors, the scores of one key
//! are four vectors, and the online softmax's running max and sum are per lane (no horizontal
//! reduction anywhere). Neither K nor V is packed: their elements are broadcast from where they
//! lie. Only the task's queries are transposed, once, with the scale folded in.
//!
//! ```text
//! Qᵀ [d, 64]      Qᵀ[c, r] = Q[r, c] · scale  (zero past the last query)
//! Sᵀ [keys, 64]   Sᵀ[j] = Σ_c K[j, c] · Qᵀ[c] + bias[j]                  6 keys × 4 vectors a tile
//! P = exp(Sᵀ − m')    m' = max(m, max_j Sᵀ[j]) per lane, sum' = sum · exp(m − m') + Σ_j P[j]
//! Oᵀ [d, 64]      Oᵀ[c] = Oᵀ[c] · exp(m − m') + Σ_j V[j, c] · P[j]        6 dims × 4 vectors a tile
//! ```
//!
//! A micro-tile keeps 6 × 4 accumulators, 4 operands and a broadcast in the 32 vector registers.
//! The generic path (a GEMM per block) packs both operands of both products for every 64
//! queries; this one reads each key and value once per task from where it is.

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps,
    _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_maskz_div_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
    _mm512_mullo_epi32, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_set_epi32,
    _mm512_setzero_ps, _mm512_storeu_ps, _mm512_sub_ps, _CMP_GT_OQ, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
};

/// Query rows per task: four vectors of 16 lanes.
pub(crate) const ROWS: usize = 64;
/// Vectors per key (or per head dim) row of a task.
const VECS: usize = ROWS / 16;
/// Keys per block of the online softmax: the block's probabilities (`KEY_BLOCK × ROWS` f32,
/// 32 KiB) stay in the L1/L2 caches while every output tile reads them.
const KEY_BLOCK: usize = 64;
/// Keys per score tile and head dims per output tile.
const TILE: usize = 6;
/// The largest head size this kernel takes: Qᵀ and Oᵀ (`d × 64` f32 each) stay in the L2 cache.
/// Larger heads (the VAE's single 512-wide head) take the generic path, whose GEMMs do well there.
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// One task: `rows` queries of one (batch row, head) against its first `keys` keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task<'a> {
    /// The first query row; rows `q_stride` apart, `head_dim` contiguous elements each.
    pub q: *const f32,
    /// Distance between query rows (elements).
    pub q_stride: usize,
    /// Query rows (at most [`ROWS`]).
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

/// Runs `task`, writing its `rows × head_dim` outputs.
///
/// # Safety
/// The CPU has AVX-512 F; the task's pointers address `rows` query rows, `keys` key and value
/// rows and `rows` output rows of `head_dim` elements at their strides, inside their
/// allocations; no one else writes those output rows during the call; `head_dim` ≤
/// [`MAX_HEAD_DIM`] and `rows` ≤ [`ROWS`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn run(task: &Task, s: &mut Scratch) {
    let d = task.head_dim;
    s.queries_t.resize(d * ROWS, 0.0);
    s.probs.resize(KEY_BLOCK * ROWS, 0.0);
    s.acc.resize(d * ROWS, 0.0);
    // SAFETY: as the caller promises; every buffer has the size its kernel addresses.
    unsafe {
        pack_queries(task, &mut s.queries_t);
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); VECS];
        let mut sum = [_mm512_setzero_ps(); VECS];
        for first in (0..task.keys).step_by(KEY_BLOCK) {
            let cols = KEY_BLOCK.min(task.keys - first);
            scores(task, first, cols, &s.queries_t, &mut s.probs);
            let bias = if task.bias.is_empty() { &[][..] } else { &task.bias[first..first + cols] };
            let factor = softmax_block(&mut s.probs[..cols * ROWS], bias, &mut max, &mut sum);
            accumulate(task, first, cols, &s.probs, &mut s.acc, (first > 0).then_some(factor));
        }
        write_out(task, &s.acc, &sum);
    }
}

/// `exp(x)` in 16 lanes: the same range reduction and polynomial as [`crate::fast_math::exp`]
/// (within 2 ulp, clamped to [−87.3, 88.3]), with `vscalefps` for the power of two.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(e, n)
}

/// `qt[c·ROWS + r] = q[r, c] · scale`, zero for `r ≥ rows`: 16 rows of one column at a time,
/// gathered (element-wise transposing stores would stall on the loads they alias).
///
/// # Safety
/// As [`run`]'s; `qt` holds `head_dim · ROWS` elements.
#[target_feature(enable = "avx512f")]
unsafe fn pack_queries(task: &Task, qt: &mut [f32]) {
    let scale = _mm512_set1_ps(task.scale);
    for i in 0..VECS {
        let first = 16 * i;
        let valid = task.rows.saturating_sub(first).min(16);
        let mask: __mmask16 = ((1u32 << valid) - 1) as u16;
        let offsets = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(task.q_stride as i32),
        );
        for c in 0..task.head_dim {
            // SAFETY: the gathered lanes are elements c of query rows first.. < rows (the
            // caller's promise); the others are not read. `qt` holds head_dim · ROWS elements.
            unsafe {
                let base = task.q.wrapping_add(first * task.q_stride + c);
                let column = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, base.cast());
                _mm512_storeu_ps(qt.as_mut_ptr().add(c * ROWS + first), _mm512_mul_ps(column, scale));
            }
        }
    }
}

/// The scores of keys `first..first + cols` into `probs` (`[cols, ROWS]`).
///
/// # Safety
/// As [`run`]'s; `first + cols ≤ keys`, `cols ≤ KEY_BLOCK`.
#[target_feature(enable = "avx512f")]
unsafe fn scores(task: &Task, first: usize, cols: usize, qt: &[f32], probs: &mut [f32]) {
    let (qt, out) = (qt.as_ptr(), probs.as_mut_ptr());
    let mut j = 0;
    // SAFETY: each tile reads keys first + j.. inside the block and writes its rows of `probs`.
    unsafe {
        while j + TILE <= cols {
            score_tile::<TILE>(task, first + j, qt, out.add(j * ROWS));
            j += TILE;
        }
        let (key, out) = (first + j, out.add(j * ROWS));
        match cols - j {
            1 => score_tile::<1>(task, key, qt, out),
            2 => score_tile::<2>(task, key, qt, out),
            3 => score_tile::<3>(task, key, qt, out),
            4 => score_tile::<4>(task, key, qt, out),
            5 => score_tile::<5>(task, key, qt, out),
            _ => {}
        }
    }
}

/// `out[t] = Σ_c K[key + t, c] · Qᵀ[c]` for `t < T` (`out` `[T, ROWS]`).
///
/// # Safety
/// As [`run`]'s; keys `key..key + T` exist; `qt` is `head_dim × ROWS`, `out` `T × ROWS`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn score_tile<const T: usize>(task: &Task, key: usize, qt: *const f32, out: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); VECS]; T];
    // SAFETY: as the caller promises.
    unsafe {
        let k = task.k.add(key * task.k_stride);
        for c in 0..task.head_dim {
            let q = qt.add(c * ROWS);
            let qv = [0, 1, 2, 3].map(|i| _mm512_loadu_ps(q.add(16 * i)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let kb = _mm512_set1_ps(*k.add(t * task.k_stride + c));
                for (a, &q) in acc.iter_mut().zip(&qv) {
                    *a = _mm512_fmadd_ps(kb, q, *a);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (i, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(t * ROWS + 16 * i), a);
            }
        }
    }
}

/// One key block of the online softmax on `probs` (`[cols, ROWS]` scores, `bias` empty or one
/// per key): the scores become `exp(s + bias − m')`, `max` and `sum` are updated, and the
/// returned factor `exp(m − m')` is what the outputs accumulated so far must be multiplied by.
#[target_feature(enable = "avx512f")]
fn softmax_block(
    probs: &mut [f32],
    bias: &[f32],
    max: &mut [__m512; VECS],
    sum: &mut [__m512; VECS],
) -> [__m512; VECS] {
    let mut block_max = *max;
    for (j, row) in probs.chunks_exact_mut(ROWS).enumerate() {
        for (i, lanes) in row.chunks_exact_mut(16).enumerate() {
            // SAFETY: `lanes` is 16 elements.
            let mut s = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
            if let Some(&b) = bias.get(j) {
                s = _mm512_add_ps(s, _mm512_set1_ps(b));
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), s) };
            }
            block_max[i] = _mm512_max_ps(block_max[i], s);
        }
    }
    let mut factor = [_mm512_setzero_ps(); VECS];
    for i in 0..VECS {
        factor[i] = exp16(_mm512_sub_ps(max[i], block_max[i]));
        sum[i] = _mm512_mul_ps(sum[i], factor[i]);
        max[i] = block_max[i];
    }
    for row in probs.chunks_exact_mut(ROWS) {
        for (i, lanes) in row.chunks_exact_mut(16).enumerate() {
            // SAFETY: `lanes` is 16 elements.
            let e = exp16(_mm512_sub_ps(unsafe { _mm512_loadu_ps(lanes.as_ptr()) }, max[i]));
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), e) };
            sum[i] = _mm512_add_ps(sum[i], e);
        }
    }
    factor
}

/// `Oᵀ = Oᵀ · factor + Σ_j V[first + j] ⊗ P[j]` (`factor` None: `Oᵀ` starts at zero).
///
/// # Safety
/// As [`run`]'s; `first + cols ≤ keys`; `acc` is `head_dim × ROWS`, `probs` at least `cols × ROWS`.
#[target_feature(enable = "avx512f")]
unsafe fn accumulate(
    task: &Task,
    first: usize,
    cols: usize,
    probs: &[f32],
    acc: &mut [f32],
    factor: Option<[__m512; VECS]>,
) {
    let (d, probs, acc) = (task.head_dim, probs.as_ptr(), acc.as_mut_ptr());
    // SAFETY: value rows first..first + cols exist; each tile covers head dims c.. of them.
    unsafe {
        let values = task.v.add(first * task.v_stride);
        let mut c = 0;
        while c + TILE <= d {
            output_tile::<TILE>(task, values.add(c), cols, probs, acc.add(c * ROWS), factor);
            c += TILE;
        }
        let (values, acc) = (values.add(c), acc.add(c * ROWS));
        match d - c {
            1 => output_tile::<1>(task, values, cols, probs, acc, factor),
            2 => output_tile::<2>(task, values, cols, probs, acc, factor),
            3 => output_tile::<3>(task, values, cols, probs, acc, factor),
            4 => output_tile::<4>(task, values, cols, probs, acc, factor),
            5 => output_tile::<5>(task, values, cols, probs, acc, factor),
            _ => {}
        }
    }
}

/// `T` head dims of [`accumulate`]: `acc[t] = acc[t] · factor + Σ_j values[j, t] · probs[j]`.
///
/// # Safety
/// `values` addresses `cols` rows (`v_stride` apart) of at least `T` elements, `probs` `cols ×
/// ROWS`, `acc` `T × ROWS`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn output_tile<const T: usize>(
    task: &Task,
    values: *const f32,
    cols: usize,
    probs: *const f32,
    acc: *mut f32,
    factor: Option<[__m512; VECS]>,
) {
    let mut out = [[_mm512_setzero_ps(); VECS]; T];
    // SAFETY: as the caller promises.
    unsafe {
        if let Some(factor) = factor {
            for (t, out) in out.iter_mut().enumerate() {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = _mm512_mul_ps(_mm512_loadu_ps(acc.add(t * ROWS + 16 * i)), factor[i]);
                }
            }
        }
        for j in 0..cols {
            let p = probs.add(j * ROWS);
            let pv = [0, 1, 2, 3].map(|i| _mm512_loadu_ps(p.add(16 * i)));
            let row = values.add(j * task.v_stride);
            for (t, out) in out.iter_mut().enumerate() {
                let vb = _mm512_set1_ps(*row.add(t));
                for (o, &p) in out.iter_mut().zip(&pv) {
                    *o = _mm512_fmadd_ps(vb, p, *o);
                }
            }
        }
        for (t, out) in out.iter().enumerate() {
            for (i, &o) in out.iter().enumerate() {
                _mm512_storeu_ps(acc.add(t * ROWS + 16 * i), o);
            }
        }
    }
}

/// `out[r, c] = Oᵀ[c, r] / sum[r]` for the task's rows (0 where nothing was attended to).
///
/// # Safety
/// As [`run`]'s; `acc` is `head_dim × ROWS`.
#[target_feature(enable = "avx512f")]
unsafe fn write_out(task: &Task, acc: &[f32], sum: &[__m512; VECS]) {
    let mut inv = [0f32; ROWS];
    for (lanes, &s) in inv.chunks_exact_mut(16).zip(sum) {
        let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, _mm512_setzero_ps());
        // SAFETY: `lanes` is 16 elements.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_maskz_div_ps(positive, _mm512_set1_ps(1.0), s)) };
    }
    let d = task.head_dim;
    let columns = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(ROWS as i32),
    );
    for (r, &inv) in inv.iter().enumerate().take(task.rows) {
        let inv = _mm512_set1_ps(inv);
        for c in (0..d).step_by(16) {
            let mask: __mmask16 = ((1u32 << (d - c).min(16)) - 1) as u16;
            // SAFETY: the gathered lanes are Oᵀ[c.., r] for c < head_dim, inside `acc`; output row
            // `r < rows` holds `d` elements written by this task only (the masked lanes are not).
            unsafe {
                let base = acc.as_ptr().add(c * ROWS + r);
                let out = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, columns, base.cast());
                _mm512_mask_storeu_ps(task.out.add(r * task.out_stride + c), mask, _mm512_mul_ps(out, inv));
            }
        }
    }
}
