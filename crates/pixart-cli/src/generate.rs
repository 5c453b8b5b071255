//! `pixart generate`.

use std::io::{IsTerminal, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::builder::{BoolishValueParser, FalseyValueParser};
use clap::Args;
use pixart_pipeline::{
    GenerateRequest, GuidanceScale, ImageSize, NumImages, PartialRequest, PipelineError, SchedulerKind, SizePreset,
    Steps, Style,
};

use crate::model_args::ModelArgs;

/// Arguments of `pixart generate`. Plain flags override the fields of `--request`.
///
/// `enable_safety_checker` (default: on when a safety checker is loaded) runs fal's NSFW
/// classifier on each image; flagged images are written black and `has_nsfw_concepts` says so.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A fal request as JSON: a file, or `-` for standard input.
    #[arg(long, env = "PIXART_REQUEST")]
    request: Option<String>,
    /// Folder for the PNG files (not written in sync mode).
    #[arg(long, env = "PIXART_OUT_DIR", default_value = ".")]
    out_dir: PathBuf,
    #[command(flatten)]
    fields: RequestFlags,
    /// Also write the final latents (before VAE decoding) to this safetensors file, as `latents`.
    #[arg(long, env = "PIXART_SAVE_LATENTS")]
    save_latents: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short, env = "PIXART_QUIET", value_parser = FalseyValueParser::new())]
    quiet: bool,
}

/// The request fields as flags, each parsed into the request's own type (so a bad value is
/// refused by the same rule, with the same message, as in a JSON request).
#[derive(Debug, Args)]
pub struct RequestFlags {
    /// The prompt.
    #[arg(long, env = "PIXART_PROMPT")]
    prompt: Option<String>,
    /// The negative prompt.
    #[arg(long, env = "PIXART_NEGATIVE_PROMPT")]
    negative_prompt: Option<String>,
    /// Seed of the generator (random when absent; returned in the response).
    #[arg(long, env = "PIXART_SEED")]
    seed: Option<u64>,
    #[arg(long, env = "PIXART_STEPS", help = format!(
        "Denoising steps ({} to {}; default {})", Steps::MIN, Steps::MAX, Steps::DEFAULT))]
    steps: Option<Steps>,
    #[arg(long, env = "PIXART_GUIDANCE_SCALE", help = format!(
        "Classifier-free guidance scale ({} to {}; default {}; ≤ 1 disables guidance)",
        GuidanceScale::MIN, GuidanceScale::MAX, GuidanceScale::DEFAULT))]
    guidance_scale: Option<GuidanceScale>,
    #[arg(long, env = "PIXART_SCHEDULER", help = format!(
        "{} (default) or {}", SchedulerKind::DpmSolver, SchedulerKind::SaSolver))]
    scheduler: Option<SchedulerKind>,
    #[arg(long, env = "PIXART_STYLE", help = format!("A style: {} (default {:?})", Style::names(), Style::default().name()))]
    style: Option<Style>,
    #[arg(long, env = "PIXART_IMAGE_SIZE", help = format!(
        "WIDTHxHEIGHT (each side {} to {}; the output has exactly this size) or a preset: {} (default {})",
        pixart_pipeline::Dimensions::MIN, pixart_pipeline::Dimensions::MAX, SizePreset::names(), ImageSize::default()))]
    image_size: Option<ImageSize>,
    #[arg(long, env = "PIXART_NUM_IMAGES", help = format!(
        "Images per request ({} to {}; default {}), drawn as one noise batch",
        NumImages::MIN, NumImages::MAX, NumImages::DEFAULT))]
    num_images: Option<NumImages>,
    /// Return images as data URIs in the JSON instead of writing files (`--sync-mode false`
    /// turns off a request file's `sync_mode`).
    #[arg(long, env = "PIXART_SYNC_MODE", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    sync_mode: Option<bool>,
    /// Run the safety checker on the images (default: yes, unless --no-safety-checker); flagged
    /// images are written black and marked in has_nsfw_concepts.
    #[arg(long, env = "PIXART_ENABLE_SAFETY_CHECKER", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    enable_safety_checker: Option<bool>,
}

impl RequestFlags {
    /// The fields these flags set.
    fn partial(&self) -> PartialRequest {
        PartialRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            style: self.style,
            image_size: self.image_size,
            num_inference_steps: self.steps,
            scheduler: self.scheduler,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            sync_mode: self.sync_mode,
            num_images: self.num_images,
            enable_safety_checker: self.enable_safety_checker,
        }
    }
}

/// Builds the request: the `--request` JSON, then each plain flag set on top.
fn build_request(args: &GenerateArgs) -> Result<GenerateRequest> {
    let flags = args.fields.partial();
    let request = match &args.request {
        None => flags,
        Some(source) => {
            let text = if source == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("cannot read the request from standard input")?;
                text
            } else {
                std::fs::read_to_string(source).with_context(|| format!("cannot read the request file {source}"))?
            };
            // A field the flags replace may be wrong in the file: only the others must be valid.
            PartialRequest::from_json_with_overrides(&text, flags)
                .map_err(PipelineError::Invalid)
                .with_context(|| format!("in the request {source}"))?
        }
    };
    Ok(request.into_request().map_err(PipelineError::Invalid)?)
}

fn file_url(path: &Path) -> std::io::Result<String> {
    Ok(format!("file://{}", std::path::absolute(path)?.display()))
}

/// Runs `pixart generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    // Validate everything the user typed before loading gigabytes of weights.
    let request = build_request(&args)?;
    let options = args.model.load_options()?;
    if !request.sync_mode {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("cannot create the output folder {}", args.out_dir.display()))?;
    }
    let pipeline = args.model.load_pipeline(&options)?;

    let bar = if args.quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(u64::from(request.num_inference_steps.get()));
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} step {pos}/{len} · {per_sec} · ETA {eta}")
        {
            bar.set_style(style);
        }
        bar
    };
    let generation = pipeline.generate_with_progress(&request, |progress| {
        bar.set_position(progress.step as u64);
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.save_latents {
        generation
            .latents
            .save_safetensors("latents", path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let out_dir = args.out_dir.clone();
    let response = generation.into_response(|file_name, png| {
        let path = out_dir.join(file_name);
        std::fs::write(&path, png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(file_url(&path)?)
    })?;
    crate::emit(&serde_json::to_string_pretty(&response)?)
}
