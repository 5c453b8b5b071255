//! Scaled dot-product attention without materialising more than a bounded score block.

use candle_core::{DType, Tensor};

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
    let (b, h, n, _) = q.dims4()?;
    let l = k.dim(2)?;
    let rows_per_chunk = (SCORE_BUDGET_BYTES / (4 * b * h * l).max(1)).clamp(1, n);
    let kt = k.t()?;
    let mut outputs = Vec::with_capacity(n.div_ceil(rows_per_chunk));
    for start in (0..n).step_by(rows_per_chunk) {
        let len = rows_per_chunk.min(n - start);
        let q_chunk = q.narrow(2, start, len)?;
        let mut scores = (q_chunk.matmul(&kt)?.to_dtype(DType::F32)? * scale)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outputs.push(probs.matmul(v)?);
    }
    if outputs.len() == 1 {
        return Ok(outputs.remove(0));
    }
    Tensor::cat(&outputs, 2)
}
