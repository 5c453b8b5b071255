//! What a generation reports while it runs (steps, stages) and what it returns.

use std::time::Duration;

use candle_core::Tensor;

use crate::image::RgbImage;

/// Progress of the denoising loop, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepProgress {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in total.
    pub total: usize,
    /// The timestep just run.
    pub timestep: u32,
    /// How long the step took (transformer, guidance, scheduler; the device synchronised).
    pub duration: Duration,
}

/// A stage of one generation, announced as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Tokenizing and T5 encoding (loading T5 first under sequential offload).
    TextEncoder,
    /// Preparing and VAE-encoding the input image (image-to-image and inpainting only).
    ImageEncode,
    /// The denoising loop.
    Denoise,
    /// VAE decoding.
    Vae,
    /// Resize/crop and conversion to 8-bit RGB.
    Postprocess,
    /// The safety checker (only when the images are checked).
    SafetyChecker,
}

impl Stage {
    /// The stage's name in reports (`text_encoder`, `image_encode`, `denoise`, `vae`,
    /// `postprocess`, `safety_checker`).
    pub fn name(self) -> &'static str {
        match self {
            Self::TextEncoder => "text_encoder",
            Self::ImageEncode => "image_encode",
            Self::Denoise => "denoise",
            Self::Vae => "vae",
            Self::Postprocess => "postprocess",
            Self::SafetyChecker => "safety_checker",
        }
    }
}

/// Wall-clock time of each stage of one generation (the device is synchronised at each
/// boundary, so GPU work is attributed to its stage).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StageTimings {
    /// Merging the generation's LoRAs into the transformer (zero without LoRAs, or when the
    /// same LoRAs were merged for the previous generation).
    pub lora_merge: Duration,
    /// Tokenizing the prompt and negative prompt.
    pub tokenize: Duration,
    /// Loading the text encoder for this generation (sequential offload only).
    pub text_encoder_load: Duration,
    /// T5 encoding (zero for prompts served from the cache).
    pub text_encoder: Duration,
    /// Resizing and VAE-encoding the input image, with the first random draws (zero without
    /// an input image).
    pub image_encode: Duration,
    /// Each denoising step (transformer, guidance, scheduler; the inpainting blend).
    pub steps: Vec<Duration>,
    /// VAE decoding.
    pub vae: Duration,
    /// Resize/crop and conversion to 8-bit RGB.
    pub postprocess: Duration,
    /// The safety checker over all the images (zero when not checked).
    pub safety_checker: Duration,
    /// Everything, from the call to its return.
    pub total: Duration,
}

impl StageTimings {
    /// The denoising loop: the sum of the steps.
    pub fn denoise(&self) -> Duration {
        self.steps.iter().sum()
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Generation {
    /// The pictures, in batch order, each exactly the requested size.
    pub images: Vec<RgbImage>,
    /// Per image: flagged by the safety checker (and replaced by a black image). All false when
    /// the images were not checked.
    pub has_nsfw_concepts: Vec<bool>,
    /// Whether the safety checker ran on these images.
    pub safety_checked: bool,
    /// The seed used (the parameters', or the one drawn when they had none).
    pub seed: u64,
    /// Time spent, stage by stage.
    pub timings: StageTimings,
    /// The final latents `[num_images, 4, h/8, w/8]` (f32), before VAE decoding.
    pub latents: Tensor,
}
