//! The VAE's `config.json` (diffusers' `AutoencoderKL`), reduced to what encoding and decoding use.

use serde::Deserialize;

use pixart_core::linear_bf16::CpuProducts;
use pixart_core::{ConfigCheck, UnsupportedConfig};

/// The most resolution levels a VAE may have (SDXL's has 4; each level doubles the size).
pub const MAX_LEVELS: usize = 8;

/// Hyper-parameters of the VAE, deserialised from `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Channels per resolution level, encoder order ([128, 256, 512, 512] for SDXL).
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level; the decoder has one more.
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Latent channels (4).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Image channels the encoder takes (3).
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// GroupNorm groups (32).
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (0.13025 for SDXL).
    #[serde(default = "sdxl_scale")]
    pub scaling_factor: f64,
    /// Added after scaling, when set.
    pub shift_factor: Option<f64>,
    /// Whether a 1×1 `quant_conv` follows the encoder.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Must be `silu`.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Must all be `UpDecoderBlock2D`.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Must all be `DownEncoderBlock2D`.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Whether the VAE must run in f32 when f16 is asked for (diffusers' `force_upcast`, true by
    /// default and in the SDXL VAE, whose activations overflow f16). bf16 has f32's range and
    /// is kept. A deliberate difference: diffusers' SDXL pipelines honour this flag, its
    /// `PixArtSigmaPipeline` does not (it decodes in the pipeline's dtype, so f16 can overflow
    /// to NaN there); here an f16 request gets a finite image.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Not read from `config.json`: how the 3×3 convolutions multiply on the CPU (set before
    /// building; f32 by default).
    #[serde(skip)]
    pub cpu_products: CpuProducts,
}

fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sdxl_scale() -> f64 {
    0.13025
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl VaeConfig {
    /// The spatial factor between latents and pixels, `2^(levels − 1)` (8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// The dtype the VAE computes in when `requested` is asked for: f32 instead of f16 under
    /// [`Self::force_upcast`], `requested` otherwise.
    pub fn compute_dtype(&self, requested: candle_core::DType) -> candle_core::DType {
        if self.force_upcast && requested == candle_core::DType::F16 {
            candle_core::DType::F32
        } else {
            requested
        }
    }

    /// Refuses configs this decoder does not compute, naming the first field at fault.
    pub fn validate(&self) -> Result<(), UnsupportedConfig> {
        if self.act_fn != "silu" {
            return Err(UnsupportedConfig::new("act_fn", &self.act_fn, "silu"));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(UnsupportedConfig::new("up_block_types", other, "UpDecoderBlock2D"));
        }
        if let Some(other) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(UnsupportedConfig::new("down_block_types", other, "DownEncoderBlock2D"));
        }
        ConfigCheck::dimension("norm_num_groups", self.norm_num_groups)?;
        ConfigCheck::dimension("latent_channels", self.latent_channels)?;
        ConfigCheck::dimension("in_channels", self.in_channels)?;
        ConfigCheck::dimension("out_channels", self.out_channels)?;
        ConfigCheck::within("layers_per_block", self.layers_per_block, 0, 64)?;
        ConfigCheck::within("block_out_channels (levels)", self.block_out_channels.len(), 1, MAX_LEVELS)?;
        let fits = |c: usize| {
            (1..=pixart_core::config_error::MAX_DIMENSION).contains(&c) && c.is_multiple_of(self.norm_num_groups)
        };
        if !self.block_out_channels.iter().all(|&c| fits(c)) {
            return Err(UnsupportedConfig::new(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                format!("multiples of norm_num_groups ({}) up to 2^20", self.norm_num_groups),
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(UnsupportedConfig::new("scaling_factor", self.scaling_factor, "a finite non-zero number"));
        }
        if let Some(shift) = self.shift_factor.filter(|s| !s.is_finite()) {
            return Err(UnsupportedConfig::new("shift_factor", shift, "a finite number or null"));
        }
        Ok(())
    }
}
