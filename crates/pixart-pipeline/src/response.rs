//! fal's output schema.

use serde::{Deserialize, Serialize};

/// One image of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutput {
    /// Where the PNG is: a `file://`/`http(s)://` URL, or a `data:image/png;base64,…` URI in sync mode.
    pub url: String,
    /// Always `image/png`.
    pub content_type: String,
    /// The file name.
    pub file_name: String,
    /// The PNG's size in bytes.
    pub file_size: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Durations of the run, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Text encoding, denoising and decoding together.
    pub inference: f64,
}

/// A response as fal's `pixart-sigma` endpoint returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    /// The images, in batch order.
    pub images: Vec<ImageOutput>,
    /// Stage durations.
    pub timings: Timings,
    /// The seed used (the request's, or the one drawn when it had none).
    pub seed: u64,
    /// Per image: whether the safety checker flagged it. No checker runs yet: always false.
    pub has_nsfw_concepts: Vec<bool>,
    /// The prompt as the request gave it.
    pub prompt: String,
}

/// A PNG as a `data:` URI.
pub fn data_uri(png: &[u8]) -> String {
    use base64::Engine;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}
