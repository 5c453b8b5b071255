//! The T5 v1.1 encoder stack (transformers' `T5EncoderModel`), with the padding mask.
//!
//! ```text
//! x = embed(ids)                                   [B, L, d_model]
//! bias = relative_position_bias(L, L) + mask_bias  [B, H, L, L]   (bias from block 0, shared)
//! per block:
//!   x += o(softmax(q kᵀ + bias) v)   on RMSNorm(x)   (no 1/√d scaling)
//!   x += wo(act(wi_0 h) ⊙ wi_1 h)    on h = RMSNorm(x)
//! out = RMSNorm(x)
//! ```
//!
//! Precision: in f32 and bf16 everything runs in that dtype, with RMSNorm statistics and the
//! softmax in f32 as transformers computes them. In f16 the residual stream and the feed-forward
//! output projection `wo` stay in f32 (transformers keeps `wo` in f32 for the same reason: T5
//! v1.1 activations exceed f16's range), and f16 matmul outputs are clamped to a finite range.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{Activation, FeedForwardKind, T5Config};
use crate::error::T5Error;
use crate::quantized::{QuantType, T5Embedding, T5Linear, WeightSummary};
use crate::source::TensorSource;

/// transformers clamps f16 hidden states to `finfo(f16).max - 1000`; we use the same bound.
const F16_CLAMP: f64 = 65504.0 - 1000.0;

/// Clamps an f16 tensor into f16's finite range; other dtypes pass through.
fn clamp_f16(t: Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == DType::F16 {
        t.clamp(-F16_CLAMP, F16_CLAMP)
    } else {
        Ok(t)
    }
}

/// T5's RMSNorm (`T5LayerNorm`): no mean subtraction, no bias, statistics in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(d: usize, eps: f64, src: &TensorSource, name: &str) -> Result<Self, T5Error> {
        Ok(Self { weight: src.dense(&format!("{name}.weight"), &[d], src.dtype())?, eps })
    }

    /// Normalises in f32 and returns the weight's dtype.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)
    }
}

/// The bidirectional relative position bucket of `relative = key_pos - query_pos`
/// (transformers' `_relative_position_bucket` with `bidirectional=True`).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let offset = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return offset + n;
    }
    // Logarithmically spaced buckets up to max_distance. f64 here gives the same integer as
    // torch's f32 arithmetic: the only exact ties (n = 2^k · max_exact) are exact in both.
    let log_ratio = (n as f64 / max_exact as f64).ln() / (max_distance as f64 / max_exact as f64).ln();
    let large = max_exact + (log_ratio * (half - max_exact) as f64) as usize;
    offset + large.min(half - 1)
}

/// The learned relative position bias of block 0, shared by every block.
#[derive(Debug, Clone)]
struct RelativePositionBias {
    /// `[num_buckets, num_heads]`.
    table: Tensor,
    num_buckets: usize,
    max_distance: usize,
}

