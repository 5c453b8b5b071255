//! Attention on the CPU in f32 with an online softmax over key blocks (flash attention's
//! algorithm): no `[heads, N, L]` score matrix is ever written. Each task takes one batch row,
//! one head and a block of query rows, and walks the keys in blocks:
//!
//! ```text
//! S = Q_blk · K_blkᵀ                 [rows, keys]   (a GEMM into a per-thread buffer)
//! S = exp(S · scale + bias − m')     running max m' and sum per row (fast_math)
//! O = O · exp(m − m') + S · V_blk    [rows, d]
//! ```
//!
//! and writes `O / sum` straight into a `[B, N, H, d]` output, which is the `[B, N, H·d]` the
//! output projection reads (no transpose copy). Q, K and V are read in place through their
//! strides (heads split from a projection are views), and keys a row's mask cuts off at the end
//! (a caption's padding) are skipped, not computed: they would get weight `exp(−10000)`, which is
//! zero in f32 next to any kept key.
//!
//! On a CPU with AVX-512 or AVX2 (and heads up to 256 wide) a task runs `attention_x86`'s
//! kernel instead, which needs no GEMM and packs neither K nor V; elsewhere the GEMMs above.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use crate::conv_cpu::OutPtr;
use crate::fast_math::{online_softmax_block, RunningSoftmax, Simd};
use crate::gemm_cpu::{matmul, Operand};

/// Query rows per task: the score block (`QUERY_BLOCK × KEY_BLOCK` f32, 128 KiB) and the output
/// block stay in a core's L2 cache.
const QUERY_BLOCK: usize = 64;
/// Keys per block of the online softmax.
const KEY_BLOCK: usize = 512;

/// Which keys each batch row attends to.
#[derive(Debug, Clone)]
pub(crate) enum CpuKeyMask {
    /// Every key.
    All,
    /// The first `n` keys of each batch row.
    Prefix(Vec<usize>),
    /// An additive bias per key, `[B, L]` row-major.
    Bias(Vec<f32>),
}

/// The op: inputs `q [B, H, N, d]`, `k [B, H, L, d]`, `v [B, H, L, d]` (any strides with the
/// last dimension contiguous), output `[B, N, H, d]` contiguous.
#[derive(Debug, Clone)]
pub(crate) struct FlashAttentionCpu {
    pub scale: f32,
    pub mask: CpuKeyMask,
    /// The instruction set to run ([`Simd::detected`]; capped at what the CPU has): AVX-512
    /// and AVX2 run `attention_x86`'s kernel, the baseline the GEMM path.
    pub simd: Simd,
}

/// One strided `[B, H, rows, d]` f32 input.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("flash-attention-cpu: {what} is not f32") };
        let stride = layout.stride();
        if stride.len() != 4 || stride[3] != 1 {
            candle_core::bail!("flash-attention-cpu: {what} needs 4 dims with the last contiguous, got {layout:?}")
        }
        Ok(Self {
            data,
            offset: layout.start_offset(),
            batch_stride: stride[0],
            head_stride: stride[1],
            row_stride: stride[2],
        })
    }

    /// Pointer to row `row` of head `h` in batch row `b`.
    fn row_ptr(&self, b: usize, h: usize, row: usize) -> *const f32 {
        let at = self.offset + b * self.batch_stride + h * self.head_stride + row * self.row_stride;
        self.data.as_ptr().wrapping_add(at)
    }
}

/// An `attention_x86` entry point.
#[cfg(target_arch = "x86_64")]
type X86Kernel = unsafe fn(&crate::attention_x86::Task, &mut crate::attention_x86::Scratch);

