//! `pixart generate` end to end on the fixture models: diffusers' images from fal requests, the
//! hf-hub offline cache path, and clear errors (never a panic, never a stray image) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::{repo_root, write_flagging_checker};

fn fixtures() -> PathBuf {
    repo_root().join("tests").join("fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pixart-cli-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pixart(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixart"));
    cmd.args(args).env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_CACHE").env_remove("PIXART_MODEL");
    // The tiny random safety checker (its bias leans to `normal`), unless a test picks its own.
    if !args.iter().any(|a| a.contains("safety-checker")) {
        cmd.env("PIXART_SAFETY_CHECKER", repo_root().join("tests/fixtures/tiny-safety-checker"));
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `pixart generate` on `model` for a 64×64, 2-step, sync-mode image of `prompt`, plus `extra`.
fn quick_generate(model: &str, prompt: &str, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut args =
        vec!["generate", "--model", model, "--prompt", prompt, "--image-size", "64x64", "--steps", "2", "--sync-mode"];
    args.extend_from_slice(extra);
    pixart(&args, envs)
}

/// `pixart bench --json` on `model`: one 2-step 64×64 run without warm-up, plus `extra`.
fn quick_bench(model: &str, extra: &[&str]) -> Value {
    let args = ["bench", "--model", model, "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0", "--json"];
    response(&pixart(&[&args[..], extra].concat(), &[]))
}

fn response(output: &Output) -> Value {
    assert!(output.status.success(), "pixart failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn png_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect())
        .unwrap_or_default()
}

fn max_diff(a: &Path, b: &Path) -> u8 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn cli_pngs_equal_diffusers_for_every_end_to_end_case() {
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(fixtures().join("goldens/e2e")).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 7);
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let model = std::fs::read_to_string(case.join("model.txt")).unwrap();
        let out = temp_dir(&name);
        let output = pixart(
            &[
                "generate",
                "--model",
                fixtures().join(model.trim()).to_str().unwrap(),
                "--request",
                case.join("request.json").to_str().unwrap(),
                "--out-dir",
                out.to_str().unwrap(),
            ],
            &[],
        );
        let json = response(&output);
        // stderr is not a terminal here: no progress bar output.
        assert!(!String::from_utf8_lossy(&output.stderr).contains("step"), "progress bar shown on a pipe");
        let images = json["images"].as_array().unwrap();
        assert_eq!(json["has_nsfw_concepts"].as_array().unwrap().len(), images.len());
        for (i, image) in images.iter().enumerate() {
            let url = image["url"].as_str().unwrap();
            let path = PathBuf::from(url.strip_prefix("file://").expect("a file:// URL"));
            assert_eq!(image["file_size"].as_u64().unwrap(), std::fs::metadata(&path).unwrap().len());
            let diff = max_diff(&path, &case.join(format!("image_{i}.png")));
            assert!(diff <= 2, "{name} image {i}: max pixel diff {diff}/255");
        }
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn sync_mode_returns_data_uris_and_writes_nothing() {
    let out = temp_dir("sync");
    let model = fixtures().join("tiny-sigma-256");
    let json = response(&quick_generate(
        model.to_str().unwrap(),
        "a cat",
        &["--seed", "9", "--out-dir", out.to_str().unwrap()],
        &[],
    ));
    assert!(json["images"][0]["url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert_eq!(json["seed"], 9);
    assert!(png_files(&out).is_empty());
}

#[test]
fn random_seed_is_returned_and_reproduces_the_image() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let first = response(&quick_generate(m, "x", &[], &[]));
    let seed = first["seed"].as_u64().unwrap().to_string();
    let again = response(&quick_generate(m, "x", &["--seed", &seed], &[]));
    assert_eq!(first["images"][0]["url"], again["images"][0]["url"]);
}

/// Lays a fixture out as a Hugging Face hub cache (blobs + snapshot symlinks + refs/main).
fn hub_cache(repo: &str, fixture: &Path) -> PathBuf {
    let cache = temp_dir("hub");
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let revision = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), revision).unwrap();
    let snapshot = folder.join("snapshots").join(revision);
    let blobs = folder.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut stack = vec![fixture.to_path_buf()];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(fixture).unwrap();
            n += 1;
            let blob = blobs.join(format!("blob{n:04}"));
            std::fs::copy(&path, &blob).unwrap();
            let link = snapshot.join(relative);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = relative.components().count();
            let target = PathBuf::from("../".repeat(depth + 1)).join("blobs").join(blob.file_name().unwrap());
            std::os::unix::fs::symlink(target, &link).unwrap();
        }
    }
    cache
}

