//! Loading a model and generating images, step for step as diffusers' `PixArtSigmaPipeline`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pixart_core::UnsupportedConfig;
use pixart_dit::{Perturbation, PixArtTransformer};
use pixart_safety::{RgbView, SafetyChecker};
use pixart_scheduler::{DpmSolverMultistep, SaSolver, Scheduler, SchedulerConfig, SchedulerError};
use pixart_t5::{T5Config, T5Tokenizer, WeightSummary, MAX_SEQUENCE_LENGTH};
use pixart_vae::{VaeDecoder, VaeEncoder};

use crate::caption::clean_caption;
use crate::generation::{Generation, Stage, StageTimings, StepProgress};
use crate::image::{resize_and_crop, to_rgb8, RgbImage};
use crate::image_start::{first_step, PictureStart, StartInput};
use crate::input_image::{image_tensor, mask_tensor};
use crate::invalid_parameter::InvalidParameter;
use crate::load_options::LoadOptions;
use crate::model_source::{resolve_classifier, resolve_model};
use crate::pag::{guide, select_blocks};
use crate::params::{GenerationParams, Sampler};
use crate::prompt_cache::PromptCache;
use crate::rng::TorchGenerator;
use crate::sizes::{AspectRatioBins, Dimensions, SizePlan};
use crate::text::lower_strip;
use crate::text_encoder::TextEncoderSlot;
use crate::transformer_slot::TransformerSlot;
use crate::PipelineError;

