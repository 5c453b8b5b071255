//! Loading a model and generating images, step for step as diffusers' `PixArtSigmaPipeline`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pixart_core::UnsupportedConfig;
use pixart_dit::PixArtTransformer;
use pixart_safety::{RgbView, SafetyChecker};
use pixart_scheduler::{DpmSolverMultistep, SaSolver, Scheduler, SchedulerConfig, SchedulerError};
use pixart_t5::{T5Config, T5Tokenizer, WeightSummary, MAX_SEQUENCE_LENGTH};
use pixart_vae::VaeDecoder;

use crate::caption::clean_caption;
use crate::image::{resize_and_crop, to_rgb8, RgbImage};
use crate::model_source::{resolve_classifier, resolve_model, HubOptions};
use crate::request::{Dimensions, FieldError, GenerateRequest, SchedulerKind, Steps};
use crate::response::{GenerateResponse, ImageOutput, Timings};
use crate::rng::TorchGenerator;
use crate::sizes::{AspectRatioBins, SizePlan};
use crate::text::lower_strip;
use crate::text_encoder::{TextEncoderOptions, TextEncoderSlot};
use crate::PipelineError;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to run.
    pub device: Device,
    /// Compute dtype: f32, bf16 or f16. In f16 the VAE runs in f32 when its config sets
    /// `force_upcast` (the SDXL VAE's does: it overflows in f16; diffusers' PixArt pipeline
    /// ignores the flag, see `pixart_vae::VaeConfig::force_upcast`) and T5 keeps its `wo` in f32.
    pub dtype: DType,
    /// Hub resolution for repo ids.
    pub hub: HubOptions,
    /// Clean prompts as diffusers does with `clean_caption=True` ([`crate::caption`]) instead of
    /// only lowercasing and stripping them (`clean_caption=False`, the default here).
    pub clean_caption: bool,
    /// Where T5 runs (`None`: on `device`). `Some(Device::Cpu)` keeps its ~9.5 GB (bf16) off the
    /// GPU; only the prompt states travel to the device.
    pub text_encoder_device: Option<Device>,
    /// The text encoder's weights (GGUF or another folder), quantization and residency.
    pub text_encoder: TextEncoderOptions,
    /// How many recent prompts' T5 states to keep (0 disables the cache).
    pub prompt_cache_size: usize,
    /// The safety checker: a transformers image-classifier folder or hub repo id with an `nsfw`
    /// label (fal's is [`pixart_safety::DEFAULT_SAFETY_CHECKER`]). It is loaded with the model
    /// and a failure to load it fails [`Pipeline::load`]. `None` (the library's default): no
    /// checker; requests then run unchecked unless they ask for the check explicitly, which is
    /// refused.
    pub safety_checker: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            hub: HubOptions::from_env(),
            clean_caption: false,
            text_encoder_device: None,
            text_encoder: TextEncoderOptions::default(),
            prompt_cache_size: 16,
            safety_checker: None,
        }
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
    /// How long the step took (transformer, guidance, scheduler; the device synchronised).
    pub duration: std::time::Duration,
}

/// A stage of one generation, announced as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Tokenizing and T5 encoding (loading T5 first under sequential offload).
    TextEncoder,
    /// The denoising loop.
    Denoise,
    /// VAE decoding.
    Vae,
    /// Resize/crop and conversion to 8-bit RGB.
    Postprocess,
    /// The safety checker (only when the request is checked).
    SafetyChecker,
}