/// Each thread's scores, output accumulator, softmax states and rescale factors.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    states: Vec<RunningSoftmax>,
    rescale: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SCRATCH_X86: std::cell::RefCell<crate::attention_x86::Scratch> =
        std::cell::RefCell::new(Default::default());
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl FlashAttentionCpu {
    /// How many leading keys batch row `b` attends to, and the bias over them (empty: none).
    fn keys_of(&self, b: usize, keys: usize) -> (usize, &[f32]) {
        match &self.mask {
            CpuKeyMask::All => (keys, &[]),
            CpuKeyMask::Prefix(lengths) => (lengths[b].min(keys), &[]),
            CpuKeyMask::Bias(bias) => (keys, &bias[b * keys..(b + 1) * keys]),
        }
    }

    /// The `attention_x86` kernel the tasks run for heads of `head_dim`, and its query rows
    /// per task; None: the GEMM path.
    #[cfg(target_arch = "x86_64")]
    fn x86_kernel(&self, head_dim: usize) -> Option<(X86Kernel, usize)> {
        use crate::attention_x86::{run_avx2, run_avx512, MAX_HEAD_DIM, ROWS_AVX2, ROWS_AVX512};
        if head_dim > MAX_HEAD_DIM {
            return None;
        }
        match self.simd.min(Simd::best_supported()) {
            Simd::Avx512 => Some((run_avx512, ROWS_AVX512)),
            Simd::Avx2 => Some((run_avx2, ROWS_AVX2)),
            Simd::Baseline => None,
        }
    }

    /// [`Self::task`] with `attention_x86`'s `kernel`, for `rows` queries from `n0`.
    #[cfg(target_arch = "x86_64")]
    fn task_x86(
        &self,
        (kernel, rows): (X86Kernel, usize),
        dims: Dims,
        (q, k, v): (View, View, View),
        (b, h, n0): (usize, usize, usize),
        out: OutPtr,
    ) {
        let d = dims.head_dim;
        let (keys, bias) = self.keys_of(b, dims.keys);
        let task = crate::attention_x86::Task {
            q: q.row_ptr(b, h, n0),
            q_stride: q.row_stride,
            rows: rows.min(dims.queries - n0),
            k: k.row_ptr(b, h, 0),
            k_stride: k.row_stride,
            v: v.row_ptr(b, h, 0),
            v_stride: v.row_stride,
            keys,
            bias,
            head_dim: d,
            scale: self.scale,
            out: out.get().wrapping_add(((b * dims.queries + n0) * dims.heads + h) * d),
            out_stride: dims.heads * d,
        };
        // SAFETY: `x86_kernel` chose a kernel the CPU runs, for this head size and row count;
        // the views address the (b, h) rows inside their storages (candle checked the layouts
        // against the shapes); output rows n0.. of head h in batch row b are this task's only.
        SCRATCH_X86.with_borrow_mut(|scratch| unsafe { kernel(&task, scratch) });
    }

    /// Queries `n0..n0 + rows` of head `h`, batch row `b`, into `out` (`[B, N, H, d]`).
    fn task(
        &self,
        dims: Dims,
        (q, k, v): (View, View, View),
        (b, h, n0): (usize, usize, usize),
        out: OutPtr,
        s: &mut Scratch,
    ) {
        let d = dims.head_dim;
        let rows = QUERY_BLOCK.min(dims.queries - n0);
        let (kept, bias) = self.keys_of(b, dims.keys);
        s.scores.resize(rows * KEY_BLOCK.min(kept.max(1)), 0.0);
        s.acc.clear();
        s.acc.resize(rows * d, 0.0);
        s.states.clear();
        s.states.resize(rows, RunningSoftmax::default());
        s.rescale.resize(rows, 0.0);
        for j0 in (0..kept).step_by(KEY_BLOCK) {
            let cols = KEY_BLOCK.min(kept - j0);
            let scores = &mut s.scores[..rows * cols];
            // Kᵀ: element (c, j) of the block is K[j0 + j, c].
            let keys_t = Operand { ptr: k.row_ptr(b, h, j0), row_stride: 1, col_stride: k.row_stride };
            // SAFETY: Q rows n0..n0+rows and K rows j0..j0+cols of (b, h) lie inside their
            // storages (the layouts were checked against the shapes by candle); `scores` holds
            // rows·cols elements.
            unsafe {
                let queries = Operand::rows(q.row_ptr(b, h, n0), q.row_stride);
                matmul((rows, cols, d), scores.as_mut_ptr(), cols, false, queries, keys_t);
            }
            let block_bias = if bias.is_empty() { bias } else { &bias[j0..j0 + cols] };
            online_softmax_block(scores, cols, self.scale, block_bias, &mut s.states, &mut s.rescale);
            if j0 > 0 {
                for (row, &factor) in s.acc.chunks_exact_mut(d).zip(&s.rescale) {
                    row.iter_mut().for_each(|a| *a *= factor);
                }
            }
            // SAFETY: V rows j0..j0+cols of (b, h) lie inside V's storage; `acc` is rows·d.
            unsafe {
                let (probs, values) =
                    (Operand::rows(scores.as_ptr(), cols), Operand::rows(v.row_ptr(b, h, j0), v.row_stride));
                matmul((rows, d, cols), s.acc.as_mut_ptr(), d, j0 > 0, probs, values);
            }
        }
        for (r, (acc, state)) in s.acc.chunks_exact(d).zip(&s.states).enumerate() {
            let inv = if state.sum > 0.0 { 1.0 / state.sum } else { 0.0 };
            let at = ((b * dims.queries + n0 + r) * dims.heads + h) * d;
            // SAFETY: out[b, n0 + r, h, ..d] is inside the output and written by this task only
            // (tasks differ in (b, h, query block)).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(at).cast::<MaybeUninit<f32>>(), d) };
            dst.iter_mut().zip(acc).for_each(|(o, &a)| {
                o.write(a * inv);
            });
        }
    }
}

