//! Loading a model and generating images, step for step as diffusers' `PixArtSigmaPipeline`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pixart_dit::PixArtTransformer;
use pixart_scheduler::{DpmSolverMultistep, SaSolver, Scheduler, SchedulerConfig};
use pixart_t5::{T5Encoder, T5Tokenizer, MAX_SEQUENCE_LENGTH};
use pixart_vae::VaeDecoder;

use crate::caption::clean_caption;
use crate::image::{resize_and_crop, to_rgb8, RgbImage};
use crate::model_source::{resolve_model, HubOptions};
use crate::request::{GenerateRequest, SchedulerKind};
use crate::response::{GenerateResponse, ImageOutput, Timings};
use crate::rng::TorchGenerator;
use crate::sizes::AspectRatioBins;
use crate::text::lower_strip;
use crate::PipelineError;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to run.
    pub device: Device,
    /// Compute dtype: f32, bf16 or f16. In f16 the VAE runs in f32 (the SDXL VAE overflows in
    /// f16, which is why diffusers' config sets `force_upcast`) and T5 keeps its `wo` in f32.
    pub dtype: DType,
    /// Hub resolution for repo ids.
    pub hub: HubOptions,
    /// Clean prompts as diffusers does with `clean_caption=True` ([`crate::caption`]) instead of
    /// only lowercasing and stripping them (`clean_caption=False`, the default here).
    pub clean_caption: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, hub: HubOptions::from_env(), clean_caption: false }
    }
}

/// Progress of the denoising loop, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in total.
    pub total: usize,
    /// The timestep just run.
    pub timestep: u32,
}

/// The result of one request, before the images are stored anywhere.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The pictures, in batch order.
    pub images: Vec<RgbImage>,
    /// The seed used.
    pub seed: u64,
    /// The request's prompt.
    pub prompt: String,
    /// Per image: flagged by a safety checker. No checker runs yet: all false.
    pub has_nsfw_concepts: Vec<bool>,
    /// Seconds spent from text encoding to the last decoded image.
    pub inference_seconds: f64,
}

impl Generation {
    /// Builds fal's response, handing each PNG to `store`, which returns `(url, file_name)`.
    pub fn into_response(
        self,
        mut store: impl FnMut(usize, &RgbImage, &[u8]) -> Result<(String, String), PipelineError>,
    ) -> Result<GenerateResponse, PipelineError> {
        let mut images = Vec::with_capacity(self.images.len());
        for (i, image) in self.images.iter().enumerate() {
            let png = image.to_png()?;
            let (url, file_name) = store(i, image, &png)?;
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
            timings: Timings { inference: self.inference_seconds },
            seed: self.seed,
            has_nsfw_concepts: self.has_nsfw_concepts,
            prompt: self.prompt,
        })
    }
}

/// A loaded PixArt-Σ model: tokenizer, T5 encoder, transformer, VAE decoder and scheduler config.
#[derive(Debug)]
pub struct Pipeline {
    tokenizer: T5Tokenizer,
    text_encoder: T5Encoder,
    transformer: PixArtTransformer,
    vae: VaeDecoder,
    scheduler_config: SchedulerConfig,
    bins: Option<AspectRatioBins>,
    device: Device,
    model_dir: PathBuf,
    clean_caption: bool,
}

fn read_scheduler_config(path: &Path) -> Result<SchedulerConfig, PipelineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PipelineError::Model(format!("cannot read {}: {e}", path.display())))?;
    SchedulerConfig::from_json(&text)
        .map_err(|e| PipelineError::Model(format!("malformed JSON in {}: {e}", path.display())))
}

/// A seed for requests without one (32 bits, like fal's).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish() & 0xffff_ffff
}

impl Pipeline {
    /// Loads a model from a diffusers-layout folder or a Hugging Face repo id.
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self, PipelineError> {
        let dir = resolve_model(model, &options.hub)?;
        if !dir.join("model_index.json").is_file() {
            return Err(PipelineError::Model(format!(
                "{} has no model_index.json: not a diffusers pipeline folder",
                dir.display()
            )));
        }
        let dtype = options.dtype;
        let vae_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
        let transformer = PixArtTransformer::load(&dir.join("transformer"), dtype, &options.device)?;
        let bins = AspectRatioBins::for_sample_size(transformer.config().sample_size);
        Ok(Self {
            tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: T5Encoder::load(&dir.join("text_encoder"), dtype, &options.device)?,
            transformer,
            vae: VaeDecoder::load(&dir.join("vae"), vae_dtype, &options.device)?,
            scheduler_config: read_scheduler_config(&dir.join("scheduler/scheduler_config.json"))?,
            bins,
            device: options.device.clone(),
            model_dir: dir,
            clean_caption: options.clean_caption,
        })
    }

    /// The folder the model was loaded from (a hub snapshot for repo ids).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The aspect-ratio table used for resolution binning, if the checkpoint has one.
    pub fn aspect_ratio_bins(&self) -> Option<AspectRatioBins> {
        self.bins
    }

