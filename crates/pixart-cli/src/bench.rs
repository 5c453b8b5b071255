//! `pixart bench`: time each stage of a generation and report peak memory, as a table or JSON.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::builder::FalseyValueParser;
use clap::Args;
use pixart_fal::{GuidanceScale, ImageSize, SchedulerKind, Steps, Strength};
use pixart_pipeline::{GenerationParams, Pipeline, StageTimings, WeightSummary};
use serde_json::{json, Value};

use crate::model_args::ModelArgs;

/// Arguments of `pixart bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image size, WIDTHxHEIGHT or a fal preset.
    #[arg(long, env = "PIXART_SIZE", default_value = "1024x1024")]
    size: ImageSize,
    /// Denoising steps per run.
    #[arg(long, env = "PIXART_STEPS", default_value = "20")]
    steps: Steps,
    /// DPM-SOLVER or SA-SOLVER.
    #[arg(long, env = "PIXART_SCHEDULER", default_value = "DPM-SOLVER")]
    scheduler: SchedulerKind,
    /// Classifier-free guidance scale (> 1 runs the batch of 2 diffusers runs).
    #[arg(long, env = "PIXART_GUIDANCE_SCALE", default_value = "4.5")]
    guidance_scale: GuidanceScale,
    /// The prompt.
    #[arg(long, env = "PIXART_PROMPT", default_value = "a small cactus with a happy face in the sahara desert")]
    prompt: String,
    /// Seed of every run.
    #[arg(long, env = "PIXART_SEED", default_value_t = 0)]
    seed: u64,
    /// Measured runs (after the warm-up runs).
    #[arg(long, env = "PIXART_RUNS", default_value_t = 3)]
    runs: usize,
    /// Warm-up runs, not reported.
    #[arg(long, env = "PIXART_WARMUP", default_value_t = 1)]
    warmup: usize,
    /// Print JSON instead of a table.
    #[arg(long, env = "PIXART_JSON", value_parser = FalseyValueParser::new())]
    json: bool,
    /// A LoRA, `PATH[:SCALE]` (repeatable): the runs are measured without LoRA, then with them,
    /// and the report gives the transformer step's ratio and the merge time.
    #[arg(long = "lora", env = "PIXART_LORA", value_name = "PATH[:SCALE]", action = clap::ArgAction::Append)]
    loras: Vec<String>,
    /// Image-to-image from this picture (a path or URL), resized to `--size`: the report adds
    /// the image's resize and VAE encoding (`image_encode`).
    #[arg(long, env = "PIXART_IMAGE", value_name = "PATH|URL")]
    image: Option<String>,
    /// The strength of `--image` (the run takes the last ⌊steps · strength⌋ steps).
    #[arg(long, env = "PIXART_STRENGTH", default_value = "0.8")]
    strength: Strength,
}

/// Device memory in use now, in bytes: the CUDA device's used memory, or the process's peak
/// resident set on the CPU (`VmHWM`).
fn memory_in_use(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some((total - free) as u64)
        }
        _ => {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
        }
    }
}

/// Starts a new peak on the CPU: `VmHWM` is reset to the current resident set (Linux
/// `clear_refs` 5). Returns false where that is not possible (peaks are then cumulative).
fn reset_peak(device: &Device) -> bool {
    device.is_cpu() && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak memory per stage: on the CPU the process's peak resident set within the stage (reset at
/// each stage start), on a GPU the device memory in use sampled at the stage's start, after
/// every step and at its end.
struct StageMemory {
    device: Device,
    current: Option<&'static str>,
    /// (stage, peak bytes), in the order the stages first ran.
    peaks: Vec<(&'static str, u64)>,
    resets: bool,
}

impl StageMemory {
    fn new(device: &Device) -> Self {
        Self { device: device.clone(), current: None, peaks: Default::default(), resets: true }
    }

    fn sample(&mut self) {
        if let (Some(stage), Some(bytes)) = (self.current, memory_in_use(&self.device)) {
            match self.peaks.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, peak)) => *peak = (*peak).max(bytes),
                None => self.peaks.push((stage, bytes)),
            }
        }
    }

    fn enter(&mut self, stage: &'static str) {
        self.sample();
        if self.device.is_cpu() {
            self.resets &= reset_peak(&self.device);
        }
        self.current = Some(stage);
        self.sample();
    }

    fn finish(&mut self) {
        self.sample();
        self.current = None;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    json!({ "mean_ms": mean, "min_ms": sorted.first().copied().unwrap_or(0.0), "median_ms": sorted.get(sorted.len() / 2).copied().unwrap_or(0.0) })
}

