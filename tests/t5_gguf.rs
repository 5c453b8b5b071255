//! The text encoder from GGUF files and quantized on load, against transformers' f32 encoder.
//!
//! Goldens (tests/reference/gguf_fixtures.py): transformers' `T5EncoderModel` in f32 on the
//! original weights (`*/original`) and on the exact values each GGUF file dequantizes to
//! (`*/<type>`, read back with llama.cpp's gguf-py). The GGUF files are written by gguf-py with
//! llama.cpp's tensor names (and one with transformers' names).
//!
//! Bounds, per token (every position of every row, padded ones included):
//! - plain types (f32, f16, bf16 files): our f32 compute on the stored values equals
//!   transformers' on the same values within 1e-5 (as the safetensors parity suite).
//! - quantized types: candle's quantized matmul on the CPU also rounds the activations to 8-bit
//!   blocks (q8_0 for q8_0, q8_K for the k-quants), as ggml does, so even on the file's own
//!   values the result is not exact: per-token cosine ≥ 0.9998 there (measured 0.99989 and
//!   0.99991). Against the original weights the weights' rounding adds its error, which grows
//!   about 4× per bit removed (1 − cosine ∝ error², error ∝ 2^-bits). Measured minimum per-token
//!   cosine on the 256-wide model: q8_0 0.99984, q6k 0.99912, q5k 0.99702, q4k 0.98883 (and
//!   q8_0 0.99975 on the 32-wide tiny model). Bounds, about 2.5× the measured 1 − cosine:
//!   q8_0 ≥ 0.9995 (the example asked 0.999), q6k ≥ 0.998, q5k ≥ 0.993, q4k ≥ 0.975.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use pixart_suite::{assert_close, fixtures_dir, golden, load_goldens, model_dir};
use pixart_t5::{llama_cpp_name, GgufError, QuantType, T5Config, T5Encoder, T5Error, T5LoadOptions, T5WeightsFile};

fn gguf_dir() -> PathBuf {
    fixtures_dir().join("gguf")
}

fn tiny_config() -> T5Config {
    T5Config::load(&model_dir("tiny-sigma-256").join("text_encoder/config.json")).unwrap()
}

fn t5_256_dir() -> PathBuf {
    fixtures_dir().join("t5-256")
}

fn options(quant: Option<QuantType>) -> T5LoadOptions {
    T5LoadOptions { dtype: DType::F32, device: Device::Cpu, quant, cpu_repack: false }
}

fn load(config: &T5Config, weights: T5WeightsFile, quant: Option<QuantType>) -> Result<T5Encoder, T5Error> {
    T5Encoder::load_weights(config, &weights, &options(quant))
}

/// The smallest cosine similarity between matching rows of `[B, L, D]` tensors.
fn min_token_cosine(a: &Tensor, b: &Tensor) -> f32 {
    let d = a.dim(2).unwrap();
    let a = a.reshape(((), d)).unwrap().to_vec2::<f32>().unwrap();
    let b = b.reshape(((), d)).unwrap().to_vec2::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
            let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
            (dot / (nx * ny)) as f32
        })
        .fold(f32::INFINITY, f32::min)
}

fn inputs(prefix: &str) -> (Tensor, Tensor, std::collections::HashMap<String, Tensor>) {
    let g = load_goldens("gguf/t5.safetensors");
    let ids = golden(&g, &format!("{prefix}/input_ids")).to_dtype(DType::U32).unwrap();
    let mask = golden(&g, &format!("{prefix}/attention_mask")).clone();
    (ids, mask, g)
}

fn cosine_bound(q: QuantType) -> f32 {
    match q {
        QuantType::Q8_0 => 0.9995,
        QuantType::Q6K => 0.998,
        QuantType::Q5K => 0.993,
        QuantType::Q4K => 0.975,
    }
}

#[test]
fn plain_gguf_files_with_llama_cpp_or_transformers_names_match_transformers() {
    let (ids, mask, g) = inputs("tiny");
    let config = tiny_config();
    for (file, golden_name) in [
        ("tiny-sigma-256-t5-f32.gguf", "tiny/f32"),
        ("tiny-sigma-256-t5-f16.gguf", "tiny/f16"),
        ("tiny-sigma-256-t5-bf16.gguf", "tiny/bf16"),
        ("tiny-sigma-256-t5-hf-names-f16.gguf", "tiny/f16"),
    ] {
        let encoder = load(&config, T5WeightsFile::Gguf(gguf_dir().join(file)), None).unwrap();
        let out = encoder.forward(&ids, Some(&mask)).unwrap();
        assert_close(file, &out, golden(&g, golden_name), 1e-5);
    }
    // The f32 file holds the original weights: it is the safetensors model.
    let encoder = load(&config, T5WeightsFile::Gguf(gguf_dir().join("tiny-sigma-256-t5-f32.gguf")), None).unwrap();
    assert_close(
        "f32 file vs original",
        &encoder.forward(&ids, Some(&mask)).unwrap(),
        golden(&g, "tiny/original"),
        1e-5,
    );
}

