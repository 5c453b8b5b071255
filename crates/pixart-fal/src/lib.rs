//! fal's `fal-ai/pixart-sigma` schema over the PixArt-Σ engine ([`pixart_pipeline`]).
//!
//! - [`GenerateRequest`]: the request, parsed from JSON with every invalid field reported at once
//!   ([`FieldError`], pydantic's error kinds) or built in code; [`PartialRequest`] for a file
//!   plus command-line flags; [`GenerateRequest::to_params`] turns it into the engine's
//!   parameters (the style applied).
//! - [`FIELDS`]: each request field declared once, read by the parser, the command line's flags,
//!   [`input_schema`] and [`fields_table`] (the docs).
//! - [`respond`]: a generation as fal's [`GenerateResponse`] (PNG or JPEG files, or data URIs).
//! - [`decode_image`]: an input picture (PNG, JPEG, WebP) from untrusted bytes, within limits.
//! - [`validation_body`]: fal's 422 body; [`invalid_fields`]: the engine's refusals as fields.
//!
//! ```no_run
//! use pixart_fal::{respond, GenerateRequest};
//! use pixart_pipeline::{LoadOptions, Pipeline};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let request = GenerateRequest::from_json(r#"{"prompt": "a red fox", "style": "Anime", "seed": 7}"#)
//!     .map_err(pixart_fal::InvalidRequest)?;
//! let pipeline = Pipeline::load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", &LoadOptions::default())?;
//! let generation = pipeline.generate(&request.to_params())?;
//! let response = respond(&request, &generation, |name, png| {
//!     std::fs::write(name, png)?;
//!     Ok(format!("file:///tmp/{name}"))
//! })?;
//! println!("{}", serde_json::to_string_pretty(&response)?);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod engine_errors;
pub mod field_error;
pub mod field_value;
pub mod image_decode;
pub mod image_size;
pub mod image_url;
pub mod loras;
pub mod request;
pub mod response;
pub mod schema;
pub mod styles;
pub mod values;

pub use engine_errors::{field_of, invalid_fields};
pub use field_error::{validation_body, ErrorKind, FieldError, InvalidRequest};
pub use field_value::FieldValue;
pub use image_decode::{data_uri_bytes, decode_image, DecodeLimits, ImageDecodeError};
pub use image_size::{ImageSize, SizePreset};
pub use image_url::ImageUrl;
pub use loras::LoraWeight;
pub use request::{FieldSpec, GenerateRequest, InputPictures, PartialRequest, FIELDS};
pub use response::{
    data_uri, encode_image, encode_png, respond, EncodeError, GenerateResponse, ImageOutput, RespondError, Timings,
};
pub use schema::{fields_table, input_schema};
pub use styles::Style;
pub use values::{GuidanceScale, NumImages, OutputFormat, PagLayers, PagScale, SchedulerKind, Steps, Strength};