#[test]
fn the_safety_checker_resolves_from_the_offline_hub_cache() {
    let cache = hub_cache("tiny-org/nsfw-checker", &fixtures().join("tiny-safety-checker"));
    let cache_str = cache.to_str().unwrap();
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache_str)];
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let from_cache =
        response(&quick_generate(m, "a cat", &["--seed", "1", "--safety-checker", "tiny-org/nsfw-checker"], &offline));
    let from_folder = response(&quick_generate(m, "a cat", &["--seed", "1"], &[]));
    assert_eq!(from_cache["has_nsfw_concepts"], serde_json::json!([false]));
    assert_eq!(from_cache["images"][0]["url"], from_folder["images"][0]["url"]);
    // A file missing from the cache is named; nothing starts.
    let snapshot = cache.join("models--tiny-org--nsfw-checker/snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::remove_file(snapshot.join("preprocessor_config.json")).unwrap();
    let output = quick_generate(m, "a cat", &["--safety-checker", "tiny-org/nsfw-checker"], &offline);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("preprocessor_config.json") && err.contains("--no-safety-checker"), "{err}");
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn hub_repo_ids_resolve_from_the_offline_cache() {
    let cache = hub_cache("tiny-org/tiny-sigma-256", &fixtures().join("tiny-sigma-256"));
    let cache_str = cache.to_str().unwrap();
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache_str)];
    let json = response(&quick_generate("tiny-org/tiny-sigma-256", "a cat", &["--seed", "1"], &offline));
    // The same image as from the folder itself.
    let local =
        response(&quick_generate(fixtures().join("tiny-sigma-256").to_str().unwrap(), "a cat", &["--seed", "1"], &[]));
    assert_eq!(json["images"][0]["url"], local["images"][0]["url"]);
    // A shard missing from the cache is named, with the offline reason.
    let snapshot = cache.join("models--tiny-org--tiny-sigma-256/snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::remove_file(snapshot.join("text_encoder/model-00002-of-00003.safetensors")).unwrap();
    let output = quick_generate("tiny-org/tiny-sigma-256", "a cat", &["--seed", "1"], &offline);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("model-00002-of-00003.safetensors") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // Not cached at all, offline: a clear error, no network.
    let output = pixart(
        &["generate", "--model", "nobody/nothing", "--prompt", "x", "--offline"],
        &[("HF_HUB_CACHE", cache_str)],
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("model_index.json"));
    std::fs::remove_dir_all(cache).unwrap();
}

