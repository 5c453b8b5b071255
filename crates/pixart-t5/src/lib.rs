//! The T5 v1.1 text encoder and its sentencepiece tokenizer, as PixArt-Σ uses them.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use pixart_t5::{T5Encoder, T5Tokenizer, MAX_SEQUENCE_LENGTH};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = std::path::Path::new("PixArt-Sigma-XL-2-1024-MS");
//! let tokenizer = T5Tokenizer::from_dir(&model.join("tokenizer"))?;
//! let encoder = T5Encoder::load(&model.join("text_encoder"), DType::BF16, &Device::Cpu)?;
//! let tokens = tokenizer.encode_padded("a small cactus with a happy face", MAX_SEQUENCE_LENGTH)?;
//! let ids = Tensor::new(tokens.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
//! let mask = Tensor::new(tokens.mask.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
//! let states = encoder.forward(&ids, Some(&mask))?; // [1, 300, 4096]
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod encoder;
pub mod error;
mod ggml_blocks;
pub mod normalizer;
mod panel_matmul;
pub mod quantized;
mod source;
pub mod spiece;
pub mod tokenizer;

pub use config::T5Config;
pub use encoder::{T5Encoder, T5LoadOptions, T5WeightsFile};
pub use error::{GgufError, SpieceError, T5Error};
pub use quantized::{QuantType, UnknownQuantType, WeightSummary};
pub use source::llama_cpp_name;
pub use tokenizer::{PaddedTokens, T5Tokenizer};

/// The caption length PixArt-Σ tokenizes to (prompts are truncated to 299 tokens plus `</s>`).
pub const MAX_SEQUENCE_LENGTH: usize = 300;