impl CustomOp3 for FlashAttentionCpu {
    fn name(&self) -> &'static str {
        "flash-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, head_dim) = l1.shape().dims4()?;
        let (kb, kh, keys, kd) = l2.shape().dims4()?;
        if (kb, kh, kd) != (batch, heads, head_dim) || l3.shape() != l2.shape() {
            candle_core::bail!(
                "flash-attention-cpu: q {:?}, k {:?}, v {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        match &self.mask {
            CpuKeyMask::Prefix(lengths) if lengths.len() != batch => {
                candle_core::bail!("flash-attention-cpu: a key mask for {} rows, batch {batch}", lengths.len())
            }
            CpuKeyMask::Bias(bias) if bias.len() != batch * keys => {
                candle_core::bail!("flash-attention-cpu: a key bias of {} for {batch}×{keys} keys", bias.len())
            }
            _ => {}
        }
        let views = (View::new(s1, l1, "q")?, View::new(s2, l2, "k")?, View::new(s3, l3, "v")?);
        let dims = Dims { heads, queries, keys, head_dim };
        let mut out = crate::buffers::unwritten(batch * queries * heads * head_dim);
        let out_ptr = OutPtr::unwritten(&mut out);
        let tasks = |rows: usize| -> Vec<(usize, usize, usize)> {
            (0..batch)
                .flat_map(|b| (0..heads).flat_map(move |h| (0..queries).step_by(rows).map(move |n0| (b, h, n0))))
                .collect()
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = self.x86_kernel(head_dim) {
            tasks(kernel.1).par_iter().for_each(|&at| self.task_x86(kernel, dims, views, at, out_ptr));
            // SAFETY: the tasks cover every (batch row, head, query), and each writes all
            // `head_dim` outputs of its queries.
            let out = unsafe { crate::buffers::assume_written(out) };
            return Ok((CpuStorage::F32(out), Shape::from((batch, queries, heads, head_dim))));
        }
        tasks(QUERY_BLOCK).par_iter().for_each(|&(b, h, n0)| {
            SCRATCH.with_borrow_mut(|scratch| self.task(dims, views, (b, h, n0), out_ptr, scratch));
        });
        // SAFETY: as above.
        let out = unsafe { crate::buffers::assume_written(out) };
        Ok((CpuStorage::F32(out), Shape::from((batch, queries, heads, head_dim))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// `softmax(q kᵀ · scale + bias) v` with candle's plain ops, `[B, H, N, d]`.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&[f32]>, scale: f64) -> Tensor {
        let (q, k, v) = (q.contiguous().unwrap(), k.contiguous().unwrap(), v.contiguous().unwrap());
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(bias) = bias {
            let (b, l) = (q.dim(0).unwrap(), k.dim(2).unwrap());
            let bias = Tensor::from_slice(bias, (b, 1, 1, l), &Device::Cpu).unwrap();
            scores = scores.broadcast_add(&bias).unwrap();
        }
        candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
    }

    /// Every instruction-set path of the op against the plain composition: head sizes of the
    /// test models and of PixArt-Σ (64, 72), one off a tile (40, 5), query counts off the
    /// 64-row task and key counts off the key block and the 6-key tile, strided views, and
    /// each kind of mask (a prefix per row that drops whole blocks, an additive bias).
    #[test]
    fn every_path_equals_the_plain_composition() {
        let dev = Device::Cpu;
        for (b, h, n, l, d) in [(2, 3, 130, 1100, 40), (1, 2, 64, 77, 64), (2, 1, 19, 5, 72), (1, 2, 200, 300, 5)] {
            let split = |t: Tensor| t.reshape((b, t.dim(1).unwrap(), h, d)).unwrap().transpose(1, 2).unwrap();
            let q = split(Tensor::randn(0f32, 1.0, (b, n, h * d), &dev).unwrap());
            let k = split(Tensor::randn(0f32, 1.0, (b, l, h * d), &dev).unwrap());
            let v = split(Tensor::randn(0f32, 1.0, (b, l, h * d), &dev).unwrap());
            let scale = 1.0 / (d as f64).sqrt();
            let prefix: Vec<usize> = (0..b).map(|i| (l * (i + 1)).div_ceil(b + 2).max(1)).collect();
            let prefix_bias: Vec<f32> =
                prefix.iter().flat_map(|&kept| (0..l).map(move |j| if j < kept { 0.0 } else { -10000.0 })).collect();
            let bias: Vec<f32> =
                (0..b * l).map(|i| if i % 3 == 0 { -10000.0 } else { (i % 7) as f32 * 0.25 }).collect();
            let masks = [
                (CpuKeyMask::All, None),
                (CpuKeyMask::Prefix(prefix), Some(&prefix_bias[..])),
                (CpuKeyMask::Bias(bias.clone()), Some(&bias[..])),
            ];
            for (mask, bias) in masks {
                let want = plain(&q, &k, &v, bias, scale);
                for simd in Simd::supported() {
                    let op = FlashAttentionCpu { scale: scale as f32, mask: mask.clone(), simd };
                    let ours = q.apply_op3_no_bwd(&k, &v, &op).unwrap().transpose(1, 2).unwrap();
                    let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 2e-5, "{simd:?} {:?} {mask:?}: {diff}", (b, h, n, l, d));
                }
            }
        }
    }
}
