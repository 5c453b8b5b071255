//! The transformer's `config.json` (diffusers' `PixArtTransformer2DModel`).

use serde::Deserialize;

use pixart_core::linear_bf16::CpuProducts;
use pixart_core::{ConfigCheck, UnsupportedConfig};

/// Hyper-parameters of a PixArt transformer, deserialised from `transformer/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct DitConfig {
    /// Attention heads (16 for XL-2).
    pub num_attention_heads: usize,
    /// Width of one head (72 for XL-2).
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Channels out (8: ε and the learned variance).
    pub out_channels: Option<usize>,
    /// Transformer blocks (28 for XL-2).
    pub num_layers: usize,
    /// Latent size the model was trained at (32/64/128/256); selects the bin table and the
    /// position-embedding base grid.
    pub sample_size: usize,
    /// Patch size (2).
    pub patch_size: usize,
    /// T5 width (4096).
    pub caption_channels: usize,
    /// Scale of the position grid (0.5/1/2/4).
    #[serde(default = "one")]
    pub interpolation_scale: f64,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Must be `ada_norm_single`.
    #[serde(default = "ada_norm_single")]
    pub norm_type: String,
    /// Must be false.
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    /// Must be `gelu-approximate`.
    #[serde(default = "gelu_approximate")]
    pub activation_fn: String,
    /// Biases on the attention projections.
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// Must be false or absent: see [`DitConfig::validate`].
    pub use_additional_conditions: Option<bool>,
    /// Must be `default`.
    #[serde(default = "default_attention")]
    pub attention_type: String,
    /// Not read from `config.json`: how the blocks' linear layers multiply on the CPU (set
    /// before building the model; [`CpuProducts::F32`] by default).
    #[serde(skip)]
    pub cpu_products: CpuProducts,
}

fn one() -> f64 {
    1.0
}
fn eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}
fn ada_norm_single() -> String {
    "ada_norm_single".into()
}
fn gelu_approximate() -> String {
    "gelu-approximate".into()
}
fn default_attention() -> String {
    "default".into()
}

impl DitConfig {
    /// The self-attention layer names diffusers gives the blocks
    /// (`transformer_blocks.{i}.attn1`), in order: what perturbed-attention guidance's layer
    /// patterns are matched against.
    pub fn self_attention_names(&self) -> Vec<String> {
        (0..self.num_layers).map(|i| format!("transformer_blocks.{i}.attn1")).collect()
    }

    /// Width of the token stream, heads × head width (1152 for XL-2).
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (defaults to the input channels, as diffusers does).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Refuses configs this implementation does not compute.
    ///
    /// `use_additional_conditions`: when the key is absent, diffusers turns it on for
    /// `sample_size == 128` (right for PixArt-α 1024, whose weights have resolution and
    /// aspect-ratio embedders). PixArt-Σ checkpoints have no such embedders, so absent means false
    /// here; an explicit `true` is refused (the model would need weights Σ does not have).
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the MSRV is 1.85
    pub fn validate(&self) -> Result<(), UnsupportedConfig> {
        let bad = |field: &str, value: &dyn std::fmt::Display, supported: &str| {
            Err(UnsupportedConfig::new(field, value, supported))
        };
        if self.norm_type != "ada_norm_single" {
            return bad("norm_type", &self.norm_type, "ada_norm_single");
        }
        if self.norm_elementwise_affine {
            return bad("norm_elementwise_affine", &true, "false");
        }
        if self.activation_fn != "gelu-approximate" {
            return bad("activation_fn", &self.activation_fn, "gelu-approximate");
        }
        if self.attention_type != "default" {
            return bad("attention_type", &self.attention_type, "default");
        }
        if self.use_additional_conditions == Some(true) {
            return bad("use_additional_conditions", &true, "false (PixArt-Σ)");
        }
        ConfigCheck::dimension("num_attention_heads", self.num_attention_heads)?;
        ConfigCheck::dimension("attention_head_dim", self.attention_head_dim)?;
        ConfigCheck::dimension("in_channels", self.in_channels)?;
        if let Some(out) = self.out_channels {
            if out != self.in_channels && out != 2 * self.in_channels {
                return bad("out_channels", &out, "in_channels, or twice in_channels (learned variance)");
            }
        }
        ConfigCheck::dimension("caption_channels", self.caption_channels)?;
        ConfigCheck::dimension("sample_size", self.sample_size)?;
        ConfigCheck::within("num_layers", self.num_layers, 0, 1024)?;
        ConfigCheck::within("patch_size", self.patch_size, 1, 64)?;
        ConfigCheck::finite_positive("interpolation_scale", self.interpolation_scale, false)?;
        ConfigCheck::finite_positive("norm_eps", self.norm_eps, true)?;
        if self.hidden_size() % 4 != 0 {
            return bad("num_attention_heads × attention_head_dim", &self.hidden_size(), "a multiple of 4");
        }
        if self.patch_size == 0 || self.sample_size % self.patch_size != 0 {
            return bad("patch_size", &self.patch_size, "a positive divisor of sample_size");
        }
        Ok(())
    }
}
