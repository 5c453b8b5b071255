//! The safety checker fal runs on every PixArt-Σ output (its image toolkit's
//! `safety_checker_version` 2): `Falconsai/nsfw_image_detection`, a ViT-base/16 image classifier
//! at 224² with the labels `normal` and `nsfw`. An image is flagged when softmax p(nsfw) > 0.5.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use pixart_safety::{RgbView, SafetyChecker};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let checker = SafetyChecker::load(std::path::Path::new("nsfw_image_detection"), DType::F32, &Device::Cpu)?;
//! let pixels = vec![0u8; 64 * 48 * 3];
//! let verdicts = checker.check(&[RgbView { width: 64, height: 48, pixels: &pixels }])?;
//! println!("p(nsfw) = {}, flagged: {}", verdicts[0].nsfw_probability, verdicts[0].flagged);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod checker;
pub mod config;
pub mod error;
pub mod preprocess;
pub mod vit;

pub use checker::{RgbView, SafetyChecker, Verdict, NSFW_THRESHOLD};
pub use config::{PreprocessorConfig, VitConfig};
pub use error::SafetyError;
pub use preprocess::{pil_bilinear_resize, Preprocessor};
pub use vit::VitForImageClassification;

/// The checker fal runs by default.
pub const DEFAULT_SAFETY_CHECKER: &str = "Falconsai/nsfw_image_detection";