/// The parameters every run uses (the `--image` read as the command line reads pictures).
fn params(args: &BenchArgs) -> Result<GenerationParams> {
    let mut params = GenerationParams::new(args.prompt.clone())
        .with_steps(args.steps.get())
        .with_sampler(args.scheduler.sampler())
        .with_guidance_scale(args.guidance_scale.get())
        .with_seed(args.seed);
    if let Some(image) = &args.image {
        let mut request = pixart_fal::GenerateRequest::new(args.prompt.clone());
        request.image_url = Some(pixart_fal::ImageUrl::new("image_url", image.clone())?);
        let picture = crate::generate::read_pictures(&request)?.image.context("no picture")?;
        params = params.with_image(picture, args.strength.get())?;
    }
    params.size = args.size.dimensions();
    Ok(params)
}

/// Runs the warm-up and measured generations; returns the measured runs' timings.
fn measure(
    pipeline: &Pipeline,
    params: &GenerationParams,
    args: &BenchArgs,
    memory: &mut StageMemory,
) -> Result<Vec<StageTimings>> {
    let mut runs = Vec::with_capacity(args.runs);
    for i in 0..args.warmup + args.runs {
        let memory = std::cell::RefCell::new(&mut *memory);
        let generation = pipeline.generate_with_stages(
            params,
            |stage| memory.borrow_mut().enter(stage.name()),
            |_| {
                memory.borrow_mut().sample();
                std::ops::ControlFlow::Continue(())
            },
        )?;
        memory.borrow_mut().finish();
        if i >= args.warmup {
            runs.push(generation.timings);
        }
    }
    Ok(runs)
}

/// What was measured, as `--json` prints it.
struct Measured<'a> {
    load: Duration,
    runs: &'a [StageTimings],
    memory: &'a StageMemory,
    baseline: Option<u64>,
    peak: Option<u64>,
    text_encoder: &'a WeightSummary,
}

/// The stages of the report, in order.
const STAGES: [&str; 10] = [
    "tokenize",
    "text_encoder_load",
    "text_encoder",
    "image_encode",
    "transformer_step",
    "denoise_total",
    "vae",
    "postprocess",
    "safety_checker",
    "total",
];

