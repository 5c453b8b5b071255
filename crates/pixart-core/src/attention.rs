//! Scaled dot-product attention without materialising more than a bounded score block.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::attention_cpu::{CpuKeyMask, FlashAttentionCpu};
use crate::fast_math::contiguous_f32;

/// The most score memory one attention chunk may take (bytes, f32): long sequences are processed
/// in query blocks so a 4096-token self-attention never holds the whole `H × N × N` matrix.
const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// Which keys each batch row attends to: the additive bias on the scores (f32 `[B, 1, 1, L]`,
/// 0 for a kept key, −10000 for a masked one) and, when every row keeps a prefix of its keys,
/// the length of each prefix, known on the host. The lengths let a GPU kernel skip the masked
/// keys without reading the bias back from the device at every call.
#[derive(Debug, Clone)]
pub struct KeyMask {
    bias: Tensor,
    host_bias: Vec<f32>,
    prefix_lengths: Option<Vec<usize>>,
}

impl KeyMask {
    /// The mask of `rows` (`[B][L]`, 1 = key kept, 0 = masked; other values are weights the
    /// bias `(m − 1)·10000` expresses but no prefix does), built on `device`.
    pub fn from_rows(rows: &[Vec<f32>], device: &candle_core::Device) -> candle_core::Result<Self> {
        let b = rows.len();
        let l = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != l) {
            candle_core::bail!("key mask rows differ in length")
        }
        let host_bias: Vec<f32> = rows.iter().flatten().map(|&m| (m - 1.0) * 10000.0).collect();
        let bias = Tensor::from_slice(&host_bias, (b, 1, 1, l), device)?;
        let prefix = |row: &Vec<f32>| {
            let kept = row.iter().take_while(|&&m| m == 1.0).count();
            (kept > 0 && row[kept..].iter().all(|&m| m == 0.0)).then_some(kept)
        };
        Ok(Self { bias, host_bias, prefix_lengths: rows.iter().map(prefix).collect() })
    }

    /// The bias added to the scores, f32 `[B, 1, 1, L]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The mask as the CPU attention kernel takes it, for a batch of `batch` rows (a one-row
    /// mask applies to every row).
    fn for_cpu(&self, batch: usize) -> CpuKeyMask {
        let rows = self.bias.dim(0).unwrap_or(1).max(1);
        let repeat = if rows == 1 { batch } else { 1 };
        match &self.prefix_lengths {
            Some(lengths) => CpuKeyMask::Prefix(lengths.repeat(repeat)),
            None => CpuKeyMask::Bias(self.host_bias.repeat(repeat)),
        }
    }

    /// Per batch row, how many leading keys are kept (the rest masked); `None` when some row is
    /// not such a prefix.
    pub fn prefix_lengths(&self) -> Option<&[usize]> {
        self.prefix_lengths.as_deref()
    }
}

/// `softmax(q kᵀ · scale + bias) v` on `[B, H, N, d]` tensors; the softmax runs in f32.
/// `mask` adds its bias to the scores. On the CPU in f32, an online softmax over key blocks
/// (`attention_cpu`) that never holds a score matrix and skips masked trailing keys. The inputs
/// may be strided views (e.g. heads split from a `[B, N, H·d]` projection without a copy) as long
/// as the last dimension is contiguous: the CPU kernel and flash attention read them in place,
/// the other paths copy them once.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if q.device().is_cuda() && matches!(q.dtype(), DType::BF16 | DType::F16) {
        if let Some(out) = flash::attention(q, k, v, mask, scale)? {
            return Ok(out);
        }
    }
    let on_cpu_in_f32 = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if on_cpu_in_f32 && k.dim(2)? > 0 {
        let batch = q.dim(0)?;
        let mask = mask.map_or(CpuKeyMask::All, |mask| mask.for_cpu(batch));
        let op = FlashAttentionCpu { scale: scale as f32, mask, simd: crate::fast_math::Simd::detected() };
        let last_contiguous = |t: &Tensor| if t.stride().last() == Some(&1) { Ok(t.clone()) } else { t.contiguous() };
        let (q, k, v) = (last_contiguous(q)?, last_contiguous(k)?, last_contiguous(v)?);
        // `[B, N, H, d]` seen as `[B, H, N, d]`.
        return q.apply_op3_no_bwd(&k, &v, &op)?.transpose(1, 2);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let bias = mask.map(KeyMask::bias);
    let (b, h, n, _) = q.dims4()?;
    let l = k.dim(2)?;
    let rows_per_chunk = (SCORE_BUDGET_BYTES / (4 * b * h * l).max(1)).clamp(1, n);
    let kt = k.t()?;
    let mut outputs = Vec::with_capacity(n.div_ceil(rows_per_chunk));
    for start in (0..n).step_by(rows_per_chunk) {
        let len = rows_per_chunk.min(n - start);
        let q_chunk = q.narrow(2, start, len)?;
        let scores = q_chunk.matmul(&kt)?.to_dtype(DType::F32)?;
        let probs = scaled_softmax(&scores, scale, bias)?.to_dtype(v.dtype())?;
        outputs.push(probs.matmul(&v)?);
    }
    if outputs.len() == 1 {
        return Ok(outputs.remove(0));
    }
    Tensor::cat(&outputs, 2)
}

