//! fal's output schema, and how a generation becomes one: PNG or JPEG encoding, file names,
//! data URIs in sync mode, stored files otherwise.

use pixart_pipeline::{Generation, RgbImage};
use serde::{Deserialize, Serialize};

use crate::request::GenerateRequest;
use crate::values::OutputFormat;

/// One image of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutput {
    /// Where the image is: a `file://`/`http(s)://` URL, or a `data:image/…;base64,…` URI in
    /// sync mode.
    pub url: String,
    /// `image/png` or `image/jpeg`, as `output_format` asked.
    pub content_type: String,
    /// The file name.
    pub file_name: String,
    /// The encoded file's size in bytes.
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
#[error("cannot encode the image")]
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

/// Encodes a picture with `encoder` into `out`.
fn encode_into(image: &RgbImage, encoder: impl image::ImageEncoder) -> Result<(), EncodeError> {
    Ok(encoder.write_image(&image.pixels, image.width, image.height, image::ExtendedColorType::Rgb8)?)
}

/// Encodes a picture as PNG.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(image, image::codecs::png::PngEncoder::new(&mut out))?;
    Ok(out)
}

/// Encodes a picture in `format` (JPEG at [`OutputFormat::JPEG_QUALITY`]).
pub fn encode_image(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, EncodeError> {
    match format {
        OutputFormat::Png => encode_png(image),
        OutputFormat::Jpeg => {
            let mut out = Vec::new();
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, OutputFormat::JPEG_QUALITY);
            encode_into(image, encoder)?;
            Ok(out)
        }
    }
}

/// A file's bytes as a `data:` URI of `content_type`.
pub fn data_uri(content_type: &str, bytes: &[u8]) -> String {
    use base64::Engine;
    format!("data:{content_type};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Builds fal's response to `request` from its generation. Images are encoded as
/// `output_format` asks and named `pixart-<seed>-<i>.png` (`.jpg`); with `sync_mode` they are
/// inlined as data URIs, otherwise each file goes to `store(file_name, bytes)`, which keeps it
/// somewhere and returns its URL.
pub fn respond(
    request: &GenerateRequest,
    generation: &Generation,
    mut store: impl FnMut(&str, &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<GenerateResponse, RespondError> {
    let mut images = Vec::with_capacity(generation.images.len());
    let format = request.output_format;
    for (i, image) in generation.images.iter().enumerate() {
        let bytes = encode_image(image, format)?;
        let file_name = format!("pixart-{}-{i}.{}", generation.seed, format.extension());
        let url = if request.sync_mode {
            data_uri(format.content_type(), &bytes)
        } else {
            store(&file_name, &bytes).map_err(|source| RespondError::Store { file_name: file_name.clone(), source })?
        };
        images.push(ImageOutput {
            url,
            content_type: format.content_type().into(),
            file_name,
            file_size: bytes.len() as u64,
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
