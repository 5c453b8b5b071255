//! transformers' `ViTForImageClassification` (no pooler; the classifier reads the CLS token).
//!
//! ```text
//! x = [cls; conv_patch(pixels)ᵀ] + pos          [B, 1 + N, H]   (N = (224/16)² = 196)
//! per layer:
//!   x += o(softmax(q kᵀ / √d) v)   on LN_before(x)
//!   x += fc2(act(fc1(LN_after(x))))
//! logits = classifier(LN(x)[:, 0])              [B, labels]
//! ```

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, Linear, VarBuilder};
use pixart_core::attention::scaled_dot_product_attention;
use pixart_core::conv::Conv;

use crate::config::{Activation, VitConfig};
use crate::error::SafetyError;

/// Patch projection, CLS token and position embeddings.
#[derive(Debug, Clone)]
struct Embeddings {
    /// Through [`Conv`]: candle has no bf16 convolution on the CPU.
    patch: Conv,
    cls: Tensor,
    position: Tensor,
    patch_size: usize,
}

impl Embeddings {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let conv = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        Ok(Self {
            patch: Conv::new(candle_nn::conv2d(
                cfg.num_channels,
                h,
                cfg.patch_size,
                conv,
                vb.pp("patch_embeddings.projection"),
            )?),
            cls: vb.get((1, 1, h), "cls_token")?,
            position: vb.get((1, patches + 1, h), "position_embeddings")?,
            patch_size: cfg.patch_size,
        })
    }

    /// `pixels`: `[B, 3, S, S]`; returns `[B, 1 + N, H]`.
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let (s_h, s_w) = (pixels.dim(2)?, pixels.dim(3)?);
        let n = (s_h / self.patch_size) * (s_w / self.patch_size);
        if n + 1 != self.position.dim(1)? {
            candle_core::bail!("the classifier takes {} patches, got {s_h}x{s_w} pixels", self.position.dim(1)? - 1)
        }
        let patches = self.patch.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?; // [B, N, H]
        let cls = self.cls.broadcast_as((b, 1, self.cls.dim(2)?))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position)
    }
}

/// Multi-head self-attention with its output projection.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

impl Attention {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let qkv = |name: &str| {
            if cfg.qkv_bias {
                candle_nn::linear(h, h, vb.pp("attention").pp(name))
            } else {
                candle_nn::linear_no_bias(h, h, vb.pp("attention").pp(name))
            }
        };
        Ok(Self {
            q: qkv("query")?,
            k: qkv("key")?,
            v: qkv("value")?,
            o: candle_nn::linear(h, h, vb.pp("output.dense"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x`: `[B, L, H]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| t.reshape((b, l, self.heads, d))?.transpose(1, 2);
        let (q, k, v) = (split(self.q.forward(x)?)?, split(self.k.forward(x)?)?, split(self.v.forward(x)?)?);
        let context = scaled_dot_product_attention(&q, &k, &v, None, 1.0 / (d as f64).sqrt())?;
        self.o.forward(&context.transpose(1, 2)?.reshape((b, l, h))?)
    }
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
struct Layer {
    norm_before: LayerNorm,
    attention: Attention,
    norm_after: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Layer {
    fn new(cfg: &VitConfig, activation: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            norm_before: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layernorm_before"))?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            norm_after: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layernorm_after"))?,
            fc1: candle_nn::linear(h, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, h, vb.pp("output.dense"))?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention.forward(&self.norm_before.forward(x)?)?)?;
        let hidden = self.fc1.forward(&self.norm_after.forward(&x)?)?;
        let hidden = match self.activation {
            Activation::GeluErf => hidden.gelu_erf()?,
            Activation::GeluTanh => hidden.gelu()?,
            Activation::Relu => hidden.relu()?,
        };
        x + self.fc2.forward(&hidden)?
    }
}

/// A ViT image classifier.
#[derive(Debug, Clone)]
pub struct VitForImageClassification {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: LayerNorm,
    classifier: Linear,
}

impl VitForImageClassification {
    /// Builds the classifier from transformers' tensor names (`vit.*`, `classifier.*`).
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self, SafetyError> {
        cfg.validate()?;
        let activation = cfg.activation()?;
        let vit = vb.pp("vit");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, activation, vit.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vit.pp("embeddings"))?,
            layers,
            norm: candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vit.pp("layernorm"))?,
            classifier: candle_nn::linear(cfg.hidden_size, cfg.num_labels(), vb.pp("classifier"))?,
        })
    }

    /// `pixels`: `[B, 3, S, S]` preprocessed; returns the logits `[B, labels]` in f32.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, SafetyError> {
        let dtype = self.classifier.weight().dtype();
        let mut x = self.embeddings.forward(&pixels.to_dtype(dtype)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let cls = self.norm.forward(&x)?.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.classifier.forward(&cls)?.to_dtype(DType::F32)?)
    }
}

/// Softmax over the last dimension of f32 logits.
pub(crate) fn probabilities(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)
}
