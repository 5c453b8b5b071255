//! The SDXL VAE PixArt-Σ uses: the decoder (diffusers' `AutoencoderKL.decode`), and the encoder
//! image input runs through (`AutoencoderKL.encode`, [`VaeEncoder`] and its
//! [`DiagonalGaussian`] posterior). Decoding:
//!
//! ```text
//! z = latents / scaling_factor (+ shift_factor)
//! post_quant_conv 1×1 → conv_in → mid (ResNet, 1-head attention, ResNet)
//!   → up blocks (layers_per_block+1 ResNets each, nearest 2× + conv on all but the last)
//!   → GroupNorm → SiLU → conv_out                                     [B, 3, 8h, 8w] in [−1, 1]
//! ```
//!
//! GroupNorm statistics run in f32 whatever the weights' dtype, so bf16 stays finite on
//! large-magnitude latents.

#![warn(missing_docs)]

mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod posterior;

pub use config::VaeConfig;
pub use decoder::VaeDecoder;
pub use encoder::VaeEncoder;
pub use posterior::DiagonalGaussian;

/// Errors from loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A weights or config file is missing, unreadable or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The checkpoint's config asks for something this implementation does not compute.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// Latents or images of the wrong shape.
    #[error("invalid VAE input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
