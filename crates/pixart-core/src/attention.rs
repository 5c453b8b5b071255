//! Scaled dot-product attention without materialising more than a bounded score block.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_math::contiguous_f32;

/// The most score memory one attention chunk may take (bytes, f32): long sequences are processed
/// in query blocks so a 4096-token self-attention never holds the whole `H × N × N` matrix.
const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// `softmax(q kᵀ · scale + bias) v` on `[B, H, N, d]` tensors; the softmax runs in f32.
/// `bias` (f32, broadcastable to `[B, H, N, L]`) is added to the scores.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if q.device().is_cuda() && matches!(q.dtype(), DType::BF16 | DType::F16) {
        if let Some(out) = flash::attention(q, k, v, bias, scale)? {
            return Ok(out);
        }
    }
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
        outputs.push(probs.matmul(v)?);
    }
    if outputs.len() == 1 {
        return Ok(outputs.remove(0));
    }
    Tensor::cat(&outputs, 2)
}

/// Flash attention (FA2, candle-flash-attn) on CUDA in bf16/f16: no score matrix at all.
#[cfg(feature = "flash-attn")]
mod flash {
    use candle_core::{DType, Tensor};

    /// `softmax(q kᵀ · scale + bias) v` on `[B, H, N, d]` tensors, or `None` when the bias is not
    /// a key mask flash attention can express. A bias must be the caption mask (0 for kept keys,
    /// very negative for padding, kept keys first, as the transformer builds it): each batch row
    /// then attends to its kept keys only, which is what the masked softmax computes (masked keys
    /// get weight exp(-10000) = 0 in f32 there).
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        scale: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        // candle-flash-attn takes `[B, N, H, d]`.
        let bnhd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
        let (qn, kn, vn) = (bnhd(q)?, bnhd(k)?, bnhd(v)?);
        let scale = scale as f32;
        let out = match bias {
            None => candle_flash_attn::flash_attn(&qn, &kn, &vn, scale, false)?,
            Some(bias) => {
                let (b, l) = (q.dim(0)?, k.dim(2)?);
                // The kept length of each row: one small read from the device per call (the
                // lengths could come with the prepared caption instead).
                let rows: Vec<Vec<f32>> =
                    bias.broadcast_as((b, 1, 1, l))?.reshape((b, l))?.to_dtype(DType::F32)?.to_vec2()?;
                let mut outputs = Vec::with_capacity(b);
                for (i, row) in rows.iter().enumerate() {
                    let kept = row.iter().take_while(|x| **x > -1.0).count();
                    if kept == 0 || row[kept..].iter().any(|x| *x > -1.0) || row[..kept].iter().any(|x| *x != 0.0) {
                        return Ok(None); // not a prefix mask: the plain path handles it
                    }
                    let k_row = kn.narrow(0, i, 1)?.narrow(1, 0, kept)?.contiguous()?;
                    let v_row = vn.narrow(0, i, 1)?.narrow(1, 0, kept)?.contiguous()?;
                    outputs.push(candle_flash_attn::flash_attn(&qn.narrow(0, i, 1)?, &k_row, &v_row, scale, false)?);
                }
                Tensor::cat(&outputs, 0)?
            }
        };
        Ok(Some(out.transpose(1, 2)?))
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
