//! What one generation is asked to do: typed parameters with diffusers' `PixArtSigmaPipeline`
//! defaults, and the error that names a parameter a model cannot run.

use std::sync::Arc;

use pixart_dit::Lora;

use crate::image::RgbImage;
use crate::invalid_parameter::InvalidParameter;
use crate::sizes::Dimensions;

/// A LoRA and the scale it is applied at (negative scales subtract it; 0 leaves the model as is).
#[derive(Debug, Clone)]
pub struct LoraUse {
    /// The LoRA, read once and shared.
    pub lora: Arc<Lora>,
    /// Its scale.
    pub scale: f64,
}

impl PartialEq for LoraUse {
    fn eq(&self, other: &Self) -> bool {
        self.lora.digest() == other.lora.digest() && self.scale == other.scale
    }
}

/// The sampler of the denoising loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Sampler {
    /// DPM-Solver++ 2M, the model repo's `scheduler_config.json` (the default).
    #[default]
    DpmSolver,
    /// SA-Solver as the official PixArt-Σ demo configures it (on the same config).
    SaSolver,
}

/// The parameters of one generation. Build with [`GenerationParams::new`] and the `with_*`
/// methods; every field is public to read and change.
///
/// ```
/// use pixart_pipeline::{GenerationParams, Sampler};
/// let params = GenerationParams::new("a red fox").with_size(768, 512)?.with_steps(20).with_seed(7)
///     .with_sampler(Sampler::SaSolver);
/// assert_eq!((params.size.width(), params.steps), (768, 20));
/// # Ok::<(), pixart_pipeline::InvalidParameter>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GenerationParams {
    /// The prompt, as the text encoder gets it (a style template is the caller's business).
    pub prompt: String,
    /// What to steer away from (the unconditional half of classifier-free guidance).
    pub negative_prompt: String,
    /// The output size; the output always has exactly this size (see [`crate::sizes`]).
    pub size: Dimensions,
    /// Denoising steps: from 1 to the scheduler's training timesteps (1000 for the published
    /// checkpoints). Default 20, as diffusers.
    pub steps: u32,
    /// The sampler.
    pub sampler: Sampler,
    /// Classifier-free guidance scale, a finite number ≥ 0; ≤ 1 turns guidance off (as diffusers
    /// decides). Default 4.5.
    pub guidance_scale: f64,
    /// Seed of the CPU generator the noise is drawn from (torch's); random when `None`, and
    /// returned in [`crate::Generation::seed`].
    pub seed: Option<u64>,
    /// Images, drawn as one noise batch (at least 1). Default 1.
    pub num_images: u32,
    /// Whether the safety checker runs: `None` runs it when one was loaded; `Some(true)` without
    /// one loaded is refused ([`InvalidParameter`] naming `safety_check`).
    pub safety_check: Option<bool>,
    /// LoRAs merged into the transformer for this generation only (their changes add up); the
    /// model is left as it was. One that does not fit the model is refused naming `loras[i]`.
    pub loras: Vec<LoraUse>,
    /// Image-to-image: the picture to start from (resized to the generated size, encoded, and
    /// noised to the first step run); with [`Self::mask`], inpainting. Default none.
    pub image: Option<Arc<RgbImage>>,
    /// How much of [`Self::image`] is repainted, from 0 to 1 (diffusers' `strength`): the run
    /// takes the last `⌊steps · strength⌋` of the steps (at least one). Default 0.8.
    pub strength: f64,
    /// Inpainting: white (≥ ½ after the grayscale conversion) repaints, black keeps; resized to
    /// the generated size like the image, whatever its own size. Needs [`Self::image`].
    pub mask: Option<Arc<RgbImage>>,
    /// Perturbed-attention guidance's scale, a finite number ≥ 0; 0 (the default) is off.
    pub pag_scale: f64,
    /// The self-attention layers perturbed-attention guidance perturbs: regular expressions
    /// searched in diffusers' layer names (`transformer_blocks.{i}.attn1`), as diffusers'
    /// `pag_applied_layers` (see [`crate::pag::select_blocks`]). Default `["blocks.1"]`.
    pub pag_layers: Vec<String>,
}

impl GenerationParams {
    /// diffusers' default number of steps.
    pub const DEFAULT_STEPS: u32 = 20;
    /// diffusers' default guidance scale.
    pub const DEFAULT_GUIDANCE_SCALE: f64 = 4.5;
    /// The default strength of image-to-image.
    pub const DEFAULT_STRENGTH: f64 = 0.8;
    /// diffusers' default layers of perturbed-attention guidance (`PixArtSigmaPAGPipeline`).
    pub const DEFAULT_PAG_LAYER: &'static str = "blocks.1";