fn report_json(args: &BenchArgs, device: &Device, dtype: candle_core::DType, measured: &Measured<'_>) -> Value {
    let runs = measured.runs;
    let per_run = |f: &dyn Fn(&StageTimings) -> Duration| runs.iter().map(|r| ms(f(r))).collect::<Vec<_>>();
    let steps: Vec<f64> = runs.iter().flat_map(|r| r.steps.iter().map(|d| ms(*d))).collect();
    let memory = measured.memory;
    let by_stage: serde_json::Map<String, Value> =
        memory.peaks.iter().map(|(stage, bytes)| ((*stage).to_string(), json!(bytes))).collect();
    let size = args.size.dimensions();
    let stage_measure = if device.is_cpu() && !memory.resets {
        "cumulative process peak (VmHWM could not be reset)"
    } else if device.is_cpu() {
        "process peak resident set within the stage (VmHWM reset at its start)"
    } else {
        "device memory in use, sampled at the stage's start, after every step and at its end"
    };
    json!({
        "model": args.model.model,
        "device": format!("{:?}", device.location()),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "size": size.to_string(),
        "steps": args.steps.get(),
        "scheduler": args.scheduler.name(),
        "guidance_scale": args.guidance_scale.get(),
        "image": args.image,
        "strength": args.image.as_ref().map(|_| args.strength.get()),
        "runs": args.runs,
        "load_s": measured.load.as_secs_f64(),
        "stages": {
            "tokenize": summary(&per_run(&|r| r.tokenize)),
            "text_encoder_load": summary(&per_run(&|r| r.text_encoder_load)),
            "text_encoder": summary(&per_run(&|r| r.text_encoder)),
            "image_encode": summary(&per_run(&|r| r.image_encode)),
            "transformer_step": summary(&steps),
            "denoise_total": summary(&per_run(&StageTimings::denoise)),
            "vae": summary(&per_run(&|r| r.vae)),
            "postprocess": summary(&per_run(&|r| r.postprocess)),
            "safety_checker": summary(&per_run(&|r| r.safety_checker)),
            "total": summary(&per_run(&|r| r.total)),
        },
        // Every step in order (run after run): where the median hides a slow stretch.
        "transformer_step_samples_ms": steps,
        "peak_memory_bytes": measured.peak,
        "peak_memory_by_stage_bytes": by_stage,
        "peak_memory_by_stage_measure": stage_measure,
        "text_encoder_weights": {
            "bytes": measured.text_encoder.total_bytes(),
            "summary": measured.text_encoder.to_string(),
            "offload": args.model.offload.name(),
        },
        "memory_before_load_bytes": measured.baseline,
        "memory_measure": if device.is_cpu() { "process peak resident set (VmHWM)" } else { "device memory in use, sampled after every step" },
    })
}

fn report_table(args: &BenchArgs, report: &Value, measured: &Measured<'_>) -> Result<String> {
    use std::fmt::Write as _;
    let text = |key: &str| report[key].as_str().unwrap_or("").to_string();
    let mut out = String::new();
    writeln!(
        out,
        "pixart bench · {} · {} {} · {} · {} steps {} · {} runs",
        args.model.model,
        text("device"),
        text("dtype"),
        text("size"),
        args.steps,
        args.scheduler,
        args.runs
    )?;
    writeln!(out, "{:<18} {:>12} {:>12} {:>12}", "stage", "mean ms", "median ms", "min ms")?;
    for stage in STAGES {
        let s = &report["stages"][stage];
        let value = |key: &str| s[key].as_f64().unwrap_or(0.0);
        writeln!(out, "{stage:<18} {:>12.2} {:>12.2} {:>12.2}", value("mean_ms"), value("median_ms"), value("min_ms"))?;
    }
    writeln!(out, "{:<18} {:>12.2} s", "model load", measured.load.as_secs_f64())?;
    writeln!(out, "{:<18} {}", "text encoder", measured.text_encoder)?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    for (stage, bytes) in &measured.memory.peaks {
        writeln!(out, "{:<18} {:>12.1} MiB", format!("peak · {stage}"), mib(*bytes))?;
    }
    match measured.peak {
        Some(bytes) => writeln!(out, "{:<18} {:>12.1} MiB ({})", "peak memory", mib(bytes), text("memory_measure")),
        None => writeln!(out, "{:<18} {:>12}", "peak memory", "unavailable"),
    }?;
    Ok(out.trim_end().to_string())
}