impl RelativePositionBias {
    /// Returns the bias `[1, H, q_len, k_len]` in f32.
    fn forward(&self, q_len: usize, k_len: usize) -> candle_core::Result<Tensor> {
        let buckets: Vec<u32> = (0..q_len)
            .flat_map(|q| {
                (0..k_len).map(move |k| {
                    relative_position_bucket(k as i64 - q as i64, self.num_buckets, self.max_distance) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, q_len * k_len, self.table.device())?;
        let heads = self.table.dim(1)?;
        self.table
            .to_dtype(DType::F32)?
            .index_select(&buckets, 0)? // [q·k, H]
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }
}

/// Multi-head self-attention without the 1/√d scaling (T5 folds it into the weights).
#[derive(Debug, Clone)]
struct SelfAttention {
    q: T5Linear,
    k: T5Linear,
    v: T5Linear,
    o: T5Linear,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(cfg: &T5Config, src: &TensorSource, name: &str) -> Result<Self, T5Error> {
        let inner = cfg.num_heads * cfg.d_kv;
        let dtype = src.dtype();
        let linear = |part: &str, out, inp| src.linear(&format!("{name}.{part}.weight"), out, inp, dtype);
        Ok(Self {
            q: linear("q", inner, cfg.d_model)?,
            k: linear("k", inner, cfg.d_model)?,
            v: linear("v", inner, cfg.d_model)?,
            o: linear("o", cfg.d_model, inner)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `x`: `[B, L, d_model]`; `bias`: f32 `[B|1, H, L, L]`. Returns `[B, L, d_model]` in x's dtype.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            clamp_f16(t)?.reshape((b, l, self.heads, self.d_kv))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q.forward(x)?)?; // [B, H, L, d_kv]
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(bias)?; // [B, H, L, L]
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, self.heads * self.d_kv))?;
        clamp_f16(self.o.forward(&out)?)
    }
}

/// The (gated) feed-forward block `wo(act(wi_0 h) ⊙ wi_1 h)`.
#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: T5Linear,
    wi_1: Option<T5Linear>,
    wo: T5Linear,
    activation: Activation,
}

impl FeedForward {
    fn new(cfg: &T5Config, kind: FeedForwardKind, src: &TensorSource, name: &str) -> Result<Self, T5Error> {
        let dtype = src.dtype();
        let linear = |part: &str, out, inp, dtype| src.linear(&format!("{name}.{part}.weight"), out, inp, dtype);
        let (wi_0, wi_1) = if kind.gated {
            (linear("wi_0", cfg.d_ff, cfg.d_model, dtype)?, Some(linear("wi_1", cfg.d_ff, cfg.d_model, dtype)?))
        } else {
            (linear("wi", cfg.d_ff, cfg.d_model, dtype)?, None)
        };
        // f16 cannot hold T5 v1.1's feed-forward outputs: keep `wo` (and its input) in f32.
        let wo_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
        Ok(Self { wi_0, wi_1, wo: linear("wo", cfg.d_model, cfg.d_ff, wo_dtype)?, activation: kind.activation })
    }

    /// `h`: `[B, L, d_model]` in the compute dtype; returns `wo`'s dtype.
    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let wo_dtype = self.wo.dtype();
        let project =
            |layer: &T5Linear| -> candle_core::Result<Tensor> { clamp_f16(layer.forward(h)?)?.to_dtype(wo_dtype) };
        let pre = project(&self.wi_0)?;
        let mut hidden = match self.activation {
            Activation::Relu => pre.relu()?,
            Activation::GeluErf => pre.gelu_erf()?,
            Activation::GeluTanh => pre.gelu()?,
            Activation::Silu => pre.silu()?,
        };
        if let Some(wi_1) = &self.wi_1 {
            hidden = (hidden * project(wi_1)?)?;
        }
        self.wo.forward(&hidden)
    }
}

/// One encoder block: self-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug, Clone)]
struct T5Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl T5Block {
    /// `name`: the block's prefix, `encoder.block.{i}`.
    fn new(cfg: &T5Config, kind: FeedForwardKind, src: &TensorSource, name: &str) -> Result<Self, T5Error> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            attn_norm: RmsNorm::new(cfg.d_model, eps, src, &format!("{name}.layer.0.layer_norm"))?,
            attn: SelfAttention::new(cfg, src, &format!("{name}.layer.0.SelfAttention"))?,
            ff_norm: RmsNorm::new(cfg.d_model, eps, src, &format!("{name}.layer.1.layer_norm"))?,
            ff: FeedForward::new(cfg, kind, src, &format!("{name}.layer.1.DenseReluDense"))?,
        })
    }

    /// `x`: the residual stream `[B, L, d_model]`; returns it updated, in the same dtype.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let residual = x.dtype();
        let attn = self.attn.forward(&self.attn_norm.forward(x)?, bias)?;
        let x = (x + attn.to_dtype(residual)?)?;
        let ff = self.ff.forward(&self.ff_norm.forward(&x)?)?;
        x + ff.to_dtype(residual)?
    }
}

