//! Shared plumbing for the PixArt-Σ engine.
//!
//! Every model part (T5 encoder, transformer, VAE) loads its weights the same way: from a
//! diffusers-layout sub-folder holding either one `*.safetensors` file or several shards listed by
//! a `*.safetensors.index.json`. [`weights`] finds and validates those files and reads configs.

#![warn(missing_docs)]

pub mod activation;
pub mod attention;
mod attention_cpu;
#[cfg(target_arch = "x86_64")]
mod attention_x86;
mod buffers;
pub mod config_error;
pub mod conv;
pub mod conv_cpu;
pub mod conv_winograd;
pub mod fast_math;
mod gemm_cpu;
pub mod group_norm;
pub mod linear_bf16;
pub mod linear_f16;
pub mod linear_f32;
pub mod modulation;
mod packed_linear;
pub mod weights;

pub use config_error::{ConfigCheck, UnsupportedConfig};
pub use weights::{load_checked_config, load_config, python_json, var_builder, ModelWeights, ShardIndex, WeightsError};
