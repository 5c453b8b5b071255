//! `pixart generate`.

use std::io::{IsTerminal, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use pixart_pipeline::{GenerateRequest, HubOptions, LoadOptions, Pipeline, PipelineError, DEFAULT_MODEL};
use serde_json::{json, Map, Value};

/// Where to run.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// The first CUDA GPU (build with `--features cuda`).
    Cuda,
    /// The Metal GPU (build with `--features metal`).
    Metal,
}

/// Compute precision.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats: the reference precision.
    F32,
    /// bfloat16.
    Bf16,
    /// float16 (the VAE runs in f32, T5's `wo` in f32).
    F16,
}

/// Arguments of `pixart generate`. Plain flags override the fields of `--request`.
///
/// `enable_safety_checker` is accepted for compatibility with fal, but no safety checker runs yet:
/// `has_nsfw_concepts` is always false.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a diffusers-layout folder or a Hugging Face repo id.
    #[arg(long, env = "PIXART_MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    /// A fal request as JSON: a file, or `-` for standard input.
    #[arg(long)]
    request: Option<String>,
    /// Folder for the PNG files (not written in sync mode).
    #[arg(long, env = "PIXART_OUT_DIR", default_value = ".")]
    out_dir: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// The negative prompt.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Seed of the generator (random when absent; returned in the response).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps (1 to 200; default 35).
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale (0 to 20; default 4.5; ≤ 1 disables guidance).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// DPM-SOLVER (default) or SA-SOLVER.
    #[arg(long)]
    scheduler: Option<String>,
    /// A style name, e.g. "Anime" or "(No style)".
    #[arg(long)]
    style: Option<String>,
    /// WIDTHxHEIGHT (e.g. 768x512) or a preset: square_hd, square, portrait_4_3, portrait_16_9,
    /// landscape_4_3, landscape_16_9.
    #[arg(long)]
    image_size: Option<String>,
    /// Images per request (1 to 8), drawn as one noise batch.
    #[arg(long)]
    num_images: Option<u32>,
    /// Return images as data URIs in the JSON instead of writing files.
    #[arg(long)]
    sync_mode: bool,
    /// Accepted for fal compatibility; no safety checker runs yet (has_nsfw_concepts is false).
    #[arg(long)]
    enable_safety_checker: Option<bool>,
    /// Device to run on.
    #[arg(long, env = "PIXART_DEVICE", value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Compute dtype (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long, env = "PIXART_DTYPE", value_enum)]
    dtype: Option<DtypeArg>,
    /// Never use the network: read the model from the hub cache only (like HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// The Hugging Face hub cache folder (default: HF_HUB_CACHE, else $HF_HOME/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Clean prompts as diffusers' `clean_caption=True` does (URLs, HTML, ids… removed); default
    /// is diffusers' `clean_caption=False` (lowercase and strip only).
    #[arg(long, env = "PIXART_CLEAN_CAPTION")]
    clean_caption: bool,
    /// Also write the final latents (before VAE decoding) to this safetensors file, as `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Builds the request: the `--request` JSON, then each plain flag set on top.
fn build_request(args: &GenerateArgs) -> Result<GenerateRequest> {
    let mut fields = match &args.request {
        None => Map::new(),
        Some(source) => {
            let text = if source == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("cannot read the request from standard input")?;
                text
            } else {
                std::fs::read_to_string(source).with_context(|| format!("cannot read the request file {source}"))?
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => bail!("the request in {source} must be a JSON object"),
                Err(e) => bail!("malformed JSON in the request {source}: {e}"),
            }
        }
    };
    let mut set = |key: &str, value: Value| {
        fields.insert(key.to_string(), value);
    };
    if let Some(v) = &args.prompt {
        set("prompt", json!(v));
    }
    if let Some(v) = &args.negative_prompt {
        set("negative_prompt", json!(v));
    }
    if let Some(v) = args.seed {
        set("seed", json!(v));
    }
    if let Some(v) = args.steps {
        set("num_inference_steps", json!(v));
    }
    if let Some(v) = args.guidance_scale {
        set("guidance_scale", json!(v));
    }
    if let Some(v) = &args.scheduler {
        set("scheduler", json!(v));
    }
    if let Some(v) = &args.style {
        set("style", json!(v));
    }
    if let Some(v) = &args.image_size {
        set("image_size", parse_image_size(v));
    }
    if let Some(v) = args.num_images {
        set("num_images", json!(v));
    }
    if args.sync_mode {
        set("sync_mode", json!(true));
    }
    if let Some(v) = args.enable_safety_checker {
        set("enable_safety_checker", json!(v));
    }
    GenerateRequest::from_value(&Value::Object(fields)).map_err(|errors| PipelineError::Invalid(errors).into())
}

/// `WxH` becomes `{"width", "height"}` (validated with the request); anything else is a preset.
pub fn parse_image_size(text: &str) -> Value {
    let parsed = text
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<i64>().ok()?, h.trim().parse::<i64>().ok()?)));
    match parsed {
        Some((width, height)) => json!({ "width": width, "height": height }),
        None => json!(text),
    }
}

/// The dtype to use: the one asked for, else f32 on the CPU and bf16 on a GPU.
pub fn dtype_for(arg: Option<DtypeArg>, device: &Device) -> DType {
    match arg {
        Some(DtypeArg::F32) => DType::F32,
        Some(DtypeArg::Bf16) => DType::BF16,
        Some(DtypeArg::F16) => DType::F16,
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
    }
}

/// Hub options from the environment, with the command line's overrides.
pub fn hub_options(offline: bool, cache_dir: Option<PathBuf>) -> HubOptions {
    let mut hub = HubOptions::from_env();
    hub.offline |= offline;
    if cache_dir.is_some() {
        hub.cache_dir = cache_dir;
    }
    hub
}

/// The candle device for a `--device` value.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            Device::new_cuda(0).context("cannot use CUDA (this build needs `--features cuda` and an NVIDIA driver)")
        }
        DeviceArg::Metal => {
            Device::new_metal(0).context("cannot use Metal (this build needs `--features metal` on macOS)")
        }
    }
}

fn file_url(path: &Path) -> Result<String> {
    let absolute = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(format!("file://{}", absolute.display()))
}

/// Runs `pixart generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    // Validate everything the user typed before loading gigabytes of weights.
    let request = build_request(&args)?;
    let device = device(args.device)?;
    let dtype = dtype_for(args.dtype, &device);
    let hub = hub_options(args.offline, args.cache_dir.clone());
    if !request.sync_mode {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("cannot create the output folder {}", args.out_dir.display()))?;
    }
    let pipeline = Pipeline::load(
        &args.model,
        &LoadOptions { device, dtype, hub, clean_caption: args.clean_caption, ..LoadOptions::default() },
    )?;

    let bar = if args.quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(u64::from(request.num_inference_steps));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} step {pos}/{len} · {per_sec} · ETA {eta}")
                .expect("a valid template"),
        );
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
        std::fs::write(&path, png)
            .map_err(|e| PipelineError::Image(format!("cannot write {}: {e}", path.display())))?;
        file_url(&path).map_err(|e| PipelineError::Image(e.to_string()))
    })?;
    crate::emit(&serde_json::to_string_pretty(&response)?)
}
