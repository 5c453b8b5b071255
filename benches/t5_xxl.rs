//! The text encoder at full T5 v1.1 XXL size (4.76 B parameters) per storage type, on the CPU:
//! resident memory after loading, load time, and encode time; plus the image difference per type
//! on the tiny fixture against diffusers.
//!
//! ```text
//! cargo bench --bench t5_xxl -- --dir /tmp/t5-xxl --out benches/results/t5-xxl-cpu-epyc-2core
//! ```
//!
//! Steps: writes random XXL weights (transformers' T5 initialisation) once as a bf16 GGUF file
//! with llama.cpp tensor names (9.5 GB) plus the XXL config.json; then, each in a fresh process
//! so the resident set is its own, loads that file as bf16 or quantized on load to q8_0, q6k,
//! q5k, q4k (the `--text-encoder-quant` path), and encodes a 32-token prompt. f32 (19 GB) is
//! computed from tensor sizes only: it does not fit beside the file cache on a 24 GB machine.
//!
//! Under `cargo test --benches` (no `--bench` argument) the same steps run on a small T5 of the
//! same structure in a temporary folder, so CI keeps this program working without 9.5 GB.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use pixart_fal::GenerateRequest;
use pixart_pipeline::{LoadOptions, Pipeline, TextEncoderOptions};
use pixart_t5::{llama_cpp_name, QuantType, T5Config, T5Encoder, T5LoadOptions, T5WeightsFile};
use serde_json::{json, Value};

const XXL: &str = r#"{"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
  "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
  "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}"#;

/// The test-mode stand-in: XXL's structure, 256 wide, 2 blocks.
const SMALL: &str = r#"{"vocab_size": 512, "d_model": 256, "d_kv": 64, "d_ff": 512, "num_layers": 2,
  "num_heads": 4, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
  "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}"#;

const PROMPT_TOKENS: usize = 32;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Every tensor of the XXL encoder: (transformers name, shape, init std).
/// `lscpu`'s model name, from `/proc/cpuinfo` (the first `model name`).
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info.lines().find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')));
    name.map_or_else(|| std::env::consts::ARCH.to_string(), |(_, v)| v.trim().to_string())
}

fn xxl_tensors(c: &T5Config) -> Vec<(String, Vec<usize>, f64)> {
    let (d, inner, ff) = (c.d_model, c.num_heads * c.d_kv, c.d_ff);
    let mut out = vec![("shared.weight".to_string(), vec![c.vocab_size, d], 1.0)];
    for i in 0..c.num_layers {
        let p = format!("encoder.block.{i}");
        out.push((format!("{p}.layer.0.layer_norm.weight"), vec![d], 0.0));
        out.push((format!("{p}.layer.0.SelfAttention.q.weight"), vec![inner, d], ((d * c.d_kv) as f64).powf(-0.5)));
        out.push((format!("{p}.layer.0.SelfAttention.k.weight"), vec![inner, d], (d as f64).powf(-0.5)));
        out.push((format!("{p}.layer.0.SelfAttention.v.weight"), vec![inner, d], (d as f64).powf(-0.5)));
        out.push((format!("{p}.layer.0.SelfAttention.o.weight"), vec![d, inner], (inner as f64).powf(-0.5)));
        if i == 0 {
            out.push((
                format!("{p}.layer.0.SelfAttention.relative_attention_bias.weight"),
                vec![c.relative_attention_num_buckets, c.num_heads],
                (d as f64).powf(-0.5),
            ));
        }
        out.push((format!("{p}.layer.1.layer_norm.weight"), vec![d], 0.0));
        out.push((format!("{p}.layer.1.DenseReluDense.wi_0.weight"), vec![ff, d], (d as f64).powf(-0.5)));
        out.push((format!("{p}.layer.1.DenseReluDense.wi_1.weight"), vec![ff, d], (d as f64).powf(-0.5)));
        out.push((format!("{p}.layer.1.DenseReluDense.wo.weight"), vec![d, ff], (ff as f64).powf(-0.5)));
    }
    out.push(("encoder.final_layer_norm.weight".into(), vec![d], 0.0));
    out
}