/// Attention through a kernel that takes `[B, N, H, d]` tensors (any strides but the last) and
/// no mask, as flash attention does; returns `[B, H, N, d]`, or `None` when `mask` is not a
/// prefix of kept keys per row (a kernel without an additive bias cannot express it). With
/// prefix lengths each batch row attends to its kept keys only, which is what the masked
/// softmax computes (masked keys get weight exp(−10000) = 0 in f32 there); rows with equal
/// lengths share one kernel call. The inputs are passed as views: no copy.
#[cfg(any(test, feature = "flash-attn"))]
fn attention_over_kept_keys(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    kernel: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let (qn, kn, vn) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
    let keys = kn.dim(1)?;
    let lengths = match mask.map(KeyMask::prefix_lengths) {
        None => None,
        Some(Some(lengths)) => Some(lengths),
        Some(None) => return Ok(None),
    };
    let batch = qn.dim(0)?;
    if lengths.is_some_and(|lengths| lengths.len() != batch) {
        return Ok(None); // a mask for another batch: the plain path reports it
    }
    let out = match lengths {
        Some(lengths) if lengths.iter().any(|&n| n != keys) => {
            let mut outputs = Vec::new();
            let mut first = 0;
            while first < lengths.len() {
                // A run of rows with one length: one call.
                let kept = lengths[first];
                let run = lengths[first..].iter().take_while(|&&n| n == kept).count();
                let rows = |t: &Tensor| t.narrow(0, first, run);
                let (k_rows, v_rows) = (rows(&kn)?.narrow(1, 0, kept)?, rows(&vn)?.narrow(1, 0, kept)?);
                outputs.push(kernel(&rows(&qn)?, &k_rows, &v_rows)?);
                first += run;
            }
            if outputs.len() == 1 {
                outputs.remove(0)
            } else {
                Tensor::cat(&outputs, 0)?
            }
        }
        _ => kernel(&qn, &kn, &vn)?,
    };
    // `[B, N, H, d]` seen as `[B, H, N, d]`.
    Ok(Some(out.transpose(1, 2)?))
}

/// Flash attention (FA2, candle-flash-attn) on CUDA in bf16/f16: no score matrix at all, no
/// copy of the inputs, no read from the device.
#[cfg(feature = "flash-attn")]
mod flash {
    use candle_core::Tensor;

    use super::KeyMask;

    /// [`super::attention_over_kept_keys`] with FA2's kernel, or `None` where FA2 has no kernel
    /// (head sizes: multiples of 8 up to 512) or the mask is not a prefix per row.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&KeyMask>,
        scale: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        let head_dim = q.dim(3)?;
        if head_dim % 8 != 0 || head_dim > 512 || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            return Ok(None);
        }
        let scale = scale as f32;
        super::attention_over_kept_keys(q, k, v, mask, |q, k, v| candle_flash_attn::flash_attn(q, k, v, scale, false))
    }
}

/// `softmax(scores · scale + bias)` over the last dimension, `scores` f32 `[B, H, n, L]`, `bias`
/// f32 broadcastable from `[B, 1, 1, L]`. On the CPU one pass per row with a vectorised `exp`
/// ([`crate::fast_math::softmax_rows`]); elsewhere candle's ops.
pub fn scaled_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let op = ScaledSoftmaxCpu { scale: scale as f32 };
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        let scores = scores.contiguous()?;
        return match bias {
            None => scores.apply_op1_no_bwd(&op),
            Some(bias) => {
                let (b, _, _, l) = scores.dims4()?;
                let bias = bias.broadcast_as((b, 1, 1, l))?.contiguous()?;
                scores.apply_op2_no_bwd(&bias, &op)
            }
        };
    }
    let mut scores = (scores * scale)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The CPU op behind [`scaled_softmax`].
#[derive(Debug, Clone, Copy)]
struct ScaledSoftmaxCpu {
    scale: f32,
}