#[test]
fn q8_0_files_written_by_gguf_py_track_transformers() {
    let cases = [
        ("tiny", tiny_config(), gguf_dir().join("tiny-sigma-256-t5-q8_0.gguf")),
        ("t5_256", T5Config::load(&t5_256_dir().join("config.json")).unwrap(), t5_256_dir().join("t5-256-q8_0.gguf")),
    ];
    for (prefix, config, path) in cases {
        let (ids, mask, g) = inputs(prefix);
        let encoder = load(&config, T5WeightsFile::Gguf(path.clone()), None).unwrap();
        let summary = encoder.weight_summary();
        assert!(summary.by_type.get("q8_0").is_some_and(|(n, _)| *n >= 7), "{prefix}: {summary}");
        let out = encoder.forward(&ids, Some(&mask)).unwrap();
        let same_values = min_token_cosine(&out, golden(&g, &format!("{prefix}/q8_0")));
        let original = min_token_cosine(&out, golden(&g, &format!("{prefix}/original")));
        eprintln!("{prefix} q8_0 file: min token cosine {same_values:.7} vs its own values, {original:.7} vs the original weights");
        assert!(same_values >= 0.9998, "{prefix}: {same_values}");
        assert!(original >= cosine_bound(QuantType::Q8_0), "{prefix}: {original}");
    }
}

#[test]
fn quantizing_safetensors_on_load_tracks_transformers_for_every_type() {
    let (ids, mask, g) = inputs("t5_256");
    let config = T5Config::load(&t5_256_dir().join("config.json")).unwrap();
    let mut previous = 1.0f32;
    for q in QuantType::ALL {
        let encoder = load(&config, T5WeightsFile::Safetensors(t5_256_dir()), Some(q)).unwrap();
        let summary = encoder.weight_summary();
        // 7 matrices and the embedding in the asked type, norms and the bias table in f32.
        assert_eq!(summary.by_type.get(q.name()).map(|(n, _)| *n), Some(8), "{q}: {summary}");
        assert_eq!(summary.fallbacks, 0, "{q}: {summary}");
        let out = encoder.forward(&ids, Some(&mask)).unwrap();
        let cosine = min_token_cosine(&out, golden(&g, "t5_256/original"));
        eprintln!("{q}: min token cosine {cosine:.7} vs transformers f32; weights {summary}");
        assert!(cosine >= cosine_bound(q), "{q}: {cosine} < {}", cosine_bound(q));
        // Fewer bits never do better by more than noise.
        assert!(cosine <= previous + 1e-4, "{q}: {cosine} after {previous}");
        previous = cosine;
    }
}

#[test]
fn candles_repacking_kernels_give_the_compact_kernels_results() {
    // Same weight blocks; the repacked kernels round the activations to 8 bits in their own block
    // layout, so the two differ by about as much as either differs from f32 activations
    // (measured ≥ 0.99985 per-token cosine; bound that of q8_0 against transformers).
    let (ids, mask, _) = inputs("t5_256");
    let config = T5Config::load(&t5_256_dir().join("config.json")).unwrap();
    for q in [QuantType::Q8_0, QuantType::Q6K, QuantType::Q4K] {
        let weights = T5WeightsFile::Safetensors(t5_256_dir());
        let compact = T5Encoder::load_weights(&config, &weights, &options(Some(q))).unwrap();
        let repacked =
            T5Encoder::load_weights(&config, &weights, &T5LoadOptions { cpu_repack: true, ..options(Some(q)) })
                .unwrap();
        let a = compact.forward(&ids, Some(&mask)).unwrap();
        let b = repacked.forward(&ids, Some(&mask)).unwrap();
        let cosine = min_token_cosine(&a, &b);
        eprintln!("{q}: compact vs repacked min token cosine {cosine:.7}");
        assert!(cosine >= 0.9995, "{q}: {cosine}");
    }
}

