//! One PixArt transformer block (diffusers' `BasicTransformerBlock` with `ada_norm_single`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use pixart_core::activation::gelu_tanh;
use pixart_core::attention::KeyMask;

use crate::attention::Attention;
use crate::config::DitConfig;
use crate::embeddings::modulated_layer_norm;
use crate::linear::DitLinear;
use crate::shared_rows::SharedRows;

/// Self-attention, cross-attention to the caption, and a GELU(tanh) feed-forward, modulated by
/// the timestep through a learned `scale_shift_table`.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    scale_shift_table: Tensor,
    attn1: Attention,
    attn2: Attention,
    ff_in: DitLinear,
    ff_out: DitLinear,
    eps: f64,
}

impl TransformerBlock {
    /// `transformer_blocks.{i}.*`.
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size();
        let heads = (cfg.num_attention_heads, cfg.attention_head_dim);
        let (bias, products) = (cfg.attention_bias, cfg.cpu_products);
        Ok(Self {
            scale_shift_table: vb.get((6, d), "scale_shift_table")?,
            attn1: Attention::new(d, d, heads, bias, products, vb.pp("attn1"))?,
            attn2: Attention::new(d, d, heads, bias, products, vb.pp("attn2"))?,
            ff_in: DitLinear::new(d, 4 * d, true, products, vb.pp("ff.net.0.proj"))?,
            ff_out: DitLinear::new(4 * d, d, true, products, vb.pp("ff.net.2"))?,
            eps: cfg.norm_eps,
        })
    }

    /// The self-attention's Q, K and V multiply in one product by `stacked` (see
    /// [`Attention::stack_projections`]).
    pub fn stack_self_attention_projections(&mut self, stacked: &Tensor) -> candle_core::Result<()> {
        self.attn1.stack_projections(stacked)
    }

    /// Whether the self-attention multiplies Q, K and V in one product.
    pub fn has_stacked_self_attention_projections(&self) -> bool {
        self.attn1.has_stacked_projections()
    }

    /// The cross-attention keys and values of a projected caption `[B, L, D]` (constant across
    /// denoising steps, so computed once per generation).
    pub fn caption_keys_values(&self, caption: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.attn2.keys_values(caption)
    }

    /// `x`: `[B, N, D]`; `t6`: `[B or 1, 6D]`; `caption_kv`: from [`Self::caption_keys_values`];
    /// `caption_mask`: the caption tokens each row attends to; `self_attention_rows`: how the
    /// self-attention treats the batch rows.
    pub fn forward(
        &self,
        x: &Tensor,
        t6: &Tensor,
        caption_kv: &(Tensor, Tensor),
        caption_mask: Option<&KeyMask>,
        self_attention_rows: SelfAttentionRows,
    ) -> candle_core::Result<Tensor> {
        let d = x.dim(2)?;
        let rows = t6.dim(0)?; // one timestep per batch row, or one for the whole batch
                               // shift/scale/gate for attention, then for the MLP: each [rows, 1, D].
        let modulation = self.scale_shift_table.unsqueeze(0)?.broadcast_add(&t6.reshape((rows, 6, d))?)?;
        let part = |i: usize| modulation.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (part(0)?, part(1)?, part(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (part(3)?, part(4)?, part(5)?);

        let h = modulated_layer_norm(x, &scale_msa, &shift_msa, self.eps)?;
        let x = gated_residual(x, &self.self_attention(&h, self_attention_rows)?, &gate_msa)?;
        let (caption_k, caption_v) = caption_kv;
        let x = (&x + self.attn2.forward_with_keys_values(&x, caption_k, caption_v, caption_mask)?)?;
        let h = modulated_layer_norm(&x, &scale_mlp, &shift_mlp, self.eps)?;
        let ff = self.ff_out.forward(&gelu_tanh(&self.ff_in.forward(&h)?)?)?;
        gated_residual(&x, &ff, &gate_mlp)
    }

    /// Self-attention of every row, of the distinct rows only (spread back), or of the rows
    /// before `identity_from` with identity attention for the rest.
    fn self_attention(&self, h: &Tensor, rows: SelfAttentionRows) -> candle_core::Result<Tensor> {
        let b = h.dim(0)?;
        match rows {
            SelfAttentionRows::Shared(shared) => {
                shared.spread(&self.attn1.forward(&shared.distinct(h)?, None, None)?)
            }
            SelfAttentionRows::IdentityFrom(from) if from < b => {
                let perturbed = self.attn1.identity(&h.narrow(0, from, b - from)?)?;
                if from == 0 {
                    return Ok(perturbed);
                }
                let attended = self.attn1.forward(&h.narrow(0, 0, from)?, None, None)?;
                Tensor::cat(&[attended, perturbed], 0)
            }
            _ => self.attn1.forward(h, None, None),
        }
    }
}

/// How a block's self-attention treats the batch rows.
#[derive(Debug, Clone, Copy)]
pub enum SelfAttentionRows<'a> {
    /// Every row attends over its own tokens.
    Each,
    /// Rows from this one on get identity attention (perturbed-attention guidance).
    IdentityFrom(usize),
    /// Rows that are equal (and so is their modulation) are computed once.
    Shared(&'a SharedRows),
}

/// `x + y · gate` (`gate` broadcastable from `[B or 1, 1, D]`): one pass on the CPU in f32
/// (`pixart_core::modulation`), two broadcast ops elsewhere.
fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(out) = pixart_core::modulation::gated_residual_cpu(x, y, gate)? {
        return Ok(out);
    }
    x + y.broadcast_mul(gate)?
}