/// Runs a bad invocation: non-zero exit without a panic, the message names `expect`, no PNG.
fn rejects(args: &[&str], expect: &[&str]) {
    let out = temp_dir("bad");
    let mut full = vec!["generate", "--out-dir", out.to_str().unwrap()];
    full.extend_from_slice(args);
    let output = pixart(&full, &[]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert_ne!(output.status.code(), Some(101), "{args:?} panicked: {err}");
    for e in expect {
        assert!(err.contains(e), "{args:?}: expected {e:?} in: {err}");
    }
    assert!(png_files(&out).is_empty(), "{args:?} wrote an image");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_requests_name_the_field_and_the_allowed_values() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    rejects(&["--model", m], &["prompt", "field required"]);
    rejects(&["--model", m, "--prompt", "x", "--steps", "0"], &["num_inference_steps", "1 to 200"]);
    rejects(&["--model", m, "--prompt", "x", "--steps", "100000"], &["num_inference_steps", "1 to 200"]);
    rejects(&["--model", m, "--prompt", "x", "--image-size", "huge"], &["image_size", "square_hd"]);
    rejects(&["--model", m, "--prompt", "x", "--image-size", "0x64"], &["image_size.width", "16 to 4096"]);
    rejects(&["--model", m, "--prompt", "x", "--image-size", "64x100000"], &["image_size.height", "16 to 4096"]);
    rejects(&["--model", m, "--prompt", "x", "--style", "Impressionist"], &["style", "Anime"]);
    rejects(&["--model", m, "--prompt", "x", "--scheduler", "EULER"], &["scheduler", "SA-SOLVER"]);
    rejects(&["--model", m, "--prompt", "x", "--num-images", "0"], &["num_images", "1 to 8"]);
    rejects(&["--model", m, "--prompt", "x", "--num-images", "1000"], &["num_images", "1 to 8"]);
    rejects(&["--model", m, "--prompt", "x", "--guidance-scale", "99"], &["guidance_scale", "0 to 20"]);
    let dir = temp_dir("requests");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    rejects(
        &[
            "--model",
            m,
            "--request",
            &write("types.json", r#"{"prompt": 5, "num_inference_steps": "ten", "sync_mode": "yes"}"#),
        ],
        &["prompt", "num_inference_steps", "sync_mode"],
    );
    rejects(&["--model", m, "--request", &write("malformed.json", r#"{"prompt": "x",,}"#)], &["malformed JSON"]);
    rejects(
        &["--model", m, "--request", &write("extra.json", r#"{"prompt": "x", "controlnets": []}"#)],
        &["controlnets", "unknown field"],
    );
    rejects(&["--model", m, "--request", &write("array.json", "[1, 2]")], &["JSON object"]);
    std::fs::remove_dir_all(dir).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn broken_model_folders_name_the_file() {
    let model = temp_dir("broken-model");
    copy_dir(&fixtures().join("tiny-sigma-256"), &model);
    let m = model.to_str().unwrap();
    let args = ["--model", m, "--prompt", "x", "--image-size", "64x64", "--steps", "1"];
    std::fs::remove_file(model.join("transformer/config.json")).unwrap();
    rejects(&args, &["transformer/config.json"]);
    std::fs::copy(fixtures().join("tiny-sigma-256/transformer/config.json"), model.join("transformer/config.json"))
        .unwrap();
    let weights = model.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    rejects(&args, &["vae/diffusion_pytorch_model.safetensors"]);
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::write(model.join("text_encoder/model.safetensors.index.json"), "{ not json").unwrap();
    rejects(&args, &["model.safetensors.index.json", "malformed JSON"]);
    std::fs::copy(
        fixtures().join("tiny-sigma-256/text_encoder/model.safetensors.index.json"),
        model.join("text_encoder/model.safetensors.index.json"),
    )
    .unwrap();
    // A corrupt spiece.model: the file and the reason, each cause printed once.
    std::fs::write(model.join("tokenizer/spiece.model"), [0x0a, 0xff, 0x01]).unwrap();
    let output = pixart(&[&["generate", "--out-dir", "/nonexistent-out"][..], &args].concat(), &[]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("spiece.model: truncated, or not a sentencepiece model"), "{err}");
    assert_eq!(err.matches("truncated").count(), 1, "{err}");
    std::fs::remove_dir_all(model).unwrap();
    rejects(&["--model", "/nonexistent/folder", "--prompt", "x"], &["/nonexistent/folder"]);
}

#[test]
fn help_explains_the_safety_checker() {
    let output = pixart(&["generate", "--help"], &[]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--no-safety-checker") && help.contains("Falconsai/nsfw_image_detection"), "{help}");
    assert!(help.contains("black"), "{help}");
}

/// A copy of the tiny checker that flags every image ([`write_flagging_checker`]).
fn flagging_checker() -> PathBuf {
    let dir = temp_dir("flagging-checker");
    write_flagging_checker(&dir);
    dir
}

#[test]
fn the_safety_checker_blackens_flagged_images_and_can_be_turned_off() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let checker = flagging_checker();
    let c = checker.to_str().unwrap();
    let out = temp_dir("flagged");
    let o = out.to_str().unwrap();
    let args = ["generate", "--model", m, "--prompt", "a cat", "--image-size", "64x48", "--steps", "2", "--seed", "4"];
    let json = response(&pixart(&[&args[..], &["--safety-checker", c, "--out-dir", o]].concat(), &[]));
    assert_eq!(json["has_nsfw_concepts"], serde_json::json!([true]));
    let png = image::open(&png_files(&out)[0]).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (64, 48));
    assert!(png.as_raw().iter().all(|&p| p == 0), "a flagged image is written black");
    std::fs::remove_dir_all(&out).unwrap();

    // The request turns it off: the picture is kept.
    let json = response(&pixart(
        &[&args[..], &["--safety-checker", c, "--enable-safety-checker", "false", "--sync-mode"]].concat(),
        &[],
    ));
    assert_eq!(json["has_nsfw_concepts"], serde_json::json!([false]));

    // Without a checker: unchecked by default, and asking for the check is refused naming the field.
    let json = response(&pixart(&[&args[..], &["--no-safety-checker", "--sync-mode"]].concat(), &[]));
    assert_eq!(json["has_nsfw_concepts"], serde_json::json!([false]));
    rejects(
        &["--model", m, "--prompt", "a", "--no-safety-checker", "--enable-safety-checker"],
        &["enable_safety_checker", "no safety checker is loaded"],
    );
    // A checker that cannot be loaded stops everything, saying how to go on.
    let missing =
        pixart(&[&args[..], &["--safety-checker", "org/not-cached", "--offline", "--sync-mode"]].concat(), &[]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{err}");
    assert!(err.contains("org/not-cached") && err.contains("--no-safety-checker"), "{err}");

    // pixart bench times it.
    let bench = quick_bench(m, &["--safety-checker", c]);
    assert!(bench["stages"]["safety_checker"]["mean_ms"].as_f64().unwrap() > 0.0, "{bench}");
    std::fs::remove_dir_all(&checker).unwrap();
}

#[test]
fn bench_reports_every_stage_as_json_and_as_a_table() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let output = pixart(
        &["bench", "--model", m, "--size", "64x64", "--steps", "3", "--runs", "2", "--warmup", "0", "--json"],
        &[],
    );
    let report = response(&output);
    for stage in ["tokenize", "text_encoder", "transformer_step", "denoise_total", "vae", "postprocess", "total"] {
        assert!(report["stages"][stage]["mean_ms"].as_f64().unwrap() >= 0.0, "{stage} missing: {report}");
    }
    assert!(report["stages"]["total"]["mean_ms"].as_f64().unwrap() > 0.0);
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["steps"], 3);
    // Every measured step (2 runs × 3), none from the warm-up; their median is the stage's.
    let mut samples: Vec<f64> =
        report["transformer_step_samples_ms"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(samples.len(), 6, "{report}");
    samples.sort_by(f64::total_cmp);
    let median = report["stages"]["transformer_step"]["median_ms"].as_f64().unwrap();
    assert!(samples[2] <= median && median <= samples[3], "{median} vs {samples:?}");
    let table =
        pixart(&["bench", "--model", m, "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0"], &[]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("transformer_step") && text.contains("peak memory"), "{text}");
    let bad = pixart(&["bench", "--model", m, "--steps", "0"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("num_inference_steps"));
    // From a picture: its encoding is a stage of its own, and the run takes ⌊4 · 0.5⌋ steps.
    let photo = fixtures().join("images/photo.png");
    let args = ["bench", "--model", m, "--size", "64x64", "--steps", "4", "--runs", "1", "--warmup", "0", "--json"];
    let report =
        response(&pixart(&[&args[..], &["--image", photo.to_str().unwrap(), "--strength", "0.5"]].concat(), &[]));
    assert!(report["stages"]["image_encode"]["mean_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["peak_memory_by_stage_bytes"]["image_encode"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["strength"], 0.5);
}

#[test]
fn bf16_and_f16_on_the_cpu_say_how_they_compute() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let args = ["bench", "--model", m, "--size", "64x64", "--steps", "1", "--runs", "1", "--warmup", "0", "--json"];
    let bf16_cpu = pixart_core::linear_bf16::CpuProducts::Bf16.in_bf16();
    let f16_cpu = pixart_core::linear_bf16::CpuProducts::F16.in_f16();
    for dtype in ["bf16", "f16"] {
        let output = pixart(&[&args[..], &["--dtype", dtype]].concat(), &[]);
        let report = response(&output);
        assert_eq!(report["dtype"], "f32", "{report}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if dtype == "bf16" && bf16_cpu {
            // AVX512-BF16: linear layers and the VAE's 3×3 convolutions in bf16, the rest in f32.
            assert_eq!(report["cpu_products"], "bf16", "{report}");
            assert!(
                stderr.contains("--dtype bf16 on this CPU: the transformer's linear layers and the VAE"),
                "{stderr}"
            );
        } else if dtype == "f16" && f16_cpu {
            // AVX512-FP16: the transformer's linear layers in f16, the rest (the VAE too) in f32.
            assert_eq!(report["cpu_products"], "f16", "{report}");
            assert!(
                stderr.contains("--dtype f16 on this CPU: the transformer's linear layers multiply in f16"),
                "{stderr}"
            );
        } else {
            assert_eq!(report["cpu_products"], "f32", "{report}");
            assert!(stderr.contains(&format!("--dtype {dtype}: computing in f32 on the CPU")), "{stderr}");
        }
    }
    if bf16_cpu {
        // Either bf16 kernel on request (without the variable the process takes the faster).
        for (kernel, says) in [("dot", "vdpbf16ps;"), ("fma", "f32 FMAs on the bf16 operands")] {
            let output = pixart(&[&args[..], &["--dtype", "bf16"]].concat(), &[("PIXART_BF16_KERNEL", kernel)]);
            assert_eq!(response(&output)["cpu_bf16_kernel"], kernel);
            assert!(String::from_utf8_lossy(&output.stderr).contains(says), "{kernel}");
        }
    }
    // PIXART_SIMD=avx2 runs what an AVX2-only CPU runs: neither half-precision kernel.
    for dtype in ["bf16", "f16"] {
        let output = pixart(&[&args[..], &["--dtype", dtype]].concat(), &[("PIXART_SIMD", "avx2")]);
        assert_eq!(response(&output)["cpu_products"], "f32", "{dtype}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("--dtype {dtype}: computing in f32 on the CPU")), "{stderr}");
        let lowered = pixart_core::fast_math::Simd::best_supported() == pixart_core::fast_math::Simd::Avx512;
        assert_eq!(stderr.contains("PIXART_SIMD keeps this CPU's AVX-512 kernels off"), lowered, "{stderr}");
    }
    let output = pixart(&[&args[..], &["--dtype", "f32"]].concat(), &[]);
    assert_eq!(response(&output)["dtype"], "f32");
    assert_eq!(response(&output)["cpu_products"], "f32");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("computing in f32") && !stderr.contains("in bf16"), "{stderr}");
}

#[test]
fn gguf_text_encoder_quantization_and_sequential_offload_from_the_command_line() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let gguf = fixtures().join("gguf/tiny-sigma-256-t5-q8_0.gguf");
    let case = fixtures().join("goldens/gguf/e2e_q8_0");
    let out = temp_dir("gguf");
    let request = std::fs::read_to_string(case.join("request.json")).unwrap();
    let request: Value = serde_json::from_str(&request).unwrap();
    let size = format!("{}x{}", request["image_size"]["width"], request["image_size"]["height"]);
    let output = pixart(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            request["prompt"].as_str().unwrap(),
            "--seed",
            "0",
            "--image-size",
            &size,
            "--text-encoder",
            gguf.to_str().unwrap(),
            "--offload",
            "sequential",
            "--out-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    response(&output);
    let pngs = png_files(&out);
    assert_eq!(pngs.len(), 1);
    let diff = max_diff(&pngs[0], &case.join("image_0.png"));
    assert!(diff <= 2, "q8_0 GGUF image differs from diffusers' by {diff}/255");
    std::fs::remove_dir_all(&out).unwrap();

    rejects(&["--model", m, "--text-encoder-quant", "q9"], &["--text-encoder-quant", "q8_0, q6k, q5k, q4k"]);
    rejects(&["--model", m, "--offload", "later"], &["--offload", "none, sequential"]);
    rejects(&["--model", m, "--prompt", "a", "--text-encoder", "/nonexistent/t5.gguf"], &["/nonexistent/t5.gguf"]);

    let report = quick_bench(m, &["--text-encoder-quant", "q8_0", "--offload", "sequential"]);
    for stage in ["load", "text_encoder", "denoise", "vae"] {
        assert!(report["peak_memory_by_stage_bytes"][stage].as_u64().unwrap() > 0, "{stage}: {report}");
    }
    assert!(report["stages"]["text_encoder_load"]["mean_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["text_encoder_weights"]["summary"].as_str().unwrap().contains("q8_0"), "{report}");
    assert_eq!(report["text_encoder_weights"]["offload"], "sequential");
}

#[test]
fn request_from_stdin_with_flags_overriding_its_fields() {
    use std::io::Write;
    let model = fixtures().join("tiny-sigma-256");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(["generate", "--model", model.to_str().unwrap(), "--request", "-", "--seed", "5", "--sync-mode"])
        .env("PIXART_SAFETY_CHECKER", fixtures().join("tiny-safety-checker"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let request =
        r#"{"prompt": "a boat", "seed": 1, "image_size": {"width": 64, "height": 48}, "num_inference_steps": 2}"#;
    child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
    let json = response(&child.wait_with_output().unwrap());
    assert_eq!(json["seed"], 5, "the --seed flag overrides the request's seed");
    assert_eq!(json["prompt"], "a boat");
    assert_eq!((json["images"][0]["width"].as_u64(), json["images"][0]["height"].as_u64()), (Some(64), Some(48)));

    // A bad field the flags replace is not an error; the others still are. `--sync-mode false`
    // turns off the file's sync_mode.
    let dir = temp_dir("override");
    let file = dir.join("request.json");
    std::fs::write(&file, r#"{"prompt": "x", "num_inference_steps": 0, "sync_mode": true, "image_size": "square"}"#)
        .unwrap();
    let f = file.to_str().unwrap();
    let m = model.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let base = ["generate", "--model", m, "--request", f, "--image-size", "32x32", "--out-dir", o];
    let json = response(&pixart(&[&base[..], &["--steps", "1", "--sync-mode", "false"]].concat(), &[]));
    assert!(json["images"][0]["url"].as_str().unwrap().starts_with("file://"), "{json}");
    assert_eq!(png_files(&out).len(), 1);
    let bad = pixart(&base, &[]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("num_inference_steps") && err.contains(f), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_scheduler_configs_are_refused_at_load() {
    let model = temp_dir("karras-model");
    copy_dir(&fixtures().join("tiny-sigma-256"), &model);
    let path = model.join("scheduler/scheduler_config.json");
    let text =
        std::fs::read_to_string(&path).unwrap().replace("\"use_karras_sigmas\": false", "\"use_karras_sigmas\": true");
    std::fs::write(&path, text).unwrap();
    rejects(&["--model", model.to_str().unwrap(), "--prompt", "x"], &["use_karras_sigmas", "supported: false"]);
    std::fs::remove_dir_all(model).unwrap();
}

fn png_size(json: &Value, i: usize) -> (u32, u32) {
    use base64::Engine as _;
    let url = json["images"][i]["url"].as_str().unwrap();
    let data = base64::engine::general_purpose::STANDARD.decode(url.strip_prefix("data:image/png;base64,").unwrap());
    let png = image::load_from_memory(&data.unwrap()).unwrap();
    (png.width(), png.height())
}

#[test]
fn the_requested_size_comes_out_exactly_where_diffusers_truncates_a_side() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    // On the 256 table diffusers resizes to 64×117 here and returns a 64×1 strip; the request
    // says 64×118.
    for size in ["64x118", "59x16", "104x48"] {
        let json = response(&pixart(
            &["generate", "--model", m, "--prompt", "x", "--image-size", size, "--steps", "1", "--sync-mode"],
            &[],
        ));
        let (w, h) = size.split_once('x').unwrap();
        let want = (w.parse().unwrap(), h.parse().unwrap());
        assert_eq!(
            (json["images"][0]["width"].as_u64(), json["images"][0]["height"].as_u64()),
            (Some(want.0 as u64), Some(want.1 as u64))
        );
        assert_eq!(png_size(&json, 0), want, "{size}");
    }
    // A checkpoint without a bin table (sample_size 48): any size, generated at the next
    // multiple of 16 and centre-cropped.
    let no_table = temp_dir("no-table");
    copy_dir(&model, &no_table);
    let config = no_table.join("transformer/config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"sample_size\": 32", "\"sample_size\": 48");
    std::fs::write(&config, text).unwrap();
    let json = response(&pixart(
        &[
            "generate",
            "--model",
            no_table.to_str().unwrap(),
            "--prompt",
            "x",
            "--image-size",
            "17x91",
            "--steps",
            "1",
            "--sync-mode",
        ],
        &[],
    ));
    assert_eq!(png_size(&json, 0), (17, 91));
    std::fs::remove_dir_all(no_table).unwrap();
}

#[test]
fn every_flag_can_come_from_the_environment() {
    let model = fixtures().join("tiny-sigma-256");
    let checker = fixtures().join("tiny-safety-checker");
    let envs = [
        ("PIXART_MODEL", model.to_str().unwrap()),
        ("PIXART_PROMPT", "a fox"),
        ("PIXART_IMAGE_SIZE", "48x32"),
        ("PIXART_STEPS", "2"),
        ("PIXART_SEED", "11"),
        ("PIXART_STYLE", "Anime"),
        ("PIXART_NUM_IMAGES", "2"),
        ("PIXART_SYNC_MODE", "1"),
        ("PIXART_OFFLINE", "true"),
        ("PIXART_DTYPE", "f32"),
        ("PIXART_SAFETY_CHECKER", checker.to_str().unwrap()),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixart"));
    cmd.arg("generate").envs(envs);
    let json = response(&cmd.output().unwrap());
    assert_eq!((json["seed"].as_u64(), json["prompt"].as_str()), (Some(11), Some("a fox")));
    assert_eq!(json["images"].as_array().unwrap().len(), 2);
    assert_eq!(png_size(&json, 1), (48, 32));
    // A flag wins over its variable; a bad variable is refused like the flag.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixart"));
    let json = response(&cmd.args(["generate", "--seed", "12"]).envs(envs).output().unwrap());
    assert_eq!(json["seed"], 12);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixart"));
    let bad = cmd.arg("generate").envs(envs).env("PIXART_STEPS", "0").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("num_inference_steps: must be an integer from 1 to 200"));
}

#[test]
fn schema_states_the_defaults_and_ranges() {
    let output = pixart(&["schema"], &[]);
    let schema = response(&output);
    assert_eq!(schema["required"], serde_json::json!(["prompt"]));
    assert_eq!(schema["properties"]["num_inference_steps"]["default"], 35);
    assert_eq!(schema["properties"]["guidance_scale"]["maximum"], 20.0);
    assert_eq!(schema["properties"]["style"]["enum"].as_array().unwrap().len(), 10);
}

#[test]
fn devices_are_chosen_by_name_and_gpu_index() {
    let model = fixtures().join("tiny-sigma-256");
    let model = model.to_str().unwrap();
    // GPU 7 exists nowhere here: refused by name before anything is generated.
    let output = pixart(&["generate", "--model", model, "--prompt", "x", "--device", "cuda:7"], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--device cuda:7: cannot use CUDA GPU 7"));
    let output = pixart(&["generate", "--model", model, "--prompt", "x", "--device", "gpu"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected cpu, cuda, cuda:N, metal or metal:N"));
}

#[test]
fn loras_and_single_file_transformers_from_the_command_line() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let lora = |name: &str| fixtures().join("lora").join(name).to_string_lossy().to_string();
    let golden = |case: &str| fixtures().join("goldens/lora").join(case);
    let request = golden("two").join("request.json");
    let run = |extra: &[&str], case: &str| {
        let out = temp_dir(&format!("lora-{case}"));
        let args = ["generate", "--model", m, "--no-safety-checker", "--request", request.to_str().unwrap()];
        let json = response(&pixart(&[&args[..], extra, &["--out-dir", out.to_str().unwrap()]].concat(), &[]));
        let path = PathBuf::from(json["images"][0]["url"].as_str().unwrap().strip_prefix("file://").unwrap());
        let diff = max_diff(&path, &golden(case).join("image_0.png"));
        assert!(diff <= 2, "{extra:?}: {diff}/255 from diffusers' {case} image");
        std::fs::remove_dir_all(out).unwrap();
    };
    // Two LoRAs, repeated flags with their scales (a request file's list would be replaced).
    run(&["--lora", &format!("{}:0.5", lora("a_peft")), "--lora", &format!("{}:-0.3", lora("b_peft"))], "two");
    // A fine-tune as one file in the original layout, with a LoRA in original keys.
    let pth = fixtures().join("single-file/tiny-sigma-256-original.pth");
    run(&["--transformer", pth.to_str().unwrap()], "base");
    run(&["--transformer", pth.to_str().unwrap(), "--lora", &lora("a_kohya.safetensors")], "one");
    // Refusals name the LoRA's field, before the model loads.
    rejects(&["--model", m, "--prompt", "x", "--lora", &lora("lokr.safetensors")], &["loras.0.path", "LyCORIS LoKr"]);
    rejects(&["--model", m, "--prompt", "x", "--lora", "x:9"], &["loras.0.scale", "-4 to 4"]);
    rejects(
        &["--model", m, "--prompt", "x", "--lora", &lora("unknown_module.safetensors")],
        &["loras.0.path", "transformer_blocks.7"],
    );
}

#[test]
fn pictures_in_from_the_command_line() {
    let model = fixtures().join("tiny-sigma-256");
    let m = model.to_str().unwrap();
    let picture = |name: &str| fixtures().join("images").join(name).to_string_lossy().to_string();
    let golden = |case: &str| fixtures().join("goldens/image_input").join(case);
    // The golden requests name their pictures by file name: the flags give the paths.
    let run = |case: &str, extra: &[&str]| {
        let out = temp_dir(&format!("picture-{case}"));
        let request = golden(case).join("request.json");
        let args = ["generate", "--model", m, "--no-safety-checker", "--request", request.to_str().unwrap()];
        let json = response(&pixart(&[&args[..], extra, &["--out-dir", out.to_str().unwrap()]].concat(), &[]));
        let image = &json["images"][0];
        let path = PathBuf::from(image["url"].as_str().unwrap().strip_prefix("file://").unwrap());
        let result = (path.clone(), image["content_type"].as_str().unwrap().to_string());
        (out, result)
    };
    let (out, (path, _)) = run("img2img_sa_s075", &["--image", &picture("photo.png")]);
    assert!(max_diff(&path, &golden("img2img_sa_s075").join("image_0.png")) <= 2);
    std::fs::remove_dir_all(out).unwrap();
    let mask = ["--image", &picture("photo.png"), "--mask", &picture("mask_center.png")];
    let (out, (path, _)) = run("inpaint_center_dpm", &mask);
    assert!(max_diff(&path, &golden("inpaint_center_dpm").join("image_0.png")) <= 2);
    std::fs::remove_dir_all(out).unwrap();
    let pag = ["--pag-scale", "1.5", "--pag-layer", "blocks.0", "--pag-layer", "blocks.1", "--scheduler", "SA-SOLVER"];
    let (out, (path, _)) = run("pag_two_layers", &pag);
    assert!(max_diff(&path, &golden("pag_two_layers").join("image_0.png")) <= 2);
    std::fs::remove_dir_all(out).unwrap();
    // JPEG out: a .jpg file of that type.
    let (out, (path, content_type)) =
        run("img2img_dpm_s03", &["--image", &picture("photo.png"), "--output-format", "jpeg"]);
    assert_eq!((content_type.as_str(), path.extension().unwrap().to_str().unwrap()), ("image/jpeg", "jpg"));
    assert_eq!(&std::fs::read(&path).unwrap()[..3], &[0xff, 0xd8, 0xff]);
    std::fs::remove_dir_all(out).unwrap();
    // Refusals name the field, before the model loads.
    rejects(&["--model", m, "--prompt", "x", "--image", "/no/such/picture.png"], &["image_url", "picture.png"]);
    rejects(&["--model", m, "--prompt", "x", "--mask", &picture("mask_center.png")], &["mask_url", "needs image_url"]);
    rejects(
        &["--model", m, "--prompt", "x", "--image", &picture("photo.png"), "--strength", "2"],
        &["strength", "0 to 1"],
    );
    let readme = fixtures().join("../../README.md");
    rejects(
        &["--model", m, "--prompt", "x", "--image", readme.to_str().unwrap()],
        &["image_url", "not a PNG, JPEG or WebP"],
    );
}