/// Wall-clock time of each stage of one generation (the device is synchronised at each
/// boundary, so GPU work is attributed to its stage).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimings {
    /// Tokenizing the prompt and negative prompt.
    pub tokenize: std::time::Duration,
    /// Loading the text encoder for this request (sequential offload only).
    pub text_encoder_load: std::time::Duration,
    /// T5 encoding (zero for prompts served from the cache).
    pub text_encoder: std::time::Duration,
    /// Each denoising step (transformer, guidance, scheduler).
    pub steps: Vec<std::time::Duration>,
    /// VAE decoding.
    pub vae: std::time::Duration,
    /// Resize/crop and conversion to 8-bit RGB.
    pub postprocess: std::time::Duration,
    /// The safety checker over all the request's images (zero when not checked).
    pub safety_checker: std::time::Duration,
    /// Everything.
    pub total: std::time::Duration,
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
    /// The request's `sync_mode`: the response inlines the images as data URIs.
    pub sync_mode: bool,
    /// Per image: flagged by the safety checker (and replaced by a black image). All false when
    /// the request was not checked.
    pub has_nsfw_concepts: Vec<bool>,
    /// Whether the safety checker ran on these images.
    pub safety_checked: bool,
    /// Seconds spent from text encoding to the last decoded image.
    pub inference_seconds: f64,
    /// The same time, stage by stage.
    pub stages: StageTimings,
    /// The final latents `[num_images, 4, h/8, w/8]` (f32), before VAE decoding.
    pub latents: Tensor,
}

