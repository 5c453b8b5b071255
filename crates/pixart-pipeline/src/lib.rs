//! PixArt-Σ text-to-image generation with fal's `fal-ai/pixart-sigma` request and response
//! schema, reproducing diffusers' `PixArtSigmaPipeline` seed for seed.
//!
//! ```no_run
//! use pixart_pipeline::{GenerateRequest, LoadOptions, Pipeline, PipelineError, Steps};
//!
//! # fn main() -> Result<(), pixart_pipeline::PipelineError> {
//! // A local diffusers folder or a Hugging Face repo id.
//! let pipeline = Pipeline::load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", &LoadOptions::default())?;
//! let mut request = GenerateRequest::new("a small cactus with a happy face in the sahara desert");
//! request.seed = Some(42);
//! request.num_inference_steps = Steps::new(20).map_err(|e| PipelineError::Invalid(vec![e]))?;
//! let generation = pipeline.generate_with_progress(&request, |p| {
//!     eprintln!("step {}/{}", p.step, p.total);
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! if let Some(image) = generation.images.first() {
//!     let file_name = "cactus.png".to_string();
//!     std::fs::write(&file_name, image.to_png()?).map_err(|e| PipelineError::Store { file_name, source: e.into() })?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod caption;
pub mod field_error;
pub mod image;
pub mod model_source;
pub mod pipeline;
pub mod request;
pub mod response;
pub mod rng;
pub mod sizes;
pub mod styles;
pub mod text;
pub mod text_encoder;

pub use caption::CaptionError;
pub use image::RgbImage;
pub use model_source::{resolve_classifier, resolve_model, HubOptions, ModelError, DEFAULT_MODEL};
pub use pipeline::{Generation, LoadOptions, Pipeline, Stage, StageTimings, StepProgress};
pub use pixart_safety::{SafetyChecker, DEFAULT_SAFETY_CHECKER};
pub use pixart_t5::{QuantType, WeightSummary};
pub use request::{
    input_schema, Dimensions, FieldError, GenerateRequest, GuidanceScale, ImageSize, NumImages, PartialRequest,
    SchedulerKind, SizePreset, Steps, Style,
};
pub use response::{data_uri, GenerateResponse, ImageOutput, Timings};
pub use rng::TorchGenerator;
pub use sizes::{PixelSize, SizePlan};
pub use text_encoder::{Offload, TextEncoderOptions};

/// Errors from loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request is invalid; each entry names a field and what it allows.
    #[error("invalid request:{}", .0.iter().map(|e| format!("\n  - {e}")).collect::<String>())]
    Invalid(Vec<FieldError>),
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
    /// Encoding a PNG failed.
    #[error("cannot encode the image as PNG")]
    Png(#[from] ::image::ImageError),
    /// The caller's store callback could not keep an image.
    #[error("cannot store {file_name}")]
    Store {
        /// The image's file name.
        file_name: String,
        /// What the callback reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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

/// An error and its chain of causes on one line (`outer: cause: root cause`), for logs and
/// responses where `{:#}` formatting is not available.
pub fn error_report(error: &dyn std::error::Error) -> String {
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
