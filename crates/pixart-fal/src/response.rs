//! fal's output schema, and how a generation becomes one: PNG encoding, file names, data URIs
//! in sync mode, stored files otherwise.

use pixart_pipeline::{Generation, RgbImage};
use serde::{Deserialize, Serialize};

use crate::request::GenerateRequest;

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
    /// Text encoding, denoising, decoding and the safety checker together.
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
    /// Per image: whether the safety checker flagged it (and it was replaced by a black image);
    /// all false when the images were not checked.
    pub has_nsfw_concepts: Vec<bool>,
    /// The prompt as the request gave it.
    pub prompt: String,
}

/// An image could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the image as PNG")]
pub struct EncodeError(#[from] image::ImageError);

/// A response could not be built: an image failed to encode, or the caller's store could not
/// keep one.
#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The store callback failed.
    #[error("cannot store {file_name}")]
    Store {
        /// The image's file name.
        file_name: String,
        /// What the callback reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Encodes a picture as PNG.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, EncodeError> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        &image.pixels,
        image.width,
        image.height,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// A PNG as a `data:` URI.
pub fn data_uri(png: &[u8]) -> String {
    use base64::Engine;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

/// Builds fal's response to `request` from its generation. Images are named
/// `pixart-<seed>-<i>.png`; with `sync_mode` they are inlined as data URIs, otherwise each PNG
/// goes to `store(file_name, png)`, which keeps it somewhere and returns its URL.
pub fn respond(
    request: &GenerateRequest,
    generation: &Generation,
    mut store: impl FnMut(&str, &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<GenerateResponse, RespondError> {
    let mut images = Vec::with_capacity(generation.images.len());
    for (i, image) in generation.images.iter().enumerate() {
        let png = encode_png(image)?;
        let file_name = format!("pixart-{}-{i}.png", generation.seed);
        let url = if request.sync_mode {
            data_uri(&png)
        } else {
            store(&file_name, &png).map_err(|source| RespondError::Store { file_name: file_name.clone(), source })?
        };
        images.push(ImageOutput {
            url,
            content_type: "image/png".into(),
            file_name,
            file_size: png.len() as u64,
            width: image.width,
            height: image.height,
        });
    }
    Ok(GenerateResponse {
        images,
        timings: Timings { inference: generation.timings.total.as_secs_f64() },
        seed: generation.seed,
        has_nsfw_concepts: generation.has_nsfw_concepts.clone(),
        prompt: request.prompt.clone(),
    })
}