impl ScaledSoftmaxCpu {
    /// `bias`: `[B, L]` rows (empty for none); rows of `scores` belong to batch `row / rows_per_batch`.
    fn run(&self, scores: &[f32], shape: &Shape, bias: &[f32]) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = shape.dims().last().copied().unwrap_or(1).max(1);
        let batch = shape.dims().first().copied().unwrap_or(1).max(1);
        let rows_per_batch = scores.len() / len / batch;
        let mut out = scores.to_vec();
        // Parallel over batch entries (one bias row each), then over groups of their rows.
        let group = rows_per_batch.clamp(1, 64);
        out.par_chunks_mut(rows_per_batch.max(1) * len).enumerate().for_each(|(b, entry)| {
            let bias = if bias.is_empty() { &[][..] } else { &bias[b * len..(b + 1) * len] };
            entry
                .par_chunks_mut(group * len)
                .for_each(|rows| crate::fast_math::softmax_rows(rows, len, self.scale, bias));
        });
        Ok((CpuStorage::F32(out), shape.clone()))
    }
}

impl CustomOp1 for ScaledSoftmaxCpu {
    fn name(&self) -> &'static str {
        "scaled-softmax-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(contiguous_f32(storage, layout, CustomOp1::name(self))?, layout.shape(), &[])
    }
}