#[test]
fn k_quant_gguf_files_read_back_exactly_what_was_quantized() {
    // Quantize on load, write the tensors to GGUF under llama.cpp's names with candle's writer,
    // load that file: the same blocks, so the same outputs bit for bit.
    let (ids, mask, _) = inputs("t5_256");
    let config = T5Config::load(&t5_256_dir().join("config.json")).unwrap();
    let dir = tempdir("kquant");
    let st = candle_core::safetensors::load(t5_256_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    for q in [QuantType::Q6K, QuantType::Q5K, QuantType::Q4K] {
        let quantized = load(&config, T5WeightsFile::Safetensors(t5_256_dir()), Some(q)).unwrap();
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in &st {
            if name == "encoder.embed_tokens.weight" {
                continue;
            }
            let t = t.to_dtype(DType::F32).unwrap();
            let quant = t.rank() == 2 && !name.contains("relative_attention_bias");
            let ggml = if quant { q.ggml() } else { GgmlDType::F32 };
            tensors.push((llama_cpp_name(name).unwrap(), QTensor::quantize(&t, ggml).unwrap()));
        }
        let path = dir.join(format!("t5-256-{q}.gguf"));
        write_gguf(&path, &tensors, &[]);
        let from_file = load(&config, T5WeightsFile::Gguf(path), None).unwrap();
        assert_eq!(from_file.weight_summary(), quantized.weight_summary(), "{q}");
        let a = quantized.forward(&ids, Some(&mask)).unwrap();
        let b = from_file.forward(&ids, Some(&mask)).unwrap();
        assert_close(&format!("{q} file vs on load"), &b, &a, 0.0);
    }
}

#[test]
fn rows_narrower_than_a_block_fall_back_to_q8_0() {
    // tiny-sigma-256's matrices have rows of 32 or 64: q4k's 256-wide blocks do not fit, q8_0 does.
    let (ids, mask, g) = inputs("tiny");
    let config = tiny_config();
    let folder = model_dir("tiny-sigma-256").join("text_encoder");
    let encoder = load(&config, T5WeightsFile::Safetensors(folder), Some(QuantType::Q4K)).unwrap();
    let summary = encoder.weight_summary();
    // 2 blocks × 7 matrices + the embedding.
    assert_eq!(summary.fallbacks, 15, "{summary}");
    assert_eq!(summary.by_type.get("q8_0").map(|(n, _)| *n), Some(15), "{summary}");
    assert!(!summary.by_type.contains_key("q4k"), "{summary}");
    let cosine = min_token_cosine(&encoder.forward(&ids, Some(&mask)).unwrap(), golden(&g, "tiny/original"));
    assert!(cosine >= cosine_bound(QuantType::Q8_0), "{cosine}");
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pixart-t5-gguf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_gguf<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = &'a (String, QTensor)>,
    metadata: &[(&str, gguf_file::Value)],
) {
    let mut file = std::fs::File::create(path).unwrap();
    let tensors: Vec<(&str, &QTensor)> = tensors.into_iter().map(|(n, t)| (n.as_str(), t)).collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// The tiny model's tensors as f32 QTensors under llama.cpp names.
fn tiny_tensors() -> Vec<(String, QTensor)> {
    let content_path = gguf_dir().join("tiny-sigma-256-t5-f32.gguf");
    let mut file = std::fs::File::open(&content_path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<_> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), content.tensor(&mut file, &n, &Device::Cpu).unwrap())).collect()
}

fn gguf_error(result: Result<T5Encoder, T5Error>) -> GgufError {
    match result {
        Err(T5Error::Gguf { source, .. }) => *source,
        other => panic!("expected a GGUF error, got {other:?}"),
    }
}

#[test]
fn broken_gguf_files_are_refused_naming_the_problem() {
    let config = tiny_config();
    let dir = tempdir("broken");
    let tensors = tiny_tensors();

    // A tensor missing: both names are given.
    let path = dir.join("missing.gguf");
    write_gguf(&path, tensors.iter().filter(|(n, _)| n != "enc.blk.1.ffn_up.weight"), &[]);
    let err = gguf_error(load(&config, T5WeightsFile::Gguf(path.clone()), None));
    let text = err.to_string();
    assert!(
        text.contains("encoder.block.1.layer.1.DenseReluDense.wi_1.weight") && text.contains("enc.blk.1.ffn_up.weight"),
        "{text}"
    );

    // Another model's file: the shape is checked against config.json.
    let other = t5_256_dir().join("t5-256-q8_0.gguf");
    let text = gguf_error(load(&config, T5WeightsFile::Gguf(other), None)).to_string();
    assert!(text.contains("expected [") && text.contains("config.json"), "{text}");

    // A zero alignment (candle's reader would divide by it).
    let path = dir.join("alignment.gguf");
    write_gguf(&path, &tensors, &[("general.alignment", gguf_file::Value::U32(0))]);
    assert!(matches!(gguf_error(load(&config, T5WeightsFile::Gguf(path), None)), GgufError::Alignment));

    // Truncated anywhere: an error, never a panic.
    let bytes = std::fs::read(gguf_dir().join("tiny-sigma-256-t5-q8_0.gguf")).unwrap();
    let path = dir.join("truncated.gguf");
    for len in [0, 3, 8, 24, 100, 1000, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let result = load(&config, T5WeightsFile::Gguf(path.clone()), None);
        assert!(matches!(result, Err(T5Error::Gguf { .. })), "{len} bytes: {result:?}");
    }
    // Not a file at all.
    let missing = load(&config, T5WeightsFile::Gguf(dir.join("nope.gguf")), None).unwrap_err().to_string();
    assert!(missing.contains("nope.gguf"), "{missing}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn random_byte_flips_in_a_gguf_header_never_panic() {
    let config = tiny_config();
    let bytes = std::fs::read(gguf_dir().join("tiny-sigma-256-t5-q8_0.gguf")).unwrap();
    let dir = tempdir("flips");
    let path = dir.join("flipped.gguf");
    // A small deterministic generator (xorshift) picks positions in the header and values.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header = 2048.min(bytes.len());
    for _ in 0..400 {
        let mut mutated = bytes.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % header as u64) as usize;
            mutated[at] = next() as u8;
        }
        std::fs::write(&path, &mutated).unwrap();
        // Either loads (a flip in a value that does not matter) or fails with an error.
        let _ = load(&config, T5WeightsFile::Gguf(path.clone()), None);
    }
    std::fs::remove_dir_all(&dir).ok();
}
