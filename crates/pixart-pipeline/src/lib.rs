//! The PixArt-Σ engine: loads a diffusers-layout model (or a Hugging Face repo id) and generates
//! images from [`GenerationParams`], step for step and seed for seed as diffusers'
//! `PixArtSigmaPipeline`.
//!
//! It takes typed parameters and returns pictures ([`RgbImage`]), the safety checker's flags,
//! the seed and timings: no request format, no file format, no URLs. fal's schema (JSON
//! requests, styles, responses, PNG/data-URI encoding) is the `pixart-fal` crate's; fal's HTTP
//! API is `pixart-server`'s.
//!
//! ```no_run
//! use pixart_pipeline::{GenerationParams, LoadOptions, Pipeline};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A local diffusers folder or a Hugging Face repo id.
//! let pipeline = Pipeline::load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", &LoadOptions::default())?;
//! let params = GenerationParams::new("a small cactus with a happy face in the sahara desert")
//!     .with_steps(20)
//!     .with_seed(42);
//! let generation = pipeline.generate_with_progress(&params, |p| {
//!     eprintln!("step {}/{}", p.step, p.total);
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! let image = &generation.images[0]; // 8-bit RGB, 1024×1024
//! println!("seed {}: {}x{} in {:?}", generation.seed, image.width, image.height, generation.timings.total);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod caption;
pub mod generation;
pub mod image;
pub mod image_start;
pub mod input_image;
pub mod invalid_parameter;
pub mod load_options;
pub mod model_source;
pub mod pag;
pub mod params;
pub mod pipeline;
mod prompt_cache;
pub mod resample;
pub mod rng;
pub mod sizes;
pub mod text;
pub mod text_encoder;
mod transformer_slot;

pub use caption::CaptionError;
pub use generation::{Generation, Stage, StageTimings, StepProgress};
pub use image::RgbImage;
pub use invalid_parameter::InvalidParameter;
pub use load_options::LoadOptions;
pub use model_source::{resolve_classifier, resolve_model, HubOptions, ModelError, DEFAULT_MODEL};
pub use params::{GenerationParams, LoraUse, Sampler};
pub use pipeline::Pipeline;
pub use pixart_dit::{Bf16Kernel, CpuProducts, Layout, Lora, LoraError};
pub use pixart_safety::{SafetyChecker, DEFAULT_SAFETY_CHECKER};
pub use pixart_t5::{QuantType, WeightSummary};
pub use rng::TorchGenerator;
pub use sizes::{Dimensions, PixelSize, SizePlan};
pub use text_encoder::{Offload, TextEncoderOptions};

/// Errors from loading a model or generating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A parameter this model cannot run with; nothing was computed.
    #[error("invalid parameter {0}")]
    InvalidParameter(#[from] InvalidParameter),
    /// The model could not be found or fetched.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A weights or config file is missing or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The model's parts do not fit together (e.g. the T5 width is not the transformer's
    /// caption width), or a config asks for something not implemented.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// The text encoder or tokenizer failed.
    #[error(transparent)]
    TextEncoder(#[from] pixart_t5::T5Error),
    /// The transformer failed.
    #[error(transparent)]
    Transformer(#[from] pixart_dit::DitError),
    /// The VAE failed.
    #[error(transparent)]
    Vae(#[from] pixart_vae::VaeError),
    /// The safety checker could not be found or loaded. Running without it has to be asked for
    /// (no checker in [`LoadOptions::safety_checker`]): images are never silently unchecked.
    #[error("the safety checker {checker} could not be loaded")]
    SafetyCheckerUnavailable {
        /// The repo id or folder asked for.
        checker: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The safety checker failed on the images.
    #[error(transparent)]
    Safety(#[from] pixart_safety::SafetyError),
    /// The scheduler config is unsupported or stepping failed.
    #[error(transparent)]
    Scheduler(#[from] pixart_scheduler::SchedulerError),
    /// An internal invariant does not hold (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
    /// The step callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// An error and its chain of causes on one line (`outer: cause: root cause`, a cause whose text
/// its parent already ends with said once), for logs and responses where `{:#}` formatting is
/// not available.
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut report = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !report.ends_with(&text) {
            report.push_str(": ");
            report.push_str(&text);
        }
        source = cause.source();
    }
    report
}