fn write_model(dir: &Path, config_json: &str) {
    let config: T5Config = serde_json::from_str(config_json).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    let path = dir.join("t5-xxl-bf16.gguf");
    if path.exists() {
        return;
    }
    let started = Instant::now();
    let mut tensors = Vec::new();
    for (name, shape, std) in xxl_tensors(&config) {
        // Norm weights are ones (std 0 marks them); everything else N(0, std²).
        let t = if std == 0.0 {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
        } else {
            Tensor::randn(0f32, std as f32, shape.as_slice(), &Device::Cpu).unwrap()
        };
        let ggml = if shape.len() == 1 { GgmlDType::F32 } else { GgmlDType::BF16 };
        tensors.push((llama_cpp_name(&name).unwrap(), QTensor::quantize(&t, ggml).unwrap()));
    }
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    gguf_file::write(&mut file, &[], &refs).unwrap();
    eprintln!("wrote {} in {:.0} s", path.display(), started.elapsed().as_secs_f64());
}

/// One measurement, in this process: load the file as `quant` asks, encode, report.
fn measure(dir: &Path, quant: Option<QuantType>, repack: bool) -> Value {
    let config = T5Config::load(&dir.join("config.json")).unwrap();
    let before = rss_kib("VmRSS:");
    let started = Instant::now();
    // bf16 stays bf16 (compute bf16); quantized matrices compute in f32 around candle's qmatmul.
    let dtype = if quant.is_some() { DType::F32 } else { DType::BF16 };
    let options = T5LoadOptions { dtype, device: Device::Cpu, quant, cpu_repack: repack };
    let weights = T5WeightsFile::Gguf(dir.join("t5-xxl-bf16.gguf"));
    let encoder = T5Encoder::load_weights(&config, &weights, &options).unwrap();
    let load_s = started.elapsed().as_secs_f64();
    let after_load = rss_kib("VmRSS:");
    let peak_load = rss_kib("VmHWM:");
    let ids: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|i| (100 + 37 * i) % config.vocab_size as u32).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = encoder.forward(&ids, None).unwrap();
        out.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let summary = encoder.weight_summary();
    json!({
        "type": quant.map_or("bf16", QuantType::name),
        "cpu_repack": repack,
        "weights_bytes": summary.total_bytes(),
        "weights": summary.to_string(),
        "rss_after_load_bytes": (after_load - before.min(after_load)) * 1024,
        "peak_rss_bytes": rss_kib("VmHWM:") * 1024,
        "peak_rss_during_load_bytes": peak_load * 1024,
        "load_s": load_s,
        "encode_tokens": PROMPT_TOKENS,
        "encode_median_s": times[1],
    })
}

/// The tiny fixture end to end per type: max pixel difference against diffusers' image of the
/// original f32 model (default_dpm case).
fn fixture_images(root: &Path) -> Vec<Value> {
    let model = root.join("tests/fixtures/tiny-sigma-256");
    let case = root.join("tests/fixtures/goldens/e2e/default_dpm");
    let request = GenerateRequest::from_json(&std::fs::read_to_string(case.join("request.json")).unwrap()).unwrap();
    let gguf = |t: &str| Some(root.join(format!("tests/fixtures/gguf/tiny-sigma-256-t5-{t}.gguf")));
    let mut cases: Vec<(String, TextEncoderOptions)> = vec![("safetensors f32".into(), TextEncoderOptions::default())];
    for t in ["f16", "bf16", "q8_0"] {
        cases.push((format!("GGUF {t}"), TextEncoderOptions { weights: gguf(t), ..Default::default() }));
    }
    for q in QuantType::ALL {
        cases.push((format!("quantized on load {q}"), TextEncoderOptions { quant: Some(q), ..Default::default() }));
    }
    cases
        .into_iter()
        .map(|(name, text_encoder)| {
            let mut options = LoadOptions::default();
            options.text_encoder = text_encoder;
            let pipeline = Pipeline::load(model.to_str().unwrap(), &options).unwrap();
            let image = &pipeline.generate(&request.to_params()).unwrap().images[0];
            let diff = pixart_suite::max_pixel_diff(&image.pixels, &case.join("image_0.png"));
            json!({ "text_encoder": name, "weights": pipeline.text_encoder_weights().to_string(), "max_pixel_diff": diff })
        })
        .collect()
}