/// Where the encoder's weights are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum T5WeightsFile {
    /// A transformers folder: `model.safetensors`, or shards with `model.safetensors.index.json`.
    Safetensors(PathBuf),
    /// A GGUF file with transformers or llama.cpp tensor names (e.g. city96's
    /// `t5-v1_1-xxl-encoder-gguf`), any of f32, f16, bf16, q8_0, q6k, q5k, q4k.
    Gguf(PathBuf),
}

impl T5WeightsFile {
    /// A `.gguf` file is GGUF; anything else is a safetensors folder.
    pub fn from_path(path: &Path) -> Self {
        let gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if gguf {
            Self::Gguf(path.into())
        } else {
            Self::Safetensors(path.into())
        }
    }
}

/// How to load the encoder.
#[derive(Debug, Clone)]
pub struct T5LoadOptions {
    /// Compute dtype (f32, bf16, f16).
    pub dtype: DType,
    /// Where the weights and the computation live.
    pub device: Device,
    /// Quantize unquantized matrices (safetensors, or f32/f16/bf16 GGUF tensors) to this type
    /// while loading; matrices whose rows do not fill its blocks fall back to q8_0, then to the
    /// compute dtype ([`WeightSummary::fallbacks`]). Already-quantized GGUF tensors are used as
    /// stored.
    pub quant: Option<QuantType>,
    /// On the CPU, run quantized matrices through candle's repacking kernels: for q8_0, q4k and
    /// q6k (x86 with AVX2 or better) 3–8× faster, but candle keeps a repacked copy of each such
    /// matrix beside it, about doubling their memory. Off: ggml's block dot products on the
    /// blocks as loaded (the memory the type promises). No effect on CUDA or Metal.
    pub cpu_repack: bool,
}

/// The T5 encoder: token ids (and a padding mask) to hidden states `[B, L, d_model]`.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embed: T5Embedding,
    blocks: Vec<T5Block>,
    final_norm: RmsNorm,
    position_bias: RelativePositionBias,
    config: T5Config,
    dtype: DType,
    summary: WeightSummary,
}