/// Runs `pixart bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let params = params(&args)?;
    let loras = read_loras(&args.loras)?;
    let mut options = args.model.load_options()?;
    options.prompt_cache_size = 0; // every run encodes its prompt, so T5 is timed too
    let (device, dtype) = (options.device.clone(), options.dtype);
    let baseline = memory_in_use(&device);
    let mut memory = StageMemory::new(&device);

    let load_started = Instant::now();
    memory.enter("load");
    let pipeline = args.model.load_pipeline(&options).context("loading the model")?;
    let load = load_started.elapsed();
    memory.finish();

    let runs = measure(&pipeline, &params, &args, &mut memory)?;
    let lora =
        if loras.is_empty() { None } else { Some(measure_loras(&pipeline, &params, loras, &args, &runs, &device)?) };
    let peak = memory.peaks.iter().map(|(_, b)| *b).max().max(memory_in_use(&device).filter(|_| !device.is_cpu()));
    let text_encoder = pipeline.text_encoder_weights().clone();
    let measured = Measured { load, runs: &runs, memory: &memory, baseline, peak, text_encoder: &text_encoder };
    let mut report = report_json(&args, &device, dtype, &measured);
    if let Some(map) = report.as_object_mut() {
        // How the matrix products ran (`--dtype bf16` on an AVX512-BF16 CPU: bf16; `--dtype f16`
        // on an AVX512-FP16 CPU: f16).
        let bf16 = options.cpu_products.in_bf16() && device.is_cpu();
        let f16 = options.cpu_products.in_f16() && device.is_cpu();
        let products = match (bf16, f16) {
            (true, _) => json!("bf16"),
            (_, true) => json!("f16"),
            _ => map["dtype"].clone(),
        };
        map.insert("cpu_products".into(), products);
        if bf16 {
            // `vdpbf16ps` ("dot") or f32 FMAs on the widened operands ("fma").
            map.insert("cpu_bf16_kernel".into(), json!(pixart_pipeline::Bf16Kernel::chosen().name()));
        }
        if let Some(lora) = &lora {
            map.insert("lora".into(), lora.clone());
        }
    }
    if args.json {
        return crate::emit(&serde_json::to_string_pretty(&report)?);
    }
    let mut table = report_table(&args, &report, &measured)?;
    if let Some(lora) = lora {
        let value = |key: &str| lora[key].as_f64().unwrap_or(0.0);
        table.push_str(&format!(
            "\n{:<18} {:>12.2} ms with LoRA vs {:.2} ms without: ratio {:.3}; merge {:.1} ms",
            "transformer_step",
            value("transformer_step_median_ms"),
            value("base_transformer_step_median_ms"),
            value("step_ratio"),
            value("merge_ms")
        ));
    }
    crate::emit(&table)
}

/// `--lora` values read as the command line reads LoRAs (any local path or URL).
fn read_loras(texts: &[String]) -> Result<Vec<pixart_pipeline::LoraUse>> {
    use pixart_fal::FieldValue;
    let mut weights = Vec::new();
    for text in texts {
        weights.extend(
            Vec::<pixart_fal::LoraWeight>::from_text("loras", text).map_err(|e| pixart_fal::InvalidRequest(vec![e]))?,
        );
    }
    crate::generate::read_lora_weights(&weights, true)
}

/// The same runs with the LoRAs: the transformer step against the base runs', and the merge.
fn measure_loras(
    pipeline: &Pipeline,
    params: &GenerationParams,
    loras: Vec<pixart_pipeline::LoraUse>,
    args: &BenchArgs,
    base: &[StageTimings],
    device: &Device,
) -> Result<Value> {
    let mut with_loras = params.clone();
    with_loras.loras = loras;
    // The first run merges (the next ones reuse the merged model): timed on its own.
    let merge = pipeline.generate(&with_loras)?.timings.lora_merge;
    let mut memory = StageMemory::new(device);
    let runs = measure(pipeline, &with_loras, args, &mut memory)?;
    let median = |runs: &[StageTimings]| {
        let steps: Vec<f64> = runs.iter().flat_map(|r| r.steps.iter().map(|d| ms(*d))).collect();
        summary(&steps)["median_ms"].as_f64().unwrap_or(0.0)
    };
    let (lora, plain) = (median(&runs), median(base));
    Ok(json!({
        "files": args.loras,
        "transformer_step_median_ms": lora,
        "base_transformer_step_median_ms": plain,
        "step_ratio": if plain > 0.0 { lora / plain } else { 0.0 },
        "merge_ms": ms(merge),
    }))
}
