//! End to end through the library: fal requests on the fixture models give diffusers' images
//! (≤ 2/255 per pixel), and the pipeline's intermediate values equal the hooked diffusers run.

use candle_core::{DType, Device};
use pixart_fal::GenerateRequest;
use pixart_pipeline::{CpuProducts, GenerationParams, LoadOptions, Pipeline, TorchGenerator};
use pixart_suite::{assert_close, golden, goldens_dir, load_goldens, max_pixel_diff, model_dir};

fn load(model: &str) -> Pipeline {
    load_with(model, CpuProducts::F32)
}

fn load_with(model: &str, cpu_products: CpuProducts) -> Pipeline {
    let mut options = LoadOptions::on(Device::Cpu, DType::F32);
    options.hub = Default::default();
    options.cpu_products = cpu_products;
    Pipeline::load(model_dir(model).to_str().unwrap(), &options).unwrap()
}

#[test]
fn fal_requests_reproduce_diffusers_images() {
    let cases = std::fs::read_dir(goldens_dir().join("e2e")).unwrap();
    let mut names: Vec<_> = cases.map(|e| e.unwrap().path()).collect();
    names.sort();
    assert!(names.len() >= 7, "expected the seven end-to-end cases, found {}", names.len());
    let mut pipelines = std::collections::HashMap::new();
    for case in names {
        let model = std::fs::read_to_string(case.join("model.txt")).unwrap().trim().to_string();
        let pipeline = pipelines.entry(model.clone()).or_insert_with(|| load(&model));
        let request = GenerateRequest::from_json(&std::fs::read_to_string(case.join("request.json")).unwrap()).unwrap();
        let generation = pipeline.generate(&request.to_params()).unwrap();
        assert_eq!(generation.images.len(), request.num_images.get() as usize);
        assert_eq!(generation.seed, request.seed.unwrap());
        for (i, image) in generation.images.iter().enumerate() {
            let size = request.to_params().size;
            assert_eq!((image.width, image.height), (size.width(), size.height()));
            let diff = max_pixel_diff(&image.pixels, &case.join(format!("image_{i}.png")));
            eprintln!("{} image {i}: max pixel diff {diff}/255", case.file_name().unwrap().to_string_lossy());
            assert!(diff <= 2, "{}: image {i} differs by {diff}/255", case.display());
        }
    }
}

/// bf16 products (what `--dtype bf16` runs on an AVX512-BF16 CPU: the transformer's linear
/// layers and the VAE decoder's 3×3 convolutions): operands keep 8 significant bits (relative
/// rounding ≤ 2⁻⁹). On the fixtures that moved no pixel more than 3/255 from diffusers' f32
/// images (AMD EPYC; 1/255 with the linear layers alone; an Intel Xeon with either
/// `PIXART_BF16_KERNEL`, `dot` or `fma`, the same), while one wrong operand in the
/// kernel moves them by 22/255; the images must also differ from the f32 run (the bf16 path
/// ran). On a CPU without the instruction the option changes nothing: the f32 images, exactly.
#[test]
fn bf16_products_stay_within_bf16_rounding_of_diffusers_images() {
    half_products_stay_near_diffusers_images(CpuProducts::Bf16, CpuProducts::Bf16.in_bf16(), BF16_PRODUCTS_BOUND);
}

/// f16 products (what `--dtype f16` runs on an AVX512-FP16 CPU: the transformer's linear layers,
/// operands rounded to f16, sums in f16 along runs of 32 and in f32 across them): on the
/// fixtures within [`F16_PRODUCTS_BOUND`] of diffusers' f32 images, and not equal to the f32
/// run's; elsewhere the f32 images, exactly.
#[test]
fn f16_products_stay_within_f16_rounding_of_diffusers_images() {
    half_products_stay_near_diffusers_images(CpuProducts::F16, CpuProducts::F16.in_f16(), F16_PRODUCTS_BOUND);
}

/// Every end-to-end case with `products` (which run, on this CPU, when `runs`) against
/// diffusers' f32 images: at most `bound` per pixel, and not all equal to the f32 run's.
fn half_products_stay_near_diffusers_images(products: CpuProducts, runs: bool, bound: u8) {
    let cases = std::fs::read_dir(goldens_dir().join("e2e")).unwrap();
    let mut names: Vec<_> = cases.map(|e| e.unwrap().path()).collect();
    names.sort();
    let mut pipelines = std::collections::HashMap::new();
    let mut differs_from_f32 = false;
    for case in names {
        let model = std::fs::read_to_string(case.join("model.txt")).unwrap().trim().to_string();
        let (plain, half) =
            pipelines.entry(model.clone()).or_insert_with(|| (load(&model), load_with(&model, products)));
        let request = GenerateRequest::from_json(&std::fs::read_to_string(case.join("request.json")).unwrap()).unwrap();
        let want = plain.generate(&request.to_params()).unwrap();
        let ours = half.generate(&request.to_params()).unwrap();
        for (i, (image, f32_image)) in ours.images.iter().zip(&want.images).enumerate() {
            if !runs {
                assert_eq!(image.pixels, f32_image.pixels, "{}: image {i}", case.display());
                continue;
            }
            differs_from_f32 |= image.pixels != f32_image.pixels;
            let diff = max_pixel_diff(&image.pixels, &case.join(format!("image_{i}.png")));
            eprintln!(
                "{} image {i}: {products:?} products, max pixel diff {diff}/255",
                case.file_name().unwrap().to_string_lossy()
            );
            assert!(diff <= bound, "{}: image {i} differs by {diff}/255", case.display());
        }
    }
    assert!(differs_from_f32 || !runs, "the {products:?} products gave the f32 images: did they run?");
}

/// See [`bf16_products_stay_within_bf16_rounding_of_diffusers_images`]: 2–3/255 measured, room
/// for another CPU's order of sums.
const BF16_PRODUCTS_BOUND: u8 = 5;

/// See [`f16_products_stay_within_f16_rounding_of_diffusers_images`]: 1/255 measured (Intel Xeon),
/// room for another CPU.
const F16_PRODUCTS_BOUND: u8 = 3;

#[test]
fn intermediate_values_equal_the_hooked_diffusers_run() {
    let pipeline = load("tiny-sigma-256");
    let g = load_goldens("tiny-sigma-256/pipeline_dpm_default.safetensors");
    // Text states of the real tokens (lowercased, stripped prompt).
    let prompt = pipeline.encode_prompt("a small cactus with a happy face in the sahara desert").unwrap();
    assert_close("prompt states", &prompt, golden(&g, "prompt.hidden_states"), 1e-5);
    let negative = pipeline.encode_prompt("").unwrap();
    assert_close("negative states", &negative, golden(&g, "negative.hidden_states"), 1e-5);
    // Initial latents from the seed: generated at the 256 bin (32×32 latents) for a 128×128 request.
    let latents = TorchGenerator::new(0).randn((1, 4, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert_close("initial latents", &latents, golden(&g, "latents_init"), 2e-6);
    assert_eq!(pipeline.aspect_ratio_bins().unwrap().classify(128, 128), (256, 256));
}

#[test]
fn cancelling_from_the_step_callback_stops_the_run() {
    let pipeline = load("tiny-sigma-256");
    let params = GenerationParams::new("a cat").with_size(64, 64).unwrap().with_steps(10);
    let mut seen = 0;
    let result = pipeline.generate_with_progress(&params, |p| {
        seen = p.step;
        if p.step == 3 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    assert!(matches!(result, Err(pixart_pipeline::PipelineError::Cancelled)));
    assert_eq!(seen, 3);
}
