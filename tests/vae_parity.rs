//! The VAE decoder against diffusers' `AutoencoderKL.decode` on the fixtures (f32 within 1e-5),
//! and bf16 staying finite on large-magnitude latents.

use candle_core::{DType, Device, Tensor};
use pixart_suite::{all_finite, assert_close, golden, load_goldens, max_abs, max_abs_diff, model_dir, FIXTURE_MODELS};
use pixart_vae::VaeDecoder;

#[test]
fn f32_decode_matches_diffusers_within_1e_5() {
    for model in FIXTURE_MODELS {
        let g = load_goldens(&format!("{model}/vae.safetensors"));
        let vae = VaeDecoder::load(&model_dir(model).join("vae"), DType::F32, &Device::Cpu).unwrap();
        let image = vae.decode(golden(&g, "latents")).unwrap();
        assert_close(&format!("{model} VAE decode"), &image, golden(&g, "image"), 1e-5);
    }
}

#[test]
fn decode_latents_divides_by_the_scaling_factor() {
    let g = load_goldens("tiny-sigma-256/vae.safetensors");
    let vae = VaeDecoder::load(&model_dir("tiny-sigma-256").join("vae"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.config().scaling_factor, 0.13025);
    let latents = (golden(&g, "latents") * 0.13025).unwrap();
    assert_close("decode_latents", &vae.decode_latents(&latents).unwrap(), golden(&g, "image"), 1e-5);
}

#[test]
fn bf16_stays_finite_on_large_latents() {
    for model in FIXTURE_MODELS {
        let g = load_goldens(&format!("{model}/vae.safetensors"));
        let f32_vae = VaeDecoder::load(&model_dir(model).join("vae"), DType::F32, &Device::Cpu).unwrap();
        let bf16_vae = VaeDecoder::load(&model_dir(model).join("vae"), DType::BF16, &Device::Cpu).unwrap();
        for magnitude in [1.0, 1e3, 1e6] {
            let z = (golden(&g, "latents") * magnitude).unwrap();
            let reference = f32_vae.decode(&z).unwrap();
            let out = bf16_vae.decode(&z).unwrap();
            assert_eq!(out.dtype(), DType::BF16);
            assert!(all_finite(&out), "{model}: bf16 decode of latents ×{magnitude} has NaN/inf");
            // bf16 keeps ~3 significant digits; through ~20 convolutions allow 5% of the range.
            let diff = max_abs_diff(&out, &reference);
            let range = max_abs(&reference);
            eprintln!("{model} ×{magnitude}: bf16 vs f32 max abs diff {diff:.3e} of range {range:.3e}");
            assert!(diff <= 0.05 * range, "{model} ×{magnitude}: diff {diff} vs range {range}");
        }
    }
}

#[test]
fn f16_is_upcast_as_force_upcast_says() {
    let dir = model_dir("tiny-sigma-256").join("vae");
    let g = load_goldens("tiny-sigma-256/vae.safetensors");
    let z = golden(&g, "latents");
    // The fixture's config has diffusers' `force_upcast: true`: asked for f16, the VAE runs in f32.
    let asked_f16 = VaeDecoder::load(&dir, DType::F16, &Device::Cpu).unwrap();
    assert!(asked_f16.config().force_upcast);
    assert_eq!(asked_f16.decode(&z).unwrap().dtype(), DType::F32);
    // Without it, f16 is kept (bf16 always is: it has f32's range).
    let mut config = asked_f16.config().clone();
    config.force_upcast = false;
    assert_eq!(config.compute_dtype(DType::F16), DType::F16);
    assert_eq!(config.compute_dtype(DType::BF16), DType::BF16);
}

#[test]
fn wrong_latent_channels_are_an_error() {
    let vae = VaeDecoder::load(&model_dir("tiny-sigma-256").join("vae"), DType::F32, &Device::Cpu).unwrap();
    let z = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&z).unwrap_err().to_string();
    assert!(err.contains("4 channels"), "{err}");
}
