//! `pixart generate`.

use std::io::{IsTerminal, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::builder::FalseyValueParser;
use clap::Args;
use pixart_fal::{GenerateRequest, InputPictures, InvalidRequest, PartialRequest};
use pixart_pipeline::{Generation, Pipeline, PipelineError};
use pixart_server::core::image_source::{ImageRules, ImageSource};
use pixart_server::core::lora_source::{LoraRules, LoraSource};
use pixart_server::core::remote_file::FetchRules;

use crate::model_args::ModelArgs;
use crate::request_flags::RequestFlags;

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
    /// Folder for the image files (not written in sync mode).
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

/// Reads the `--request` JSON: a file, or standard input for `-`.
fn read_request_text(source: &str) -> Result<String> {
    if source == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read the request from standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(source).with_context(|| format!("cannot read the request file {source}"))
}

/// Builds the request: the `--request` JSON, then each plain flag set on top.
fn build_request(args: &GenerateArgs) -> Result<GenerateRequest> {
    let flags = args.fields.partial()?;
    let request = match &args.request {
        None => flags,
        Some(source) => {
            let text = read_request_text(source)?;
            // A field the flags replace may be wrong in the file: only the others must be valid.
            PartialRequest::from_json_with_overrides(&text, flags)
                .map_err(InvalidRequest)
                .with_context(|| format!("in the request {source}"))?
        }
    };
    Ok(request.into_request().map_err(InvalidRequest)?)
}

/// A progress bar on stderr when it is a terminal and not `--quiet`.
fn progress_bar(quiet: bool, steps: u32) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(u64::from(steps));
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} step {pos}/{len} · {per_sec} · ETA {eta}") {
        bar.set_style(style);
    }
    bar
}

/// The request's LoRAs, read from local files or URLs (this is the user's own machine: any
/// path, any address).
fn read_loras(request: &GenerateRequest, quiet: bool) -> Result<Vec<pixart_pipeline::LoraUse>> {
    read_lora_weights(&request.loras, quiet)
}

/// LoRAs read as the command line reads them; a line per LoRA on stderr unless `quiet`.
pub fn read_lora_weights(weights: &[pixart_fal::LoraWeight], quiet: bool) -> Result<Vec<pixart_pipeline::LoraUse>> {
    let rules = LoraRules {
        local_dir: None,
        any_local_path: true,
        allow_private: true,
        max_bytes: 64 << 30,
        timeout: std::time::Duration::from_secs(600),
    };
    let loras = LoraSource::new(rules, None, None).resolve(weights, None).map_err(InvalidRequest)?;
    for (i, used) in loras.iter().enumerate() {
        let lora = &used.lora;
        if !quiet {
            eprintln!("LoRA {i}: {} layers ({}), scale {}", lora.layer_count(), lora.layout(), used.scale);
        }
        if !lora.text_encoder_tensors().is_empty() {
            eprintln!(
                "warning: LoRA {i}: {} text-encoder tensors not applied (the transformer's are)",
                lora.text_encoder_tensors().len()
            );
        }
    }
    Ok(loras)
}

/// The request's input pictures (`--image`, `--mask`), read from local files, URLs or `data:`
/// URIs (the user's own machine: any path, any address), decoded within the usual limits.
pub fn read_pictures(request: &GenerateRequest) -> Result<InputPictures> {
    let fetch = FetchRules { allow_private: true, max_bytes: 1 << 30, timeout: std::time::Duration::from_secs(600) };
    let rules = ImageRules { any_local_path: true, fetch, decode: pixart_fal::DecodeLimits::default() };
    Ok(ImageSource::new(rules, None).resolve(request, None).map_err(InvalidRequest)?)
}

/// Runs the request; the engine's refusals come back in the request's own field names.
fn generate(
    pipeline: &Pipeline,
    request: &GenerateRequest,
    params: pixart_pipeline::GenerationParams,
    quiet: bool,
) -> Result<Generation> {
    let bar = progress_bar(quiet, request.num_inference_steps.get());
    let generation = pipeline.generate_with_progress(&params, |progress| {
        bar.set_length(progress.total as u64);
        bar.set_position(progress.step as u64);
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    generation.map_err(|e: PipelineError| match pixart_fal::invalid_fields(&e) {
        Some(fields) => InvalidRequest(fields).into(),
        None => anyhow::Error::new(e),
    })
}

/// A `file://` URL of a written image.
fn file_url(path: &Path) -> Result<String> {
    let absolute = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    url::Url::from_file_path(&absolute)
        .map(String::from)
        .map_err(|()| anyhow::anyhow!("{} has no file URL", absolute.display()))
}

/// Runs `pixart generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    // Validate everything the user typed before loading gigabytes of weights.
    let request = build_request(&args)?;
    let loras = read_loras(&request, args.quiet)?;
    let pictures = read_pictures(&request)?;
    let mut params = request.to_params_with_pictures(pictures).map_err(|e| InvalidRequest(vec![e]))?;
    params.loras = loras;
    let options = args.model.load_options()?;
    if !request.sync_mode {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("cannot create the output folder {}", args.out_dir.display()))?;
    }
    let pipeline = args.model.load_pipeline(&options)?;
    let generation = generate(&pipeline, &request, params, args.quiet)?;
    if let Some(path) = &args.save_latents {
        generation
            .latents
            .save_safetensors("latents", path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let response = pixart_fal::respond(&request, &generation, |file_name, bytes| {
        let path = args.out_dir.join(file_name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(file_url(&path)?)
    })?;
    crate::emit(&serde_json::to_string_pretty(&response)?)
}
