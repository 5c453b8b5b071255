//! The parts of image input against their references (`goldens/images/`, written by
//! `tests/reference/image_input_fixtures.py`): decoding as diffusers' `load_image` (PIL's
//! `exif_transpose` + `convert("RGB")`), Pillow's Lanczos resize and RGB → L conversion bit for
//! bit, `VaeImageProcessor.preprocess` and the mask processor, the VAE encoder and its posterior
//! against `AutoencoderKL.encode` (f32 within 1e-5; bf16 finite), and both schedulers' `add_noise`
//! from a begin index.

use candle_core::{DType, Device, Tensor};
use pixart_fal::{decode_image, DecodeLimits};
use pixart_pipeline::input_image::{image_tensor, mask_tensor};
use pixart_pipeline::resample::Plane8;
use pixart_pipeline::{RgbImage, TorchGenerator};
use pixart_scheduler::{DpmSolverMultistep, SaSolver, Scheduler, SchedulerConfig};
use pixart_suite::{all_finite, assert_close, fixtures_dir, golden, load_goldens, max_byte_diff, model_dir};
use pixart_vae::VaeEncoder;

fn picture(name: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures_dir().join("images").join(name)).unwrap();
    decode_image(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn pictures_decode_as_load_image_does() {
    let goldens = load_goldens("images/decoded.safetensors");
    // Lossless formats exactly; JPEG and lossy WebP within what two decoders of the same file
    // differ by (libjpeg-turbo and libwebp in PIL; zune-jpeg and image-webp here).
    let cases = [
        ("photo.png", 0),
        ("square.png", 0),
        ("rgba.png", 0),
        ("gray.png", 0),
        ("palette.png", 0),
        ("photo.webp", 0),
        ("rotated8.png", 0),
        ("mask_center.png", 0),
        ("mask_soft.png", 0),
        ("photo.jpg", 3),
        ("rotated.jpg", 3),
        ("photo_lossy.webp", 3),
    ];
    for (name, tolerance) in cases {
        let ours = picture(name);
        let want = golden(&goldens, name);
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!((ours.width as usize, ours.height as usize), (w, h), "{name}: size (EXIF orientation applied)");
        let diff = max_byte_diff(&ours.pixels, &bytes(want));
        eprintln!("{name}: {w}x{h}, max difference {diff}/255 from PIL");
        assert!(diff <= tolerance, "{name}: {diff}/255 from load_image");
    }
    for name in ["photo.png", "mask_center.png", "mask_soft.png"] {
        let luma = Plane8::from_rgb(&picture(name)).to_luma();
        assert_eq!(luma.data, bytes(golden(&goldens, &format!("{name}:L"))), "{name}: convert(\"L\")");
    }
}

#[test]
fn lanczos_resizes_are_pillows_bit_for_bit() {
    let goldens = load_goldens("images/resize.safetensors");
    let mut checked = 0;
    for (key, want) in &goldens {
        let Some((source, size)) =
            key.rsplit_once(':').filter(|_| !key.starts_with("preprocess") && !key.starts_with("mask:"))
        else {
            continue;
        };
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let plane = match source {
            "mask_soft:L" => Plane8::from_rgb(&picture("mask_soft.png")).to_luma(),
            other => Plane8::from_rgb(&picture(&format!("{other}.png"))),
        };
        let resized = plane.resize_lanczos(w, h);
        assert_eq!((resized.width, resized.height), (w, h));
        let diff = max_byte_diff(&resized.data, &bytes(want));
        assert_eq!(diff, 0, "{key}: {diff}/255 from Pillow");
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn the_image_and_mask_processors_are_diffusers() {
    let goldens = load_goldens("images/resize.safetensors");
    let image = image_tensor(&picture("photo.png"), 96, 64, &Device::Cpu).unwrap();
    assert_close("preprocess photo 96x64", &image, golden(&goldens, "preprocess:photo:96x64"), 1e-6);
    // The mask at full size (nearest sampling is then the identity): binarised exactly.
    let mask = mask_tensor(&picture("mask_soft.png"), (160, 96), (160, 96), &Device::Cpu).unwrap();
    assert_close("mask_soft 160x96", &mask, golden(&goldens, "mask:mask_soft:160x96"), 0.0);
    // At the latent size, every 8th pixel of it, as F.interpolate's nearest mode picks.
    let latent = mask_tensor(&picture("mask_soft.png"), (160, 96), (20, 12), &Device::Cpu).unwrap();
    let every_eighth = golden(&goldens, "mask:mask_soft:160x96")
        .reshape((1, 1, 12, 8, 20, 8))
        .unwrap()
        .narrow(3, 0, 1)
        .unwrap()
        .narrow(5, 0, 1)
        .unwrap()
        .reshape((1, 1, 12, 20))
        .unwrap();
    assert_close("mask at the latent size", &latent, &every_eighth, 0.0);
}

#[test]
fn the_encoder_and_its_posterior_match_diffusers() {
    let goldens = load_goldens("images/vae_encoder.safetensors");
    let dir = model_dir("tiny-sigma-256").join("vae");
    let encoder = VaeEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap().expect("the fixture VAE has an encoder");
    for case in ["photo_96x64", "randn_24x40"] {
        let g = |what: &str| golden(&goldens, &format!("{case}:{what}"));
        let posterior = encoder.encode(g("input")).unwrap();
        let moments = Tensor::cat(&[&posterior.mean, &posterior.logvar], 1).unwrap();
        assert_close(&format!("{case} mean"), &posterior.mean, g("mean"), 1e-5);
        assert_close(&format!("{case} logvar"), &posterior.logvar, g("logvar"), 1e-5);
        assert_close(&format!("{case} std"), &posterior.std, g("std"), 1e-5);
        assert_close(&format!("{case} mode"), posterior.mode(), g("mode"), 1e-5);
        assert_close(
            &format!("{case} moments (logvar clamped)"),
            &moments.narrow(1, 0, 4).unwrap(),
            &g("moments").narrow(1, 0, 4).unwrap(),
            1e-5,
        );
        // `sample(torch.Generator().manual_seed(11))`: the noise from our generator.
        let noise = TorchGenerator::new(11).randn(posterior.mean.dims(), DType::F32, &Device::Cpu).unwrap();
        assert_close(&format!("{case} sample"), &posterior.sample(&noise).unwrap(), g("sample"), 1e-5);
    }
}

#[test]
fn the_encoder_in_bf16_stays_finite() {
    let goldens = load_goldens("images/vae_encoder.safetensors");
    let dir = model_dir("tiny-sigma-256").join("vae");
    let f32_encoder = VaeEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap().unwrap();
    let bf16_encoder = VaeEncoder::load(&dir, DType::BF16, &Device::Cpu).unwrap().unwrap();
    for magnitude in [1.0, 1e3] {
        let input = (golden(&goldens, "photo_96x64:input") * magnitude).unwrap();
        let reference = f32_encoder.encode(&input).unwrap();
        let out = bf16_encoder.encode(&input).unwrap();
        assert!(all_finite(&out.mean) && all_finite(&out.std), "bf16 encode of input ×{magnitude}");
        let diff = pixart_suite::max_abs_diff(&out.mean, &reference.mean);
        let range = pixart_suite::max_abs(&reference.mean);
        eprintln!("×{magnitude}: bf16 vs f32 mean max abs diff {diff:.3e} of range {range:.3e}");
        assert!(diff <= 0.05 * range.max(1e-3), "×{magnitude}: {diff} vs range {range}");
    }
}

#[test]
fn a_strided_encoder_convolution_in_bands_is_the_same() {
    // The downsampler of the encoder run in bands of one output row: what a 2048² image does.
    let goldens = load_goldens("images/vae_encoder.safetensors");
    let weight = Tensor::randn(0f32, 1.0, (4, 4, 3, 3), &Device::Cpu).unwrap();
    let conv = pixart_core::conv::Conv::new(candle_nn::Conv2d::new(
        weight,
        None,
        candle_nn::Conv2dConfig { stride: 2, ..Default::default() },
    ));
    let x = Tensor::cat(&[golden(&goldens, "photo_96x64:input"); 2], 1).unwrap().narrow(1, 0, 4).unwrap();
    let whole = candle_core::Module::forward(&conv.0, &x).unwrap();
    assert_close("banded stride-2 conv", &conv.forward_banded(&x, 1).unwrap(), &whole, 1e-5);
}

fn schedulers() -> (Box<dyn Scheduler>, Box<dyn Scheduler>) {
    let text = std::fs::read_to_string(model_dir("tiny-sigma-256").join("scheduler/scheduler_config.json")).unwrap();
    let config = SchedulerConfig::from_json(&text).unwrap();
    (Box::new(DpmSolverMultistep::new(&config, 10).unwrap()), Box::new(SaSolver::new(&config, 10).unwrap()))
}

#[test]
fn add_noise_from_a_begin_index_is_diffusers() {
    let goldens = load_goldens("images/add_noise.safetensors");
    let (x, noise) = (golden(&goldens, "x"), golden(&goldens, "noise"));
    for begin in [0, 3, 7] {
        let (mut dpm, mut sa) = schedulers();
        dpm.begin_at(begin).unwrap();
        sa.begin_at(begin).unwrap();
        let timesteps: Vec<u32> =
            golden(&goldens, "dpm:timesteps").to_vec1::<i64>().unwrap().into_iter().map(|t| t as u32).collect();
        assert_eq!(dpm.timesteps(), timesteps.as_slice());
        assert_close(
            &format!("DPM add_noise at {begin}"),
            &dpm.add_noise(x, noise, begin).unwrap(),
            golden(&goldens, &format!("dpm:begin{begin}")),
            1e-6,
        );
        assert_close(
            &format!("SA add_noise at {begin}"),
            &sa.add_noise(x, noise, begin).unwrap(),
            golden(&goldens, &format!("sa:begin{begin}")),
            1e-6,
        );
    }
    // After one step from index 3, diffusers' DPM noises to its step index (4): the inpainting
    // blend's level.
    let (mut dpm, _) = schedulers();
    dpm.begin_at(3).unwrap();
    let output = golden(&goldens, "dpm:after_step_from3:model_output");
    let stepped = dpm.step(output, x, &mut TorchGenerator::new(0)).unwrap();
    assert_close(
        "DPM step from index 3 (first order)",
        &stepped,
        golden(&goldens, "dpm:after_step_from3:step_output"),
        1e-5,
    );
    assert_close(
        "DPM add_noise after the step",
        &dpm.add_noise(x, noise, 4).unwrap(),
        golden(&goldens, "dpm:after_step_from3"),
        1e-6,
    );
    // A begin index is refused after a step or past the end.
    assert!(dpm.begin_at(0).is_err());
    assert!(schedulers().0.begin_at(10).is_err());
}