impl Generation {
    /// Builds fal's response. Images are named `pixart-<seed>-<i>.png`; in sync mode they are
    /// inlined as data URIs, otherwise each PNG goes to `store(file_name, png)`, which writes it
    /// somewhere and returns its URL (its error becomes [`PipelineError::Store`]).
    pub fn into_response(
        self,
        mut store: impl FnMut(&str, &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<GenerateResponse, PipelineError> {
        let mut images = Vec::with_capacity(self.images.len());
        for (i, image) in self.images.iter().enumerate() {
            let png = image.to_png()?;
            let file_name = format!("pixart-{}-{i}.png", self.seed);
            let url = if self.sync_mode {
                crate::data_uri(&png)
            } else {
                store(&file_name, &png)
                    .map_err(|source| PipelineError::Store { file_name: file_name.clone(), source })?
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
    text_encoder: TextEncoderSlot,
    transformer: PixArtTransformer,
    vae: VaeDecoder,
    scheduler_config: SchedulerConfig,
    bins: Option<AspectRatioBins>,
    device: Device,
    model_dir: PathBuf,
    clean_caption: bool,
    prompt_cache: std::sync::Mutex<std::collections::VecDeque<(String, Tensor)>>,
    prompt_cache_size: usize,
    safety_checker: Option<SafetyChecker>,
}

/// Reads `scheduler_config.json` and refuses, naming the file, a config neither sampler runs.
fn read_scheduler_config(path: &Path) -> Result<SchedulerConfig, PipelineError> {
    let config: SchedulerConfig = pixart_core::load_config(path)?;
    let in_file = |e: SchedulerError| match e {
        SchedulerError::Unsupported(e) => PipelineError::Unsupported(e.in_file(path)),
        other => other.into(),
    };
    DpmSolverMultistep::new(&config, 1).map_err(in_file)?;
    SaSolver::new(&config, 1).map_err(in_file)?;
    Ok(config)
}

/// Refuses parts that do not fit together, before any request runs.
fn check_parts_fit(
    dir: &Path,
    tokenizer: &T5Tokenizer,
    t5: &T5Config,
    transformer: &PixArtTransformer,
    vae: &VaeDecoder,
) -> Result<(), UnsupportedConfig> {
    let (dit, vae) = (transformer.config(), vae.config());
    let mismatch = |field: &str, value: usize, supported: String| {
        Err(UnsupportedConfig::new(field, value, supported).in_file(dir))
    };
    if t5.d_model != dit.caption_channels {
        return mismatch(
            "text_encoder d_model",
            t5.d_model,
            format!("the transformer's caption_channels ({})", dit.caption_channels),
        );
    }
    if vae.latent_channels != dit.in_channels {
        return mismatch(
            "vae latent_channels",
            vae.latent_channels,
            format!("the transformer's in_channels ({})", dit.in_channels),
        );
    }
    if vae.out_channels != 3 {
        return mismatch("vae out_channels", vae.out_channels, "3 (RGB)".into());
    }
    if tokenizer.vocab_size() > t5.vocab_size {
        return mismatch(
            "tokenizer vocabulary size",
            tokenizer.vocab_size(),
            format!("at most the text encoder's vocab_size ({})", t5.vocab_size),
        );
    }
    Ok(())
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
        let dtype = options.dtype;
        let transformer = PixArtTransformer::load(&dir.join("transformer"), dtype, &options.device)?;
        let text_device = options.text_encoder_device.clone().unwrap_or_else(|| options.device.clone());
        let bins = AspectRatioBins::for_sample_size(transformer.config().sample_size);
        // Refuse an unsupported scheduler config now rather than at the first request.
        let scheduler_config = read_scheduler_config(&dir.join("scheduler/scheduler_config.json"))?;
        let tokenizer = T5Tokenizer::from_dir(&dir.join("tokenizer"))?;
        let text_encoder = TextEncoderSlot::load(&dir, &options.text_encoder, dtype, &text_device)?;
        let vae = VaeDecoder::load(&dir.join("vae"), dtype, &options.device)?;
        check_parts_fit(&dir, &tokenizer, text_encoder.config(), &transformer, &vae)?;
        let safety_checker = match &options.safety_checker {
            None => None,
            Some(checker) => {
                let unavailable = |source: Box<dyn std::error::Error + Send + Sync>| {
                    PipelineError::SafetyCheckerUnavailable { checker: checker.clone(), source }
                };
                let folder = resolve_classifier(checker, &options.hub).map_err(|e| unavailable(Box::new(e)))?;
                let checker_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
                Some(
                    SafetyChecker::load(&folder, checker_dtype, &options.device)
                        .map_err(|e| unavailable(Box::new(e)))?,
                )
            }
        };
        Ok(Self {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            scheduler_config,
            bins,
            device: options.device.clone(),
            model_dir: dir,
            clean_caption: options.clean_caption,
            prompt_cache: Default::default(),
            prompt_cache_size: options.prompt_cache_size,
            safety_checker,
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

    /// How this model produces `requested`: the generated size, the resize and the crop (the
    /// output is always exactly the requested size; see [`crate::sizes`]).
    pub fn size_plan(&self, requested: Dimensions) -> SizePlan {
        let multiple = self.vae.config().scale_factor() * self.transformer.config().patch_size;
        SizePlan::new(requested, self.bins, u32::try_from(multiple).unwrap_or(u32::MAX))
    }

    /// Generates the request's images, calling `on_step` after every denoising step; returning
    /// `ControlFlow::Break` cancels the run ([`PipelineError::Cancelled`]).
    ///
    /// Everything that depends on the request alone was checked when it was built; what depends
    /// on this model (steps against the scheduler's training timesteps, caption cleaning) is
    /// checked here before any tensor work starts.
    pub fn generate_with_progress(
        &self,
        request: &GenerateRequest,
        on_step: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, PipelineError> {
        self.generate_with_stages(request, |_| {}, on_step)
    }

    /// Like [`Self::generate_with_progress`], also calling `on_stage` as each stage starts (the
    /// device synchronised), e.g. to measure memory stage by stage.
    pub fn generate_with_stages(
        &self,
        request: &GenerateRequest,
        mut on_stage: impl FnMut(Stage),
        mut on_step: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, PipelineError> {
        let started = Instant::now();
        let mut stages = StageTimings::default();
        let seed = request.seed.unwrap_or_else(random_seed);
        let plan = self.size_plan(request.image_size.dimensions());
        let check = match (request.enable_safety_checker, &self.safety_checker) {
            (Some(true), None) => {
                return Err(PipelineError::Invalid(vec![FieldError::new(
                    "enable_safety_checker",
                    "value_error",
                    "no safety checker is loaded here (it was turned off when the model was loaded); send false or omit the field",
                )]))
            }
            (Some(enabled), _) => enabled,
            (None, checker) => checker.is_some(),
        };
        let largest = 2 * Dimensions::MAX;
        if plan.generated.width > largest || plan.generated.height > largest {
            return Err(PipelineError::Invalid(vec![FieldError::new(
                "image_size",
                "value_error",
                format!(
                    "this model would generate it at {}x{} (more than {largest} pixels a side); ask for a smaller size",
                    plan.generated.width, plan.generated.height
                ),
            )]));
        }
        let steps = request.num_inference_steps.get() as usize;
        let scheduler: Result<Box<dyn Scheduler>, SchedulerError> = match request.scheduler {
            SchedulerKind::DpmSolver => {
                DpmSolverMultistep::new(&self.scheduler_config, steps).map(|s| Box::new(s) as _)
            }
            SchedulerKind::SaSolver => SaSolver::new(&self.scheduler_config, steps).map(|s| Box::new(s) as _),
        };
        let mut scheduler = scheduler.map_err(|e| match e {
            SchedulerError::Steps { max, .. } => PipelineError::Invalid(vec![FieldError::new(
                Steps::FIELD,
                "value_error",
                format!("must be an integer from 1 to {max} for this model"),
            )]),
            other => other.into(),
        })?;
        let (prompt, negative) = request.style.apply(&request.prompt, &request.negative_prompt);
        let guidance = request.guidance_scale.get();
        let cfg = request.guidance_scale.guides();
        let prompt = self.preprocess(&prompt, "prompt")?;
        let negative = if cfg { Some(self.preprocess(&negative, "negative_prompt")?) } else { None };

        let n = request.num_images.get() as usize;
        on_stage(Stage::TextEncoder);
        let texts: Vec<&str> = std::iter::once(prompt.as_str()).chain(negative.as_deref()).collect();
        let mut states = self.encode_prompts_timed(&texts, &mut stages)?.into_iter();
        let positive = states.next().ok_or_else(|| candle_core::Error::Msg("no prompt states".into()))?;
        let mut rows = Vec::with_capacity(2 * n);
        if let Some(negative) = states.next() {
            rows.extend(std::iter::repeat_n(negative, n));
        }
        rows.extend(std::iter::repeat_n(positive, n));
        on_stage(Stage::Denoise);
        let (caption, mask) = pad_captions(&rows, &self.device)?;
        let caption = self.transformer.prepare_caption(&caption, Some(&mask))?;

        let mut generator = TorchGenerator::new(seed);
        let channels = self.transformer.config().in_channels;
        let vae_scale = self.vae.config().scale_factor() as u32;
        let latent_shape =
            (n, channels, (plan.generated.height / vae_scale) as usize, (plan.generated.width / vae_scale) as usize);
        let mut latents = (generator.randn(latent_shape, DType::F32, &self.device)? * scheduler.init_noise_sigma())?;

        // Everything constant across steps is computed here, once: the caption's projection and
        // cross-attention keys/values (above), the timestep MLP for every step, and (cached in
        // the transformer) the position embedding. In the loop, only SA-Solver uploads data (its
        // per-step noise, drawn from the CPU generator as diffusers does).
        let timesteps = scheduler.timesteps().to_vec();
        let embedded_timesteps = self
            .transformer
            .prepare_timesteps(&timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), &self.device)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let step_started = Instant::now();
            let model_input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let out = self.transformer.forward_prepared(&model_input, &embedded_timesteps.get(i)?, &caption)?;
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
            self.device.synchronize()?;
            let duration = step_started.elapsed();
            stages.steps.push(duration);
            if on_step(&StepProgress { step: i + 1, total: timesteps.len(), timestep: t, duration }).is_break() {
                return Err(PipelineError::Cancelled);
            }
        }

        on_stage(Stage::Vae);
        let vae_started = Instant::now();
        let decoded = self.vae.decode_latents(&latents)?;
        self.device.synchronize()?;
        stages.vae = vae_started.elapsed();
        on_stage(Stage::Postprocess);
        let post_started = Instant::now();
        let mut images = to_rgb8(&resize_and_crop(&decoded, &plan)?)?;
        stages.postprocess = post_started.elapsed();
        let mut has_nsfw_concepts = vec![false; images.len()];
        if let (true, Some(checker)) = (check, &self.safety_checker) {
            on_stage(Stage::SafetyChecker);
            let started = Instant::now();
            let views: Vec<RgbView<'_>> =
                images.iter().map(|i| RgbView { width: i.width, height: i.height, pixels: &i.pixels }).collect();
            let verdicts = checker.check(&views)?;
            for ((image, verdict), flag) in images.iter_mut().zip(&verdicts).zip(&mut has_nsfw_concepts) {
                // fal replaces a flagged image by a black one of the same size.
                if verdict.flagged {
                    image.pixels.fill(0);
                }
                *flag = verdict.flagged;
            }
            stages.safety_checker = started.elapsed();
        }
        stages.total = started.elapsed();
        Ok(Generation {
            has_nsfw_concepts,
            safety_checked: check,
            images,
            seed,
            prompt: request.prompt.clone(),
            sync_mode: request.sync_mode,
            inference_seconds: stages.total.as_secs_f64(),
            stages,
            latents,
        })
    }

    /// diffusers' prompt preprocessing: caption cleaning, or lowercasing and stripping. A text
    /// the cleaner gives up on is refused, naming `field`.
    fn preprocess(&self, text: &str, field: &str) -> Result<String, PipelineError> {
        if !self.clean_caption {
            return Ok(lower_strip(text));
        }
        clean_caption(text).map_err(|e| {
            PipelineError::Invalid(vec![FieldError::new(
                field,
                "value_error",
                format!("cannot be cleaned for the model (caption cleaning is on): {e}; shorten or simplify it"),
            )])
        })
    }

    /// T5 states of one preprocessed prompt, `[1, L, C]`, L ≤ 300 real tokens. Encoding only the
    /// real tokens equals diffusers' padded-and-masked encoding at those positions, and the
    /// transformer never attends to the padded ones.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor, PipelineError> {
        let mut states = self.encode_prompts_timed(&[text], &mut StageTimings::default())?;
        states.pop().ok_or_else(|| candle_core::Error::Msg("no prompt states".into()).into())
    }

    /// How the text encoder's weights are stored (tensors and bytes per type).
    pub fn text_encoder_weights(&self) -> &WeightSummary {
        self.text_encoder.summary()
    }

    /// The states of each text, from the prompt cache or encoded now; under sequential offload
    /// T5 is loaded once for the texts not cached and released before this returns.
    fn encode_prompts_timed(&self, texts: &[&str], stages: &mut StageTimings) -> Result<Vec<Tensor>, PipelineError> {
        let cache = || self.prompt_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut states: Vec<Option<Tensor>> =
            texts.iter().map(|text| cache().iter().find(|(t, _)| t == text).map(|(_, s)| s.clone())).collect();
        if states.iter().any(Option::is_none) {
            let started = Instant::now();
            let encoder = self.text_encoder.encoder()?;
            if matches!(encoder, std::borrow::Cow::Owned(_)) {
                stages.text_encoder_load += started.elapsed();
            }
            for i in 0..texts.len() {
                if states[i].is_some() {
                    continue;
                }
                if let Some(same) = (0..i).find(|&j| texts[j] == texts[i]) {
                    states[i] = states[same].clone();
                    continue;
                }
                let started = Instant::now();
                let ids = self.tokenizer.encode(texts[i], MAX_SEQUENCE_LENGTH)?;
                stages.tokenize += started.elapsed();
                let started = Instant::now();
                let ids = Tensor::new(ids.as_slice(), self.text_encoder.device())?.unsqueeze(0)?;
                let encoded = encoder.forward(&ids, None)?.to_device(&self.device)?;
                self.device.synchronize()?;
                stages.text_encoder += started.elapsed();
                if self.prompt_cache_size > 0 {
                    let mut cached = cache();
                    if cached.len() >= self.prompt_cache_size {
                        cached.pop_front();
                    }
                    cached.push_back((texts[i].to_string(), encoded.clone()));
                }
                states[i] = Some(encoded);
            }
            drop(encoder);
            self.text_encoder.device().synchronize()?;
        }
        Ok(states.into_iter().flatten().collect())
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