    /// Generates the request's images.
    pub fn generate(&self, request: &GenerateRequest) -> Result<Generation, PipelineError> {
        self.generate_with_progress(request, |_| ControlFlow::Continue(()))
    }

    /// Generates the request's images, calling `on_step` after every denoising step; returning
    /// `ControlFlow::Break` cancels the run ([`PipelineError::Cancelled`]).
    pub fn generate_with_progress(
        &self,
        request: &GenerateRequest,
        mut on_step: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, PipelineError> {
        request.validate().map_err(PipelineError::Invalid)?;
        let started = Instant::now();
        let seed = request.seed.unwrap_or_else(random_seed);
        let style = request.style_preset().expect("validated");
        let (prompt, negative) = style.apply(&request.prompt, &request.negative_prompt);
        let (width, height) = request.image_size.dimensions().expect("validated");
        let scale = self.vae.config().scale_factor() as u32 * self.transformer.config().patch_size as u32;
        let (gen_h, gen_w) = match self.bins {
            Some(bins) => bins.classify(height, width),
            None if height % scale == 0 && width % scale == 0 => (height, width),
            None => {
                return Err(PipelineError::Invalid(vec![crate::request::FieldError {
                    field: "image_size".into(),
                    message: format!(
                        "this model has no aspect-ratio table: width and height must be multiples of {scale}"
                    ),
                    kind: "value_error",
                }]))
            }
        };

        let n = request.num_images as usize;
        let guidance = request.guidance_scale;
        let cfg = guidance > 1.0;
        let preprocess = |text: &str| if self.clean_caption { clean_caption(text) } else { lower_strip(text) };
        let positive = self.encode_prompt(&preprocess(&prompt))?;
        let mut rows = Vec::with_capacity(2 * n);
        if cfg {
            let negative = self.encode_prompt(&preprocess(&negative))?;
            rows.extend(std::iter::repeat_n(negative, n));
        }
        rows.extend(std::iter::repeat_n(positive, n));
        let (caption, mask) = pad_captions(&rows, &self.device)?;

        let mut generator = TorchGenerator::new(seed);
        let channels = self.transformer.config().in_channels;
        let vae_scale = self.vae.config().scale_factor() as u32;
        let latent_shape = (n, channels, (gen_h / vae_scale) as usize, (gen_w / vae_scale) as usize);
        let steps = request.num_inference_steps as usize;
        let mut scheduler: Box<dyn Scheduler> = match request.scheduler {
            SchedulerKind::DpmSolver => Box::new(DpmSolverMultistep::new(&self.scheduler_config, steps)?),
            SchedulerKind::SaSolver => Box::new(SaSolver::new(&self.scheduler_config, steps)?),
        };
        let mut latents = (generator.randn(latent_shape, DType::F32, &self.device)? * scheduler.init_noise_sigma())?;

        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let batch = model_input.dim(0)?;
            let out = self.transformer.forward(&model_input, &vec![t as f32; batch], &caption, Some(&mask))?;
            let out = out.to_dtype(DType::F32)?;
            let mut noise = if cfg {
                let (uncond, text) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                out
            };
            if self.transformer.config().out_channels() == 2 * channels {
                noise = noise.narrow(1, 0, channels)?; // learned sigma: keep ε
            }
            latents = scheduler.step(&noise, &latents, &mut generator)?;
            if on_step(&StepProgress { step: i + 1, total: timesteps.len(), timestep: t }).is_break() {
                return Err(PipelineError::Cancelled);
            }
        }

        let decoded = self.vae.decode_latents(&latents)?;
        let decoded =
            if self.bins.is_some() { resize_and_crop(&decoded, width as usize, height as usize)? } else { decoded };
        let images = to_rgb8(&decoded)?;
        Ok(Generation {
            has_nsfw_concepts: vec![false; images.len()],
            images,
            seed,
            prompt: request.prompt.clone(),
            inference_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// T5 states of one preprocessed prompt, `[1, L, C]`, L ≤ 300 real tokens. Encoding only the
    /// real tokens equals diffusers' padded-and-masked encoding at those positions, and the
    /// transformer never attends to the padded ones.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor, PipelineError> {
        let ids = self.tokenizer.encode(text, MAX_SEQUENCE_LENGTH)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids, None)?)
    }
}

/// Stacks `[1, L_i, C]` states into `[B, L_max, C]` with zero padding and a `[B, L_max]` mask.
fn pad_captions(rows: &[Tensor], device: &Device) -> Result<(Tensor, Tensor), PipelineError> {
    let max_len =
        rows.iter().map(|r| r.dim(1)).collect::<candle_core::Result<Vec<_>>>()?.into_iter().max().unwrap_or(1);
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * max_len);
    for row in rows {
        let len = row.dim(1)?;
        padded.push(if len < max_len { row.pad_with_zeros(1, 0, max_len - len)? } else { row.clone() });
        mask.extend((0..max_len).map(|i| u32::from(i < len)));
    }
    Ok((Tensor::cat(&padded, 0)?, Tensor::from_vec(mask, (rows.len(), max_len), device)?))
}
