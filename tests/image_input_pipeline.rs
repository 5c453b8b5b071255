//! Image-to-image, inpainting and perturbed-attention guidance end to end against diffusers
//! (`goldens/image_input/`, written by `tests/reference/image_input_fixtures.py`): diffusers'
//! SDXL `get_timesteps`/`prepare_latents`/`prepare_mask_latents` around `PixArtSigmaPipeline`'s
//! own loop (with the inpainting blend after each step), and `PixArtSigmaPAGPipeline`; every
//! fal request there gives diffusers' PNGs within 2/255. PAG's layer patterns select the blocks
//! diffusers selects on a 28-block model.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use pixart_fal::{decode_image, DecodeLimits, GenerateRequest, InputPictures};
use pixart_pipeline::pag::select_blocks;
use pixart_pipeline::{GenerationParams, LoadOptions, Pipeline, PipelineError, RgbImage};
use pixart_suite::{fixtures_dir, goldens_dir, load_json, max_pixel_diff, model_dir};

fn pipeline() -> Pipeline {
    let mut options = LoadOptions::on(Device::Cpu, DType::F32);
    options.hub = Default::default();
    Pipeline::load(model_dir("tiny-sigma-256").to_str().unwrap(), &options).unwrap()
}

fn picture(name: &str) -> Arc<RgbImage> {
    let bytes = std::fs::read(fixtures_dir().join("images").join(name)).unwrap();
    Arc::new(decode_image(&bytes, &DecodeLimits::default()).unwrap())
}

/// A golden case's request, with its pictures read from `fixtures/images/`.
fn case_params(case: &Path) -> (GenerateRequest, GenerationParams) {
    let request = GenerateRequest::from_json(&std::fs::read_to_string(case.join("request.json")).unwrap()).unwrap();
    let pictures = InputPictures {
        image: request.image_url.as_ref().map(|url| picture(url.as_str())),
        mask: request.mask_url.as_ref().map(|url| picture(url.as_str())),
    };
    let params = request.to_params_with_pictures(pictures).unwrap();
    (request, params)
}

#[test]
fn every_case_gives_diffusers_images() {
    let pipeline = pipeline();
    let mut cases: Vec<_> = std::fs::read_dir(goldens_dir().join("image_input"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("request.json").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 16, "{} cases", cases.len());
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let (request, params) = case_params(&case);
        let generation = pipeline.generate(&params).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(generation.images.len(), request.num_images.get() as usize, "{name}");
        let expected_steps = match request.image_url {
            Some(_) => (request.num_inference_steps.get() as f64 * request.strength.get()) as usize,
            None => request.num_inference_steps.get() as usize,
        };
        assert_eq!(generation.timings.steps.len(), expected_steps, "{name}: steps run");
        for (i, image) in generation.images.iter().enumerate() {
            let diff = max_pixel_diff(&image.pixels, &case.join(format!("image_{i}.png")));
            eprintln!("{name} image {i} ({}x{}): max pixel diff {diff}/255", image.width, image.height);
            assert!(diff <= 2, "{name}: image {i} differs by {diff}/255");
        }
    }
}

#[test]
fn pag_layer_patterns_select_what_diffusers_selects() {
    let golden = load_json("image_input/pag_layers.json");
    let names: Vec<String> = (0..28).map(|i| format!("transformer_blocks.{i}.attn1")).collect();
    for case in golden["cases"].as_array().unwrap() {
        let pattern = case["pattern"].as_str().unwrap().to_string();
        let selected = select_blocks(&names, std::slice::from_ref(&pattern));
        match case["blocks"].as_array() {
            Some(blocks) => {
                let want: Vec<usize> = blocks.iter().map(|b| b.as_u64().unwrap() as usize).collect();
                assert_eq!(selected.unwrap(), want, "{pattern}");
            }
            None => {
                let refused = selected.unwrap_err();
                assert_eq!(refused.parameter, "pag_applied_layers[0]", "{pattern}");
                eprintln!("{pattern}: refused ({}); diffusers: {}", refused.message, case["error"]);
            }
        }
    }
}

#[test]
fn bad_image_parameters_are_refused_by_name_before_any_step() {
    let pipeline = pipeline();
    let photo = picture("photo.png");
    let base = GenerationParams::new("x").with_steps(10).with_seed(1);
    let refused = |params: GenerationParams| match pipeline.generate(&params) {
        Err(PipelineError::InvalidParameter(e)) => e.parameter,
        other => panic!("not refused: {other:?}"),
    };
    // ⌊10 · 0.05⌋ = 0 steps would run.
    assert_eq!(refused(base.clone().with_image(photo.clone(), 0.05).unwrap()), "strength");
    assert_eq!(refused(base.clone().with_image(photo.clone(), 1.5).unwrap()), "strength");
    assert_eq!(refused(base.clone().with_mask(photo.clone())), "mask");
    assert_eq!(refused(base.clone().with_pag(2.0, vec!["mid".into()])), "pag_applied_layers[0]");
    assert_eq!(refused(base.clone().with_pag(f64::NAN, vec!["blocks.0".into()])), "pag_scale");
    let huge = Arc::new(RgbImage { width: 5000, height: 16, pixels: Vec::new() });
    assert_eq!(base.clone().with_image(huge, 0.5).unwrap_err().parameter, "image");
    // A scale of 0 or no layers is no PAG: the text-to-image image exactly.
    let plain = pipeline.generate(&base.clone().with_size(64, 64).unwrap()).unwrap();
    let off = pipeline.generate(&base.clone().with_size(64, 64).unwrap().with_pag(0.0, vec!["blocks.0".into()]));
    assert_eq!(off.unwrap().images, plain.images);
    let none = pipeline.generate(&base.with_size(64, 64).unwrap().with_pag(3.0, Vec::new()));
    assert_eq!(none.unwrap().images, plain.images);
}