fn table(results: &[Value], config: &T5Config, images: &[Value], command: &str) -> String {
    let params: usize = xxl_tensors(config).iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    let gb = |b: f64| b / 1e9;
    let mut md = format!(
        "# T5 v1.1 XXL text encoder per storage type — CPU ({}, {} cores)\n\n`{command}`\n\n\
         Random weights of the full XXL shape ({:.3} B parameters), loaded from a bf16 GGUF with llama.cpp \
         names; the quantized types are quantized on load. Encode: one {PROMPT_TOKENS}-token prompt, median of 3.\n\n\
         `cpu kernels`: compact = ggml's block dot products on the weights as loaded (the default); repacked = \
         candle's repacking kernels (`--text-encoder-repack`), which keep a second, interleaved copy of each \
         q8_0/q6k/q4k matrix after the first encode. bf16 computes in bf16 (emulated: no bf16 CPU kernels in \
         this build); the quantized types compute in f32 around the quantized matmuls.\n\n\
         | type | cpu kernels | bytes / weight | weights (from tensor sizes) | resident after load | peak RSS (load + 3 encodes) | load | encode {PROMPT_TOKENS} tokens |\n|---|---|---|---|---|---|---|---|\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, usize::from),
        params as f64 / 1e9
    );
    md += &format!("| f32 | | 4 | {:.2} GB | (not measured: 19 GB) | | | |\n", gb(params as f64 * 4.0));
    for r in results {
        let t = r["type"].as_str().unwrap_or("");
        let bpw = t.parse::<QuantType>().map_or(2.0, QuantType::bytes_per_weight);
        md += &format!(
            "| {t} | {} | {bpw:.4} | {:.2} GB | {:.2} GB | {:.2} GB | {:.1} s | {:.2} s |\n",
            if t == "bf16" {
                ""
            } else if r["cpu_repack"] == true {
                "repacked"
            } else {
                "compact"
            },
            gb(r["weights_bytes"].as_f64().unwrap_or(0.0)),
            gb(r["rss_after_load_bytes"].as_f64().unwrap_or(0.0)),
            gb(r["peak_rss_bytes"].as_f64().unwrap_or(0.0)),
            r["load_s"].as_f64().unwrap_or(0.0),
            r["encode_median_s"].as_f64().unwrap_or(0.0),
        );
    }
    md +=
        "\nImage difference on the tiny fixture (tiny-sigma-256, default_dpm request) against diffusers' image of the \
           original f32 model. Its matrices have rows of 32 and 64 weights, narrower than the k-quants' 256-weight \
           blocks, so q6k/q5k/q4k fall back to q8_0 there (the weights column says so):\n\n\
           | text encoder | weights | max pixel difference |\n|---|---|---|\n";
    for i in images {
        md += &format!(
            "| {} | {} | {}/255 |\n",
            i["text_encoder"].as_str().unwrap_or(""),
            i["weights"].as_str().unwrap_or(""),
            i["max_pixel_diff"]
        );
    }
    md
}

fn main() {
    // `cargo bench` passes `--bench`; a child measurement is `--measure TYPE`.
    let bench = std::env::args().any(|a| a == "--bench");
    let default_dir = if bench {
        PathBuf::from("/tmp/t5-xxl")
    } else {
        std::env::temp_dir().join(format!("pixart-t5-small-{}", std::process::id()))
    };
    let dir = arg("--dir").map_or(default_dir, PathBuf::from);
    if let Some(t) = arg("--measure") {
        let (t, repack) = t.strip_suffix("+repack").map_or((t.as_str(), false), |t| (t, true));
        let quant = if t == "bf16" { None } else { Some(t.parse::<QuantType>().unwrap()) };
        println!("{}", measure(&dir, quant, repack));
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let images = fixture_images(&root);
    let config_json = if bench { XXL } else { SMALL };
    let config: T5Config = serde_json::from_str(config_json).unwrap();
    write_model(&dir, config_json);
    let mut results = Vec::new();
    // candle repacks q8_0, q6k and q4k only: q5k runs the block dot products either way.
    for t in ["bf16", "q8_0", "q8_0+repack", "q6k", "q6k+repack", "q5k", "q4k", "q4k+repack"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--dir", dir.to_str().unwrap(), "--measure", t])
            .args(bench.then_some("--bench"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{t}: {}", String::from_utf8_lossy(&out.stderr));
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("{value}");
        results.push(value);
    }
    let out_arg = arg("--out").map(|o| format!(" --out {o}")).unwrap_or_default();
    let command = format!("cargo bench --bench t5_xxl -- --dir {}{out_arg}", dir.display());
    let md = table(&results, &config, &images, &command);
    println!("{md}");
    if !bench {
        std::fs::remove_dir_all(&dir).ok();
        return;
    }
    if let Some(out) = arg("--out") {
        std::fs::create_dir_all(&out).unwrap();
        let doc =
            json!({ "command": command, "prompt_tokens": PROMPT_TOKENS, "types": results, "fixture_images": images });
        std::fs::write(Path::new(&out).join("results.json"), serde_json::to_string_pretty(&doc).unwrap() + "\n")
            .unwrap();
        std::fs::write(Path::new(&out).join("results.md"), md).unwrap();
    }
}
