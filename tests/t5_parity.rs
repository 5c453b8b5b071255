//! The T5 encoder against transformers' `T5EncoderModel` on the fixtures: f32 within 1e-5 for
//! prompts padded to 300 with their masks, loaded through the sharded-safetensors index; bf16 and
//! f16 against f32 with stated tolerances; f16 without overflow where f16 alone would overflow.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pixart_core::ModelWeights;
use pixart_suite::{all_finite, assert_close, golden, load_goldens, max_abs, max_abs_diff, model_dir, FIXTURE_MODELS};
use pixart_t5::encoder::relative_position_bucket;
use pixart_t5::{T5Config, T5Encoder};

fn encode(model: &str, dtype: DType) -> (Tensor, HashMap<String, Tensor>) {
    let goldens = load_goldens(&format!("{model}/t5.safetensors"));
    let encoder = T5Encoder::load(&model_dir(model).join("text_encoder"), dtype, &Device::Cpu).unwrap();
    let ids = golden(&goldens, "input_ids").to_dtype(DType::U32).unwrap();
    let mask = golden(&goldens, "attention_mask");
    let out = encoder.forward(&ids, Some(mask)).unwrap();
    assert_eq!(out.dtype(), dtype);
    (out, goldens)
}

#[test]
fn f32_matches_transformers_within_1e_5() {
    for model in FIXTURE_MODELS {
        let index = model_dir(model).join("text_encoder/model.safetensors.index.json");
        assert!(index.is_file(), "the fixture must exercise the sharded path");
        let weights = ModelWeights::find(&model_dir(model).join("text_encoder"), "model").unwrap();
        assert!(weights.files.len() >= 2, "{model}: expected several shards, got {:?}", weights.files);
        let (out, goldens) = encode(model, DType::F32);
        assert_eq!(out.dims()[1], 300);
        assert_close(&format!("{model} T5 f32"), &out, golden(&goldens, "hidden_states"), 1e-5);
    }
}

#[test]
fn unpadded_batch_of_one_equals_the_padded_masked_rows() {
    // Encoding only the real tokens is exactly what the mask achieves on the padded batch.
    let model = "tiny-sigma-256";
    let goldens = load_goldens(&format!("{model}/t5.safetensors"));
    let encoder = T5Encoder::load(&model_dir(model).join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let ids = golden(&goldens, "input_ids").to_dtype(DType::U32).unwrap();
    let mask = golden(&goldens, "attention_mask").to_dtype(DType::U32).unwrap();
    let expected = golden(&goldens, "hidden_states");
    for row in 0..ids.dim(0).unwrap() {
        let len = mask.get(row).unwrap().sum_all().unwrap().to_scalar::<u32>().unwrap() as usize;
        let real = ids.get(row).unwrap().narrow(0, 0, len).unwrap().unsqueeze(0).unwrap();
        let out = encoder.forward(&real, None).unwrap();
        let want = expected.get(row).unwrap().narrow(0, 0, len).unwrap().unsqueeze(0).unwrap();
        assert_close(&format!("row {row} unpadded ({len} tokens)"), &out, &want, 1e-5);
    }
}

#[test]
fn bf16_and_f16_track_f32() {
    // bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 4e-3 per rounding) and f16 11 bits
    // (≈ 5e-4); after a few layers and the final RMSNorm (outputs of order 1) we allow
    // 8e-2 for bf16 and 1e-2 for f16, max abs over all 300 positions.
    for model in FIXTURE_MODELS {
        let (f32_out, _) = encode(model, DType::F32);
        for (dtype, tol) in [(DType::BF16, 8e-2), (DType::F16, 1e-2)] {
            let (out, _) = encode(model, dtype);
            assert!(all_finite(&out), "{model} {dtype:?} has non-finite values");
            assert_close(&format!("{model} T5 {dtype:?} vs f32"), &out, &f32_out, tol);
        }
    }
}

/// The fixture's text encoder with every feed-forward `wo` scaled by `scale`.
fn scaled_encoder(model: &str, scale: f64, dtype: DType) -> T5Encoder {
    let dir = model_dir(model).join("text_encoder");
    let config: T5Config = pixart_core::load_config(&dir.join("config.json")).unwrap();
    let weights = ModelWeights::find(&dir, "model").unwrap();
    let mut tensors = HashMap::new();
    for file in &weights.files {
        for (name, t) in candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
            let t = if name.ends_with("DenseReluDense.wo.weight") { (t * scale).unwrap() } else { t };
            tensors.insert(name, t);
        }
    }
    T5Encoder::new(&config, VarBuilder::from_tensors(tensors, dtype, &Device::Cpu)).unwrap()
}

#[test]
fn f16_stays_finite_when_activations_exceed_f16_range() {
    // T5 v1.1 XXL's feed-forward outputs exceed 65504; scale wo so the tiny model does too.
    let model = "tiny-sigma-256";
    let goldens = load_goldens(&format!("{model}/t5.safetensors"));
    let ids = golden(&goldens, "input_ids").to_dtype(DType::U32).unwrap();
    let mask = golden(&goldens, "attention_mask");
    let reference = scaled_encoder(model, 1e6, DType::F32);
    let (out32, residuals) = reference.forward_with_hidden_states(&ids, Some(mask)).unwrap();
    let peak = residuals.iter().map(max_abs).fold(0f32, f32::max);
    assert!(peak > 65504.0, "the scaled model must overflow plain f16 (peak residual {peak})");
    let (out16, _) = scaled_encoder(model, 1e6, DType::F16).forward_with_hidden_states(&ids, Some(mask)).unwrap();
    assert!(all_finite(&out16), "f16 output overflowed");
    let diff = max_abs_diff(&out16, &out32);
    eprintln!("scaled wo: peak residual {peak:.3e}, f16 vs f32 max abs diff {diff:.3e}");
    assert!(diff <= 2e-2, "f16 vs f32 max abs diff {diff}");
}

#[test]
fn relative_position_buckets_equal_transformers() {
    let goldens = load_goldens("t5_buckets.safetensors");
    let table = golden(&goldens, "buckets").to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    for (q, row) in table.iter().enumerate() {
        for (k, &want) in row.iter().enumerate() {
            assert_eq!(relative_position_bucket(k as i64 - q as i64, 32, 128), want as usize, "q {q} k {k}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let encoder = T5Encoder::load(&model_dir("tiny-sigma-256").join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let too_big = Tensor::new(&[[5u32, 100_000]], &Device::Cpu).unwrap();
    let err = encoder.forward(&too_big, None).unwrap_err().to_string();
    assert!(err.contains("100000") && err.contains("vocabulary"), "{err}");
    let ids = Tensor::new(&[[5u32, 6]], &Device::Cpu).unwrap();
    let bad_mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
    assert!(encoder.forward(&ids, Some(&bad_mask)).is_err());
    let flat = Tensor::new(&[5u32, 6], &Device::Cpu).unwrap();
    assert!(encoder.forward(&flat, None).is_err());
}