    /// The prompt with every other parameter at its default: 1024×1024, 20 steps of
    /// DPM-Solver++, guidance 4.5, a random seed, one image, checked when a checker is loaded.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            size: Dimensions::DEFAULT,
            steps: Self::DEFAULT_STEPS,
            sampler: Sampler::default(),
            guidance_scale: Self::DEFAULT_GUIDANCE_SCALE,
            seed: None,
            num_images: 1,
            safety_check: None,
            loras: Vec::new(),
            image: None,
            strength: Self::DEFAULT_STRENGTH,
            mask: None,
            pag_scale: 0.0,
            pag_layers: vec![Self::DEFAULT_PAG_LAYER.to_string()],
        }
    }

    /// Image-to-image from `image` at `strength`; the output size becomes the image's (set
    /// another with [`Self::with_size`] afterwards). An image a side of which is outside
    /// [`Dimensions::MIN`]..=[`Dimensions::MAX`] is refused naming `image` (give a size after).
    pub fn with_image(mut self, image: Arc<RgbImage>, strength: f64) -> Result<Self, InvalidParameter> {
        self.size = Dimensions::new(image.width, image.height).map_err(|_| {
            InvalidParameter::new(
                "image",
                format!(
                    "is {}x{}: without a size the output takes the image's, whose sides must be from {} to {} \
                     pixels; give a size",
                    image.width,
                    image.height,
                    Dimensions::MIN,
                    Dimensions::MAX
                ),
            )
        })?;
        self.image = Some(image);
        self.strength = strength;
        Ok(self)
    }

    /// Inpainting with this mask (with [`Self::with_image`]).
    pub fn with_mask(mut self, mask: Arc<RgbImage>) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Perturbed-attention guidance at `scale` on the layers `layers` selects.
    pub fn with_pag(mut self, scale: f64, layers: Vec<String>) -> Self {
        self.pag_scale = scale;
        self.pag_layers = layers;
        self
    }

    /// Whether perturbed-attention guidance runs (a positive scale and at least one layer
    /// pattern), as diffusers decides.
    pub fn perturbs(&self) -> bool {
        self.pag_scale > 0.0 && !self.pag_layers.is_empty()
    }

    /// With a LoRA at `scale` (after those already added).
    pub fn with_lora(mut self, lora: Arc<Lora>, scale: f64) -> Self {
        self.loras.push(LoraUse { lora, scale });
        self
    }

    /// With this negative prompt.
    pub fn with_negative_prompt(mut self, negative_prompt: impl Into<String>) -> Self {
        self.negative_prompt = negative_prompt.into();
        self
    }

    /// With this output size; each side from [`Dimensions::MIN`] to [`Dimensions::MAX`].
    pub fn with_size(mut self, width: u32, height: u32) -> Result<Self, InvalidParameter> {
        self.size = Dimensions::new(width, height)?;
        Ok(self)
    }

    /// With this many denoising steps.
    pub fn with_steps(mut self, steps: u32) -> Self {
        self.steps = steps;
        self
    }

    /// With this sampler.
    pub fn with_sampler(mut self, sampler: Sampler) -> Self {
        self.sampler = sampler;
        self
    }

    /// With this guidance scale.
    pub fn with_guidance_scale(mut self, guidance_scale: f64) -> Self {
        self.guidance_scale = guidance_scale;
        self
    }

    /// With this seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// With this many images.
    pub fn with_num_images(mut self, num_images: u32) -> Self {
        self.num_images = num_images;
        self
    }

    /// Running the safety checker (`true`) or not (`false`).
    pub fn with_safety_check(mut self, check: bool) -> Self {
        self.safety_check = Some(check);
        self
    }

    /// Whether classifier-free guidance runs (scale > 1), as diffusers decides.
    pub fn guides(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// Refuses what no model runs; what depends on the model is checked by the pipeline.
    pub(crate) fn check(&self) -> Result<(), InvalidParameter> {
        if self.steps == 0 {
            return Err(InvalidParameter::new("steps", "must be at least 1"));
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(InvalidParameter::new("guidance_scale", "must be a finite number ≥ 0"));
        }
        if self.num_images == 0 {
            return Err(InvalidParameter::new("num_images", "must be at least 1"));
        }
        if let Some(i) = self.loras.iter().position(|l| !l.scale.is_finite()) {
            return Err(InvalidParameter::new(format!("loras[{i}]"), "the scale must be a finite number"));
        }
        if !(0.0..=1.0).contains(&self.strength) {
            return Err(InvalidParameter::new("strength", "must be a number from 0 to 1"));
        }
        if let Some(empty) = [("image", &self.image), ("mask", &self.mask)]
            .into_iter()
            .find(|(_, image)| image.as_ref().is_some_and(|i| i.width == 0 || i.height == 0))
        {
            return Err(InvalidParameter::new(empty.0, "is an empty picture"));
        }
        if self.mask.is_some() && self.image.is_none() {
            return Err(InvalidParameter::new("mask", "needs an image to inpaint: give the image too"));
        }
        if !(self.pag_scale.is_finite() && self.pag_scale >= 0.0) {
            return Err(InvalidParameter::new("pag_scale", "must be a finite number ≥ 0"));
        }
        Ok(())
    }
}