impl T5Encoder {
    /// Loads a transformers `T5EncoderModel` folder (`config.json` + `model.safetensors` or
    /// sharded `model-*.safetensors` with `model.safetensors.index.json`) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, T5Error> {
        let config = T5Config::load(&dir.join("config.json"))?;
        let options = T5LoadOptions { dtype, device: device.clone(), quant: None, cpu_repack: false };
        Self::load_weights(&config, &T5WeightsFile::Safetensors(dir.into()), &options)
    }

    /// Loads the encoder described by `config` from `weights`, stored as `options` ask. Every
    /// tensor is checked against the shape the config implies.
    pub fn load_weights(config: &T5Config, weights: &T5WeightsFile, options: &T5LoadOptions) -> Result<Self, T5Error> {
        config.validate()?;
        let (dtype, device, quant) = (options.dtype, &options.device, options.quant);
        let src = match weights {
            T5WeightsFile::Safetensors(dir) => TensorSource::safetensors(dir, dtype, device, quant)?,
            T5WeightsFile::Gguf(path) => TensorSource::gguf(path, dtype, device, quant)?,
        }
        .with_cpu_repack(options.cpu_repack);
        Self::from_source(config, &src)
    }

    /// Builds the encoder from a config and weights (`shared.*`, `encoder.*` names), stored in
    /// the VarBuilder's dtype.
    pub fn new(config: &T5Config, vb: VarBuilder<'static>) -> Result<Self, T5Error> {
        config.validate()?;
        Self::from_source(config, &TensorSource::var_builder(vb))
    }

    fn from_source(config: &T5Config, src: &TensorSource) -> Result<Self, T5Error> {
        let kind = config.feed_forward()?;
        // T5EncoderModel ties `encoder.embed_tokens` to `shared`; checkpoints store either name.
        let embed_name = if src.contains("shared.weight") { "shared.weight" } else { "encoder.embed_tokens.weight" };
        let embed = src.embedding(embed_name, config.vocab_size, config.d_model)?;
        let blocks = (0..config.num_layers)
            .map(|i| T5Block::new(config, kind, src, &format!("encoder.block.{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let table = src.dense(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[config.relative_attention_num_buckets, config.num_heads],
            src.dtype(),
        )?;
        let final_norm = RmsNorm::new(config.d_model, config.layer_norm_epsilon, src, "encoder.final_layer_norm")?;
        Ok(Self {
            embed,
            blocks,
            final_norm,
            position_bias: RelativePositionBias {
                table,
                num_buckets: config.relative_attention_num_buckets,
                max_distance: config.relative_attention_max_distance,
            },
            config: config.clone(),
            dtype: src.dtype(),
            summary: src.summary(),
        })
    }

    /// How the weights are stored: tensors and bytes per storage type.
    pub fn weight_summary(&self) -> &WeightSummary {
        &self.summary
    }

    /// The model's config.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The dtype of the weights and of the returned hidden states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encodes `ids` (`[B, L]`, u32) attending only to keys where `mask` (`[B, L]`, 1 = token,
    /// 0 = padding) is set; `None` attends everywhere. Returns `[B, L, d_model]` in
    /// [`Self::dtype`]. Padded positions get values too (they attend to the real tokens), exactly
    /// as transformers computes them.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor, T5Error> {
        Ok(self.forward_with_hidden_states(ids, mask)?.0)
    }

    /// Like [`Self::forward`], also returning the residual stream after the embedding and after
    /// each block (transformers' `output_hidden_states`, before the final norm), in the residual
    /// dtype (f32 when computing in f16).
    pub fn forward_with_hidden_states(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>), T5Error> {
        let (b, l) =
            ids.dims2().map_err(|_| T5Error::Input(format!("ids must be [batch, length], got {:?}", ids.dims())))?;
        if l == 0 {
            return Err(T5Error::Input("ids must hold at least one token".into()));
        }
        let max_id = ids.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(T5Error::Input(format!(
                "token id {max_id} is outside the text encoder's vocabulary (0..{})",
                self.config.vocab_size
            )));
        }
        let mut bias = self.position_bias.forward(l, l)?; // [1, H, L, L]
        if let Some(mask) = mask {
            if mask.dims() != [b, l] {
                return Err(T5Error::Input(format!("mask must be [{b}, {l}] like ids, got {:?}", mask.dims())));
            }
            // (1 - mask) · f32::MIN on the keys, as transformers' extended attention mask.
            let key_bias = ((mask.to_dtype(DType::F32)? - 1.0)? * f64::from(-f32::MIN))?.reshape((b, 1, 1, l))?;
            bias = bias.broadcast_add(&key_bias)?;
        }
        let residual_dtype = if self.dtype == DType::F16 { DType::F32 } else { self.dtype };
        let mut x = self.embed.forward(ids, residual_dtype)?;
        let mut hidden = Vec::with_capacity(self.blocks.len() + 1);
        for block in &self.blocks {
            hidden.push(x.clone());
            x = block.forward(&x, &bias)?;
        }
        hidden.push(x.clone());
        Ok((self.final_norm.forward(&x)?, hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_buckets_match_t5_reference_values() {
        // Values of transformers' _relative_position_bucket(bidirectional, 32, 128).
        let b = |r| relative_position_bucket(r, 32, 128);
        assert_eq!([b(0), b(1), b(7), b(8), b(-1), b(-7)], [0, 17, 23, 24, 1, 7]);
        assert_eq!([b(-8), b(-15), b(-16), b(-32), b(-64), b(-127), b(-128), b(-299)], [8, 9, 10, 12, 14, 15, 15, 15]);
        assert_eq!([b(16), b(32), b(64), b(128), b(299)], [26, 28, 30, 31, 31]);
    }
}