impl CustomOp2 for ScaledSoftmaxCpu {
    fn name(&self) -> &'static str {
        "scaled-softmax-bias-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, _, _, l) = l1.shape().dims4()?;
        if l2.shape().elem_count() != b * l {
            candle_core::bail!("scaled-softmax-cpu: bias {:?} for scores {:?}", l2.shape(), l1.shape())
        }
        let name = CustomOp2::name(self);
        self.run(contiguous_f32(s1, l1, name)?, l1.shape(), contiguous_f32(s2, l2, name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn key_masks_know_their_prefixes_on_the_host() {
        let dev = Device::Cpu;
        let mask = KeyMask::from_rows(&[vec![1.0, 1.0, 0.0, 0.0], vec![1.0, 1.0, 1.0, 1.0]], &dev).unwrap();
        assert_eq!(mask.prefix_lengths(), Some(&[2, 4][..]));
        let bias = mask.bias().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bias, [0.0, 0.0, -10000.0, -10000.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(mask.bias().dims(), [2, 1, 1, 4]);
        // A hole, an empty row or a fractional weight is no prefix: the bias alone expresses it.
        for rows in [vec![vec![1.0, 0.0, 1.0]], vec![vec![0.0, 0.0, 0.0]], vec![vec![1.0, 0.5, 0.0]]] {
            assert_eq!(KeyMask::from_rows(&rows, &dev).unwrap().prefix_lengths(), None, "{rows:?}");
        }
        assert!(KeyMask::from_rows(&[vec![1.0], vec![1.0, 1.0]], &dev).is_err());
    }

    #[test]
    fn attention_takes_strided_views_and_masks_keys() {
        let dev = Device::Cpu;
        // Heads split from a `[B, N, H·d]` projection without a copy, as the transformer does.
        let split = |t: Tensor| t.reshape((2, t.dim(1).unwrap(), 3, 8)).unwrap().transpose(1, 2).unwrap();
        let q = split(Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap());
        let k = split(Tensor::randn(0f32, 1.0, (2, 4, 24), &dev).unwrap());
        let v = split(Tensor::randn(0f32, 1.0, (2, 4, 24), &dev).unwrap());
        assert!(!q.is_contiguous());
        let mask = KeyMask::from_rows(&[vec![1.0, 1.0, 0.0, 0.0], vec![1.0; 4]], &dev).unwrap();
        let ours = scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.5).unwrap();
        // Row 0 attends to its first two keys only; row 1 to all four.
        let row = |i: usize, keys: usize| {
            let (q, k, v) = [&q, &k, &v].map(|t| t.narrow(0, i, 1).unwrap().contiguous().unwrap()).into();
            let (k, v) = (k.narrow(2, 0, keys).unwrap(), v.narrow(2, 0, keys).unwrap());
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
            candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
        };
        let want = Tensor::cat(&[row(0, 2), row(1, 4)], 0).unwrap();
        let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn trimming_keys_per_row_equals_the_masked_softmax() {
        let dev = Device::Cpu;
        let (b, h, n, l, d) = (3, 2, 5, 4, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        // A plain kernel in flash attention's layout, checking what it is given.
        let calls = std::cell::Cell::new(0);
        let kernel = |q: &Tensor, k: &Tensor, v: &Tensor| {
            calls.set(calls.get() + 1);
            for t in [q, k, v] {
                assert_eq!(t.stride().last(), Some(&1), "the last dimension must be contiguous");
            }
            let [q, k, v] = [q, k, v].map(|t| t.transpose(1, 2).unwrap().contiguous().unwrap());
            let scores = (q.matmul(&k.t()?)? * 0.3)?;
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?.transpose(1, 2)
        };
        let row = |kept: usize| [vec![1.0; kept], vec![0.0; l - kept]].concat();
        for (lengths, want_calls) in [(vec![2, 2, 4], 2), (vec![4, 4, 4], 1), (vec![1, 3, 1], 3)] {
            let rows: Vec<Vec<f32>> = lengths.iter().map(|&n| row(n)).collect();
            let mask = KeyMask::from_rows(&rows, &dev).unwrap();
            calls.set(0);
            let ours = attention_over_kept_keys(&q, &k, &v, Some(&mask), kernel).unwrap().unwrap();
            assert_eq!(calls.get(), want_calls, "{lengths:?}");
            let want = scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
            assert_eq!(ours.dims(), want.dims());
            let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{lengths:?}: {diff}");
        }
        let unmasked = attention_over_kept_keys(&q, &k, &v, None, kernel).unwrap().unwrap();
        let want = scaled_dot_product_attention(&q, &k, &v, None, 0.3).unwrap();
        let diff = (&unmasked - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "no mask: {diff}");
        // A mask with a hole is left to the plain path.
        let holed = KeyMask::from_rows(&[vec![1.0, 0.0, 1.0, 0.0], row(4), row(4)], &dev).unwrap();
        assert!(attention_over_kept_keys(&q, &k, &v, Some(&holed), kernel).unwrap().is_none());
    }

    /// The plain composition: scores, masked softmax, weighted values.
    fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Tensor {
        let (q, k, v) = (q.contiguous().unwrap(), k.contiguous().unwrap(), v.contiguous().unwrap());
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias).unwrap();
        }
        candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
    }

    /// Several query and key blocks, strided inputs, prefix and holed masks, a one-row mask
    /// for a batch of two, and a head size that is no multiple of a vector.
    #[test]
    fn online_softmax_attention_equals_the_plain_composition() {
        let dev = Device::Cpu;
        let (b, h, n, l, d) = (2, 3, 130, 1100, 40);
        let split = |t: Tensor| t.reshape((b, t.dim(1).unwrap(), h, d)).unwrap().transpose(1, 2).unwrap();
        let q = split(Tensor::randn(0f32, 1.0, (b, n, h * d), &dev).unwrap());
        let k = split(Tensor::randn(0f32, 1.0, (b, l, h * d), &dev).unwrap());
        let v = split(Tensor::randn(0f32, 1.0, (b, l, h * d), &dev).unwrap());
        let prefix = |kept: usize| [vec![1.0; kept], vec![0.0; l - kept]].concat();
        let mut holed = vec![1.0; l];
        holed.iter_mut().step_by(3).for_each(|m| *m = 0.0);
        let masks = [
            None,
            Some(KeyMask::from_rows(&[prefix(600), prefix(7)], &dev).unwrap()),
            Some(KeyMask::from_rows(&[holed.clone(), prefix(1000)], &dev).unwrap()),
            Some(KeyMask::from_rows(&[holed], &dev).unwrap()),
        ];
        for mask in &masks {
            let ours = scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), 0.15).unwrap();
            let want = plain_attention(&q, &k, &v, mask.as_ref().map(KeyMask::bias), 0.15);
            assert_eq!(ours.dims(), [b, h, n, d]);
            let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 2e-5, "{:?}: {diff}", mask.as_ref().map(KeyMask::prefix_lengths));
        }
        // The `[B, N, H·d]` the output projection reads needs no copy.
        let out = scaled_dot_product_attention(&q, &k, &v, None, 0.15).unwrap();
        assert!(out.transpose(1, 2).unwrap().is_contiguous());
    }

    #[test]
    fn scaled_softmax_equals_the_plain_ops() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 4.0, (2, 3, 70, 33), &dev).unwrap();
        let mut mask = vec![0f32; 2 * 33];
        mask[33 + 20..].fill(-10000.0);
        let bias = Tensor::from_vec(mask, (2, 1, 1, 33), &dev).unwrap();
        for bias in [None, Some(&bias)] {
            let ours = scaled_softmax(&scores, 0.125, bias).unwrap();
            let mut plain = (&scores * 0.125).unwrap();
            if let Some(bias) = bias {
                plain = plain.broadcast_add(bias).unwrap();
            }
            let plain = candle_nn::ops::softmax_last_dim(&plain).unwrap();
            let diff = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }
}
