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
    /// Q, K and V in one product (self-attention), from a stacked weight
    /// ([`Self::stack_projections`]).
    to_qkv: Option<DitLinear>,
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
            to_qkv: None,
            heads,
            head_dim,
        })
    }

    /// Self-attention multiplies Q, K and V in one product by `stacked` `[3·inner, query_dim]`,
    /// whose rows must be `to_q`'s, `to_k`'s and `to_v`'s weights (e.g.
    /// [`crate::TransformerWeights::stacked_qkv`], of which those layers' weights are views).
    pub fn stack_projections(&mut self, stacked: &Tensor) -> candle_core::Result<()> {
        let (rows, _) = stacked.dims2()?;
        if rows != 3 * self.heads * self.head_dim {
            candle_core::bail!("stacked Q/K/V weight of {rows} rows for {} heads of {}", self.heads, self.head_dim)
        }
        let biases = [self.to_q.bias(), self.to_k.bias(), self.to_v.bias()];
        let bias = match biases {
            [Some(q), Some(k), Some(v)] => Some(Tensor::cat(&[q, k, v], 0)?),
            [None, None, None] => None,
            _ => candle_core::bail!("stacked Q/K/V: some of to_q, to_k, to_v have a bias and some not"),
        };
        self.to_qkv = Some(DitLinear::from_tensors(stacked, bias.as_ref(), CpuProducts::F32)?);
        Ok(())
    }

    /// Whether self-attention multiplies Q, K and V in one product: by a stacked f32 weight
    /// ([`Self::stack_projections`]), or, where the three layers multiply in bf16 or f16 on the
    /// CPU, by their packed weights in one op ([`DitLinear::forward_side_by_side`]).
    pub fn has_stacked_projections(&self) -> bool {
        self.to_qkv.is_some() || DitLinear::multiply_side_by_side(&[&self.to_q, &self.to_k, &self.to_v])
    }

    /// `x`: `[B, N, D]`; `context`: `[B, L, C]` (None: self-attention); `mask`: the keys each
    /// row attends to (None: all).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&KeyMask>) -> candle_core::Result<Tensor> {
        let qkv = if context.is_none() { self.qkv_in_one_product(x)? } else { None };
        if let Some(qkv) = qkv {
            // [B, N, 3, heads, head_dim]: Q, K and V side by side in each token's row.
            let (b, n, _) = x.dims3()?;
            let qkv = qkv.reshape((b, n, 3, self.heads, self.head_dim))?;
            let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2); // [B, heads, N, head_dim] views
            return self.attend(&part(0)?, &part(1)?, &part(2)?, mask);
        }
        let context = context.unwrap_or(x);
        let (k, v) = (self.split_heads(self.to_k.forward(context)?)?, self.split_heads(self.to_v.forward(context)?)?);
        self.forward_with_keys_values(x, &k, &v, mask)
    }

    /// `[B, N, 3·inner]`: the Q, K and V of `x` side by side from one product, where
    /// [`Self::has_stacked_projections`] and the input suits it; `None` otherwise.
    fn qkv_in_one_product(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match &self.to_qkv {
            Some(to_qkv) => to_qkv.forward(x).map(Some),
            None => DitLinear::forward_side_by_side(&[&self.to_q, &self.to_k, &self.to_v], x),
        }
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
        self.attend(&self.split_heads(self.to_q.forward(x)?)?, k, v, mask)
    }

    /// Attention of queries `[B, heads, N, head_dim]` to keys and values, through `to_out`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&KeyMask>) -> candle_core::Result<Tensor> {
        let out = scaled_dot_product_attention(q, k, v, mask, 1.0 / (self.head_dim as f64).sqrt())?;
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