/// A loaded PixArt-Σ model: tokenizer, T5 encoder, transformer, VAE decoder and scheduler config.
#[derive(Debug)]
pub struct Pipeline {
    tokenizer: T5Tokenizer,
    text_encoder: TextEncoderSlot,
    transformer: TransformerSlot,
    vae: VaeDecoder,
    /// The VAE's encoder, for input images (`None` for a decoder-only VAE).
    vae_encoder: Option<VaeEncoder>,
    scheduler_config: SchedulerConfig,
    bins: Option<AspectRatioBins>,
    device: Device,
    model_dir: PathBuf,
    clean_caption: bool,
    prompt_cache: PromptCache,
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
    transformer: &TransformerSlot,
    vae: &VaeDecoder,
) -> Result<(), UnsupportedConfig> {
    let (dit, vae) = (transformer.config(), vae.config());
    let mismatch = |field: &str, value: usize, supported: String| {
        Err(UnsupportedConfig::new(field, value, supported).in_file(dir))
    };
    if transformer.source() != dir.join("transformer") {
        // A single-file transformer: its tensors are what does not fit.
        transformer.check_widths(t5.d_model, vae.latent_channels)?;
    }
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

/// Loads the safety checker `checker` (a folder or hub repo id) on the model's device; any failure
/// is [`PipelineError::SafetyCheckerUnavailable`]. It runs in f32 when the model runs in f16.
fn load_safety_checker(checker: &str, options: &LoadOptions) -> Result<SafetyChecker, PipelineError> {
    let unavailable = |source: Box<dyn std::error::Error + Send + Sync>| PipelineError::SafetyCheckerUnavailable {
        checker: checker.to_string(),
        source,
    };
    let folder = resolve_classifier(checker, &options.hub).map_err(|e| unavailable(Box::new(e)))?;
    let dtype = if options.dtype == DType::F16 { DType::F32 } else { options.dtype };
    SafetyChecker::load(&folder, dtype, &options.device).map_err(|e| unavailable(Box::new(e)))
}

/// A seed for generations without one (32 bits, like fal's).
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
        let transformer = TransformerSlot::load(
            &dir,
            options.transformer.as_deref(),
            (dtype, options.cpu_products),
            &options.device,
        )?;
        let text_device = options.text_encoder_device.clone().unwrap_or_else(|| options.device.clone());
        let bins = AspectRatioBins::for_sample_size(transformer.config().sample_size);
        // Refuse an unsupported scheduler config now rather than at the first request.
        let scheduler_config = read_scheduler_config(&dir.join("scheduler/scheduler_config.json"))?;
        let tokenizer = T5Tokenizer::from_dir(&dir.join("tokenizer"))?;
        let text_encoder = TextEncoderSlot::load(&dir, &options.text_encoder, dtype, &text_device)?;
        let vae = VaeDecoder::load_with(&dir.join("vae"), dtype, options.cpu_products, &options.device)?;
        let vae_encoder = VaeEncoder::load(&dir.join("vae"), dtype, &options.device)?;
        check_parts_fit(&dir, &tokenizer, text_encoder.config(), &transformer, &vae)?;
        let safety_checker = options.safety_checker.as_deref().map(|c| load_safety_checker(c, options)).transpose()?;
        Ok(Self {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            vae_encoder,
            scheduler_config,
            bins,
            device: options.device.clone(),
            model_dir: dir,
            clean_caption: options.clean_caption,
            prompt_cache: PromptCache::new(options.prompt_cache_size),
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

    /// Whether a safety checker was loaded.
    pub fn has_safety_checker(&self) -> bool {
        self.safety_checker.is_some()
    }

    /// How this model produces `requested`: the generated size, the resize and the crop (the
    /// output is always exactly the requested size; see [`crate::sizes`]).
    pub fn size_plan(&self, requested: Dimensions) -> SizePlan {
        let multiple = self.vae.config().scale_factor() * self.transformer.config().patch_size;
        SizePlan::new(requested, self.bins, u32::try_from(multiple).unwrap_or(u32::MAX))
    }

    /// Generates the images `params` ask for.
    pub fn generate(&self, params: &GenerationParams) -> Result<Generation, PipelineError> {
        self.generate_with_progress(params, |_| ControlFlow::Continue(()))
    }

    /// Generates the images, calling `on_step` after every denoising step; returning
    /// `ControlFlow::Break` cancels the run ([`PipelineError::Cancelled`]).
    ///
    /// Everything is checked before any tensor work starts: the parameters, and what depends on
    /// this model (steps against the scheduler's training timesteps, the generated size, caption
    /// cleaning, the safety checker); a refusal is [`PipelineError::InvalidParameter`].
    pub fn generate_with_progress(
        &self,
        params: &GenerationParams,
        on_step: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, PipelineError> {
        self.generate_with_stages(params, |_| {}, on_step)
    }

    /// Like [`Self::generate_with_progress`], also calling `on_stage` as each stage starts (the
    /// device synchronised), e.g. to measure memory stage by stage.
    pub fn generate_with_stages(
        &self,
        params: &GenerationParams,
        mut on_stage: impl FnMut(Stage),
        mut on_step: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, PipelineError> {
        let started = Instant::now();
        let mut timings = StageTimings::default();
        let mut run = self.plan_run(params)?;
        timings.lora_merge = run.lora_merge;
        on_stage(Stage::TextEncoder);
        let texts: Vec<&str> = std::iter::once(run.prompt.as_str()).chain(run.negative.as_deref()).collect();
        let states = self.encode_prompts_timed(&texts, &mut timings)?;
        if run.picture.is_some() {
            on_stage(Stage::ImageEncode);
        }
        let encoding = Instant::now();
        let start = self.initial_latents(&run)?;
        if start.picture.is_some() {
            timings.image_encode = encoding.elapsed();
        }
        on_stage(Stage::Denoise);
        let latents = self.denoise(&mut run, states, start, &mut timings, &mut on_step)?;
        on_stage(Stage::Vae);
        let vae_started = Instant::now();
        let decoded = self.vae.decode_latents(&latents)?;
        self.device.synchronize()?;
        timings.vae = vae_started.elapsed();
        on_stage(Stage::Postprocess);
        let post_started = Instant::now();
        let mut images = to_rgb8(&resize_and_crop(&decoded, &run.size)?)?;
        timings.postprocess = post_started.elapsed();
        let has_nsfw_concepts = match (&self.safety_checker, run.check_safety) {
            (Some(checker), true) => {
                on_stage(Stage::SafetyChecker);
                let checked = Instant::now();
                let flags = blacken_flagged(checker, &mut images)?;
                timings.safety_checker = checked.elapsed();
                flags
            }
            _ => vec![false; images.len()],
        };
        timings.total = started.elapsed();
        Ok(Generation { images, has_nsfw_concepts, safety_checked: run.check_safety, seed: run.seed, timings, latents })
    }

    /// Everything a run needs that depends on the parameters and this model, worked out (and
    /// refused, naming the parameter) before any tensor work.
    fn plan_run(&self, params: &GenerationParams) -> Result<RunPlan, PipelineError> {
        params.check()?;
        let size = self.size_plan(params.size);
        let largest = 2 * Dimensions::MAX;
        if size.generated.width > largest || size.generated.height > largest {
            return Err(InvalidParameter::new(
                "size",
                format!(
                    "this model would generate it at {}x{} (more than {largest} pixels a side); ask for a smaller size",
                    size.generated.width, size.generated.height
                ),
            )
            .into());
        }
        let check_safety = match (params.safety_check, &self.safety_checker) {
            (Some(true), None) => {
                return Err(InvalidParameter::new(
                    "safety_check",
                    "no safety checker is loaded here (it was turned off when the model was loaded); send false or omit the field",
                )
                .into())
            }
            (Some(enabled), _) => enabled,
            (None, checker) => checker.is_some(),
        };
        let mut scheduler = self.scheduler(params.sampler, params.steps)?;
        let picture = self.plan_picture(params)?;
        let begin = if picture.is_some() { first_step(params.steps as usize, params.strength)? } else { 0 };
        scheduler.begin_at(begin)?;
        let perturbation = self.plan_perturbation(params)?;
        let merging = Instant::now();
        let transformer = self.transformer.with_loras(&params.loras)?;
        let lora_merge = if params.loras.is_empty() { std::time::Duration::ZERO } else { merging.elapsed() };
        let prompt = self.preprocess(&params.prompt, "prompt")?;
        let negative =
            if params.guides() { Some(self.preprocess(&params.negative_prompt, "negative_prompt")?) } else { None };
        Ok(RunPlan {
            transformer,
            lora_merge,
            seed: params.seed.unwrap_or_else(random_seed),
            size,
            check_safety,
            scheduler,
            prompt,
            negative,
            num_images: params.num_images as usize,
            guidance_scale: params.guidance_scale,
            picture,
            begin,
            perturbation,
            pag_scale: params.pag_scale,
        })
    }

    /// The input image and mask of an image-to-image or inpainting run, refused when this
    /// model's VAE has no encoder.
    fn plan_picture(&self, params: &GenerationParams) -> Result<Option<PicturePlan>, PipelineError> {
        let Some(image) = params.image.clone() else { return Ok(None) };
        if self.vae_encoder.is_none() {
            return Err(
                InvalidParameter::new("image", "this model's VAE has no encoder: it takes no input image").into()
            );
        }
        Ok(Some(PicturePlan { image, mask: params.mask.clone(), full_strength: params.strength == 1.0 }))
    }

    /// The blocks perturbed-attention guidance perturbs, when it runs.
    fn plan_perturbation(&self, params: &GenerationParams) -> Result<Option<Perturbation>, PipelineError> {
        if !params.perturbs() {
            return Ok(None);
        }
        let blocks = select_blocks(&self.transformer.config().self_attention_names(), &params.pag_layers)?;
        let n = params.num_images as usize;
        // The perturbed rows come last: [uncond?, text, perturbed].
        Ok(Some(Perturbation { blocks, rows_from: if params.guides() { 2 * n } else { n } }))
    }

    /// Where the loop starts: the generator's noise (text-to-image), or the input image encoded
    /// and noised to the first step run, with what inpainting blends.
    fn initial_latents(&self, run: &RunPlan) -> Result<LoopStart, PipelineError> {
        let mut generator = TorchGenerator::new(run.seed);
        let vae_scale = self.vae.config().scale_factor() as u32;
        let (width, height) = (run.size.generated.width as usize, run.size.generated.height as usize);
        let latent = (width / vae_scale as usize, height / vae_scale as usize);
        let (Some(picture), Some(encoder)) = (&run.picture, &self.vae_encoder) else {
            let shape = (run.num_images, run.transformer.config().in_channels, latent.1, latent.0);
            let noise = generator.randn(shape, DType::F32, &self.device)?;
            let latents = (noise * run.scheduler.init_noise_sigma())?;
            return Ok(LoopStart { latents, picture: None, generator });
        };
        let image = image_tensor(&picture.image, width, height, &self.device)?;
        let mask = picture.mask.as_ref().map(|m| mask_tensor(m, (width, height), latent, &self.device)).transpose()?;
        let input = StartInput {
            image: &image,
            mask: mask.as_ref(),
            num_images: run.num_images,
            begin: run.begin,
            full_strength: picture.full_strength,
        };
        let (picture, latents) =
            PictureStart::prepare(encoder, input, run.scheduler.as_ref(), &mut generator, &self.device)?;
        self.device.synchronize()?;
        Ok(LoopStart { latents, picture: Some(picture), generator })
    }

    /// The sampler for `steps` steps on this model's scheduler config; more steps than its
    /// training timesteps are refused naming `steps`.
    fn scheduler(&self, sampler: Sampler, steps: u32) -> Result<Box<dyn Scheduler>, PipelineError> {
        let steps = steps as usize;
        let scheduler: Result<Box<dyn Scheduler>, SchedulerError> = match sampler {
            Sampler::DpmSolver => DpmSolverMultistep::new(&self.scheduler_config, steps).map(|s| Box::new(s) as _),
            Sampler::SaSolver => SaSolver::new(&self.scheduler_config, steps).map(|s| Box::new(s) as _),
        };
        scheduler.map_err(|e| match e {
            SchedulerError::Steps { max, .. } => {
                InvalidParameter::new("steps", format!("must be an integer from 1 to {max} for this model")).into()
            }
            other => other.into(),
        })
    }

    /// The denoising loop from the initial latents to the final ones, diffusers' order of
    /// operations and random draws (SA-Solver keeps drawing from the start's generator).
    fn denoise(
        &self,
        run: &mut RunPlan,
        states: Vec<Tensor>,
        start: LoopStart,
        timings: &mut StageTimings,
        on_step: &mut impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor, PipelineError> {
        let LoopStart { mut latents, picture, mut generator } = start;
        let transformer = run.transformer.clone();
        let caption = self.caption_batch(run, states)?;
        // Everything constant across steps is computed here, once: the caption's projection and
        // cross-attention keys/values (above), the timestep MLP for every step, and (cached in
        // the transformer) the position embedding. In the loop, only SA-Solver uploads data (its
        // per-step noise, drawn from the CPU generator as diffusers does).
        let timesteps = run.scheduler.timesteps().to_vec();
        let embedded =
            transformer.prepare_timesteps(&timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), &self.device)?;
        let total = timesteps.len() - run.begin;
        for (i, &timestep) in timesteps.iter().enumerate().skip(run.begin) {
            let step_started = Instant::now();
            let noise = self.predict_noise(&latents, &embedded.get(i)?, &caption, run)?;
            latents = run.scheduler.step(&noise, &latents, &mut generator)?;
            if let Some(picture) = &picture {
                let next = (i + 1 < timesteps.len()).then_some(i + 1);
                latents = picture.blend(latents, run.scheduler.as_ref(), next)?;
            }
            self.device.synchronize()?;
            let duration = step_started.elapsed();
            timings.steps.push(duration);
            let progress = StepProgress { step: i + 1 - run.begin, total, timestep, duration };
            if on_step(&progress).is_break() {
                return Err(PipelineError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// The caption batch, prepared once: `[negative × n]` under guidance, `[prompt × n]`, and
    /// `[prompt × n]` again for perturbed-attention guidance's branch, as diffusers orders them.
    fn caption_batch(&self, run: &RunPlan, states: Vec<Tensor>) -> Result<pixart_dit::PreparedCaption, PipelineError> {
        let n = run.num_images;
        let mut states = states.into_iter();
        let positive = states.next().ok_or_else(|| PipelineError::Internal("no prompt states".into()))?;
        let mut rows = Vec::with_capacity(3 * n);
        if let Some(negative) = states.next() {
            rows.extend(std::iter::repeat_n(negative, n));
        }
        let branches = if run.perturbation.is_some() { 2 } else { 1 };
        rows.extend(std::iter::repeat_n(positive, branches * n));
        let (caption, mask) = pad_captions(&rows, &self.device)?;
        Ok(run.transformer.prepare_caption(&caption, Some(&mask))?)
    }

    /// The transformer's noise prediction for one step, guided when the run guides (ε only,
    /// for checkpoints that also predict the variance).
    fn predict_noise(
        &self,
        latents: &Tensor,
        timestep: &pixart_dit::PreparedTimestep,
        caption: &pixart_dit::PreparedCaption,
        run: &RunPlan,
    ) -> Result<Tensor, PipelineError> {
        let n = run.num_images;
        let guided = run.negative.is_some();
        let branches = 1 + usize::from(guided) + usize::from(run.perturbation.is_some());
        let input = if branches > 1 { Tensor::cat(&vec![latents; branches], 0)? } else { latents.clone() };
        let out = match &run.perturbation {
            Some(perturbation) => run.transformer.forward_perturbed(&input, timestep, caption, perturbation)?,
            None => run.transformer.forward_prepared(&input, timestep, caption)?,
        };
        let out = out.to_dtype(DType::F32)?;
        let noise = if run.perturbation.is_some() {
            guide(&out, n, guided.then_some(run.guidance_scale), run.pag_scale)?
        } else if guided {
            let (uncond, text) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
            (&uncond + ((text - &uncond)? * run.guidance_scale)?)?
        } else {
            out
        };
        let channels = run.transformer.config().in_channels;
        if run.transformer.config().out_channels() == 2 * channels {
            return Ok(noise.narrow(1, 0, channels)?); // learned sigma: keep ε
        }
        Ok(noise)
    }

    /// diffusers' prompt preprocessing: caption cleaning, or lowercasing and stripping. A text
    /// the cleaner gives up on is refused, naming `parameter`.
    fn preprocess(&self, text: &str, parameter: &'static str) -> Result<String, PipelineError> {
        if !self.clean_caption {
            return Ok(lower_strip(text));
        }
        clean_caption(text).map_err(|e| {
            InvalidParameter::new(
                parameter,
                format!("cannot be cleaned for the model (caption cleaning is on): {e}; shorten or simplify it"),
            )
            .into()
        })
    }

    /// T5 states of one preprocessed prompt, `[1, L, C]`, L ≤ 300 real tokens. Encoding only the
    /// real tokens equals diffusers' padded-and-masked encoding at those positions, and the
    /// transformer never attends to the padded ones.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor, PipelineError> {
        let mut states = self.encode_prompts_timed(&[text], &mut StageTimings::default())?;
        states.pop().ok_or_else(|| PipelineError::Internal("no prompt states".into()))
    }

    /// How the text encoder's weights are stored (tensors and bytes per type).
    pub fn text_encoder_weights(&self) -> &WeightSummary {
        self.text_encoder.summary()
    }

    /// The states of each text, from the prompt cache or encoded now; under sequential offload
    /// T5 is loaded once for the texts not cached and released before this returns.
    fn encode_prompts_timed(&self, texts: &[&str], timings: &mut StageTimings) -> Result<Vec<Tensor>, PipelineError> {
        let mut states: Vec<Option<Tensor>> = texts.iter().map(|text| self.prompt_cache.get(text)).collect();
        if states.iter().all(Option::is_some) {
            return Ok(states.into_iter().flatten().collect());
        }
        let started = Instant::now();
        let encoder = self.text_encoder.encoder()?;
        if matches!(encoder, std::borrow::Cow::Owned(_)) {
            timings.text_encoder_load += started.elapsed();
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
            timings.tokenize += started.elapsed();
            let started = Instant::now();
            let ids = Tensor::new(ids.as_slice(), self.text_encoder.device())?.unsqueeze(0)?;
            let encoded = encoder.forward(&ids, None)?.to_device(&self.device)?;
            self.device.synchronize()?;
            timings.text_encoder += started.elapsed();
            self.prompt_cache.put(texts[i], &encoded);
            states[i] = Some(encoded);
        }
        drop(encoder);
        self.text_encoder.device().synchronize()?;
        Ok(states.into_iter().flatten().collect())
    }
}

/// What one run needs besides the model, decided before any tensor work.
struct RunPlan {
    /// The transformer: the base model, or one with the run's LoRAs merged.
    transformer: Arc<PixArtTransformer>,
    /// Time spent merging the LoRAs (zero when a cached merge or no LoRA served).
    lora_merge: std::time::Duration,
    seed: u64,
    size: SizePlan,
    check_safety: bool,
    scheduler: Box<dyn Scheduler>,
    /// The preprocessed prompt.
    prompt: String,
    /// The preprocessed negative prompt, when guidance runs.
    negative: Option<String>,
    num_images: usize,
    guidance_scale: f64,
    /// Image-to-image or inpainting: the input.
    picture: Option<PicturePlan>,
    /// The index of the first step run (0 for text-to-image).
    begin: usize,
    /// Perturbed-attention guidance's blocks and rows, when it runs.
    perturbation: Option<Perturbation>,
    pag_scale: f64,
}

/// Where the denoising loop starts.
struct LoopStart {
    /// The first latents.
    latents: Tensor,
    /// Started from a picture: what inpainting blends after each step.
    picture: Option<PictureStart>,
    /// The request's generator, after the draws so far (SA-Solver keeps drawing from it).
    generator: TorchGenerator,
}

/// The input picture of a run.
struct PicturePlan {
    image: Arc<RgbImage>,
    mask: Option<Arc<RgbImage>>,
    /// Strength 1: inpainting starts from pure noise.
    full_strength: bool,
}

/// Runs the safety checker on the images and blackens the flagged ones, as fal does; returns
/// which were flagged.
fn blacken_flagged(checker: &SafetyChecker, images: &mut [RgbImage]) -> Result<Vec<bool>, PipelineError> {
    let views: Vec<RgbView<'_>> =
        images.iter().map(|i| RgbView { width: i.width, height: i.height, pixels: &i.pixels }).collect();
    let verdicts = checker.check(&views)?;
    Ok(images
        .iter_mut()
        .zip(&verdicts)
        .map(|(image, verdict)| {
            if verdict.flagged {
                image.pixels.fill(0);
            }
            verdict.flagged
        })
        .collect())
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
