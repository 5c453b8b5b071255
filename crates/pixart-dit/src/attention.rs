//! Multi-head attention (diffusers' `Attention` with the default processor).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use pixart_core::attention::{scaled_dot_product_attention, KeyMask};
use pixart_core::linear_bf16::CpuProducts;

use crate::linear::DitLinear;

/// Self- or cross-attention with biased `to_q/to_k/to_v` and `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: DitLinear,
    to_k: DitLinear,
    to_v: DitLinear,
    to_out: DitLinear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `query_dim` → heads × head_dim; keys and values from `context_dim` features; `bias` on
    /// the Q/K/V projections; `products` as the model's ([`crate::DitConfig::cpu_products`]).
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        (heads, head_dim): (usize, usize),
        bias: bool,
        products: CpuProducts,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: DitLinear::new(query_dim, inner, bias, products, vb.pp("to_q"))?,
            to_k: DitLinear::new(context_dim, inner, bias, products, vb.pp("to_k"))?,
            to_v: DitLinear::new(context_dim, inner, bias, products, vb.pp("to_v"))?,
            to_out: DitLinear::new(inner, query_dim, true, products, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
        })
    }

    /// `x`: `[B, N, D]`; `context`: `[B, L, C]` (None: self-attention); `mask`: the keys each
    /// row attends to (None: all).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&KeyMask>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(x);
        let (k, v) = (self.split_heads(self.to_k.forward(context)?)?, self.split_heads(self.to_v.forward(context)?)?);
        self.forward_with_keys_values(x, &k, &v, mask)
    }

    /// Keys and values of `context` `[B, L, C]`, each `[B, heads, L, head_dim]`: computed once for
    /// a context that does not change between calls (the caption across denoising steps).
    /// They are made contiguous: kept for many calls, they are not copied at each.
    pub fn keys_values(&self, context: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let heads = |t| self.split_heads(t)?.contiguous();
        Ok((heads(self.to_k.forward(context)?)?, heads(self.to_v.forward(context)?)?))
    }

    /// Attention of `x` `[B, N, D]` to keys and values from [`Self::keys_values`].
    pub fn forward_with_keys_values(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&KeyMask>,
    ) -> candle_core::Result<Tensor> {
        let q = self.split_heads(self.to_q.forward(x)?)?;
        let out = scaled_dot_product_attention(&q, k, v, mask, 1.0 / (self.head_dim as f64).sqrt())?;
        let (b, _, n, _) = out.dims4()?;
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, n, self.heads * self.head_dim))?)
    }

    /// Identity attention, perturbed-attention guidance's perturbation (diffusers'
    /// `PAGIdentitySelfAttnProcessor2_0`): every token attends only to itself, so the output
    /// is `to_out(to_v(x))`.
    pub fn identity(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.to_out.forward(&self.to_v.forward(x)?)
    }

    /// `[B, N, heads·head_dim]` → `[B, heads, N, head_dim]`, a view (no copy): flash attention
    /// reads it in place, the other attention paths copy it.
    fn split_heads(&self, t: Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)
    }
}
