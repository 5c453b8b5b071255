//! PixArt-Σ text-to-image generation with fal's `fal-ai/pixart-sigma` request and response
//! schema, reproducing diffusers' `PixArtSigmaPipeline` seed for seed.
//!
//! ```no_run
//! use pixart_pipeline::{GenerateRequest, LoadOptions, Pipeline};
//!
//! # fn main() -> Result<(), pixart_pipeline::PipelineError> {
//! // A local diffusers folder or a Hugging Face repo id.
//! let pipeline = Pipeline::load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", &LoadOptions::default())?;
//! let mut request = GenerateRequest::new("a small cactus with a happy face in the sahara desert");
//! request.seed = Some(42);
//! let generation = pipeline.generate_with_progress(&request, |p| {
//!     eprintln!("step {}/{}", p.step, p.total);
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! std::fs::write("cactus.png", generation.images[0].to_png()?).expect("writable");
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod caption;
pub mod image;
pub mod model_source;
pub mod pipeline;
pub mod request;
pub mod response;
pub mod rng;
pub mod sizes;
pub mod styles;
pub mod text;

pub use image::RgbImage;
pub use model_source::{resolve_model, HubOptions, DEFAULT_MODEL};
pub use pipeline::{Generation, LoadOptions, Pipeline, StageTimings, StepProgress};
pub use request::{FieldError, GenerateRequest, ImageSize, SchedulerKind};
pub use response::{data_uri, GenerateResponse, ImageOutput, Timings};
pub use rng::TorchGenerator;

/// Errors from loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request is invalid; each entry names a field and what it allows.
    #[error("invalid request:{}", .0.iter().map(|e| format!("\n  - {e}")).collect::<String>())]
    Invalid(Vec<FieldError>),
    /// The model could not be found or resolved.
    #[error("model: {0}")]
    Model(String),
    /// A weights or config file is missing or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The text encoder or tokenizer failed.
    #[error(transparent)]
    TextEncoder(#[from] pixart_t5::T5Error),
    /// The transformer failed.
    #[error(transparent)]
    Transformer(#[from] pixart_dit::DitError),
    /// The VAE failed.
    #[error(transparent)]
    Vae(#[from] pixart_vae::VaeError),
    /// The scheduler config is unsupported or stepping failed.
    #[error(transparent)]
    Scheduler(#[from] pixart_scheduler::SchedulerError),
    /// Encoding an image failed.
    #[error("image: {0}")]
    Image(String),
    /// The step callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
