//! The PixArt-Σ diffusion transformer (diffusers' `PixArtTransformer2DModel`, XL-2):
//!
//! ```text
//! x = conv p×p/s p (latents) + 2-D sin-cos position embedding        [B, N, D]
//! t6, emb = adaLN-single(timestep)                                    [B, 6D], [B, D]
//! y = Linear → GELU(tanh) → Linear (T5 states)                        [B, L, D]
//! per block: x += g_msa · SelfAttn(LN(x)(1+c_msa)+s_msa)
//!            x += CrossAttn(x, y, caption mask)
//!            x += g_mlp · FF(LN(x)(1+c_mlp)+s_mlp)
//! out = proj_out(LN(x)(1+scale)+shift) → unpatchify                   [B, 8, H, W]
//! ```

#![warn(missing_docs)]

pub mod attention;
pub mod block;
pub mod config;
pub mod embeddings;
pub mod linear;
pub mod lora;
pub mod model;
pub mod original_layout;
pub mod shared_rows;
pub mod weights;

pub use config::DitConfig;
pub use linear::DitLinear;
pub use lora::{Lora, LoraError};
pub use model::{DitTrace, Perturbation, PixArtTransformer, PreparedCaption, PreparedTimestep, PreparedTimesteps};
pub use pixart_core::linear_bf16::{Bf16Kernel, CpuProducts};
pub use weights::{Layout, TransformerWeights};

/// Errors from loading or running the transformer.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    /// A weights or config file is missing, unreadable or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The checkpoint's config asks for something this implementation does not compute.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// Inputs of the wrong shape.
    #[error("invalid transformer input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
