//! LoRAs and single-file transformers against diffusers (`goldens/lora/`, written by
//! `tests/reference/lora_fixtures.py`): random LoRAs made with PEFT on the tiny model, rendered by
//! diffusers with the LoRAs merged (W + scale·alpha/r·B·A), and the same LoRA written in every
//! layout found in the wild; images ≤ 2/255 from diffusers'. The model is left as it was after a
//! request with LoRAs; bad files are refused naming the problem; the original-layout checkpoint
//! (safetensors and `.pth`) gives the folder's image exactly.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pixart_fal::GenerateRequest;
use pixart_pipeline::{GenerationParams, LoadOptions, Lora, LoraError, Pipeline, PipelineError};
use pixart_suite::{fixtures_dir, goldens_dir, max_pixel_diff, model_dir};

fn pipeline(transformer: Option<PathBuf>) -> Pipeline {
    let mut options = LoadOptions::on(Device::Cpu, DType::F32);
    options.hub = Default::default();
    options.transformer = transformer;
    Pipeline::load(model_dir("tiny-sigma-256").to_str().unwrap(), &options).unwrap()
}

fn lora(name: &str) -> Arc<Lora> {
    Arc::new(Lora::read(&fixtures_dir().join("lora").join(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

/// The goldens' request, as the engine runs it.
fn params() -> GenerationParams {
    let text = std::fs::read_to_string(goldens_dir().join("lora/base/request.json")).unwrap();
    GenerateRequest::from_json(&text).unwrap().to_params()
}

fn golden(case: &str) -> PathBuf {
    goldens_dir().join("lora").join(case).join("image_0.png")
}

#[test]
fn every_layout_of_a_lora_gives_diffusers_image() {
    let pipeline = pipeline(None);
    let layouts = [
        ("a_peft", "PEFT (base_model.model.), diffusers names"),
        ("a_peft/adapter_model.safetensors", "PEFT (base_model.model.), diffusers names"),
        ("a_unet_prefix.safetensors", "diffusers save_lora_weights (unet.base_model.model.), diffusers names"),
        ("a_simpletuner.safetensors", "SimpleTuner/diffusers (transformer.), diffusers names"),
        ("a_alpha_tensors.safetensors", "keys without a prefix, diffusers names"),
        ("a_onetrainer.safetensors", "OneTrainer (lora_transformer_), diffusers names"),
        ("a_onetrainer_te.safetensors", "OneTrainer (lora_transformer_), diffusers names"),
        ("a_original.safetensors", "keys without a prefix, original PixArt names"),
        ("a_kohya.safetensors", "kohya (lora_unet_), original PixArt names"),
    ];
    for (file, layout) in layouts {
        let lora = lora(file);
        assert_eq!(lora.layout(), layout, "{file}");
        let generation = pipeline.generate(&params().with_lora(lora.clone(), 1.0)).unwrap();
        let diff = max_pixel_diff(&generation.images[0].pixels, &golden("one"));
        eprintln!("{file} ({layout}, {} layers): max pixel diff {diff}/255", lora.layer_count());
        assert!(diff <= 2, "{file}: {diff}/255 from diffusers' image");
    }
    // The text-encoder tensors of a OneTrainer file are set aside, not applied.
    assert_eq!(lora("a_onetrainer_te.safetensors").text_encoder_tensors().len(), 3);
    assert!(lora("a_onetrainer.safetensors").text_encoder_tensors().is_empty());
}

#[test]
fn loras_add_up_and_leave_the_model_as_it_was() {
    let pipeline = pipeline(None);
    let base = pipeline.generate(&params()).unwrap();
    assert!(max_pixel_diff(&base.images[0].pixels, &golden("base")) <= 2);
    let two = pipeline.generate(&params().with_lora(lora("a_peft"), 0.5).with_lora(lora("b_peft"), -0.3)).unwrap();
    let diff = max_pixel_diff(&two.images[0].pixels, &golden("two"));
    assert!(diff <= 2, "two LoRAs: {diff}/255 from diffusers' image");
    assert!(two.timings.lora_merge > std::time::Duration::ZERO);
    // The next request without LoRAs gets the base image bit for bit, and scale 0 is the base.
    let again = pipeline.generate(&params()).unwrap();
    assert_eq!(again.images, base.images, "the model changed after a request with LoRAs");
    let zero = pipeline.generate(&params().with_lora(lora("a_peft"), 0.0)).unwrap();
    assert_eq!(zero.images, base.images);
    assert!(max_pixel_diff(&zero.images[0].pixels, &golden("zero")) <= 2);
    // Different LoRAs back to back each get their own image; the same LoRAs again the same one.
    let one = pipeline.generate(&params().with_lora(lora("a_peft"), 1.0)).unwrap();
    let two_again =
        pipeline.generate(&params().with_lora(lora("a_peft"), 0.5).with_lora(lora("b_peft"), -0.3)).unwrap();
    assert_ne!(one.images, two.images);
    assert_eq!(two_again.images, two.images);
}

/// A LoRA on the self-attention's Q/K/V merged into weights that stack them: the stacks are
/// rebuilt from the merged layers, every block still multiplies Q, K and V in one product, and
/// the model equals the same merge into unstacked weights (three products); the base weights
/// are left as they were.
#[test]
fn a_lora_on_stacked_qkv_weights_restacks_them() {
    use pixart_dit::{CpuProducts, PixArtTransformer, TransformerWeights};
    let dir = model_dir("tiny-sigma-256").join("transformer");
    let config: pixart_dit::DitConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let unstacked = TransformerWeights::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    let stacked = unstacked.clone().for_cpu_products(CpuProducts::F32).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let caption = Tensor::randn(0f32, 1.0, (2, 5, config.caption_channels), &Device::Cpu).unwrap();
    let run = |m: &PixArtTransformer| m.forward(&latents, &[500.0, 500.0], &caption, None).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let before = run(&PixArtTransformer::from_weights(&config, &stacked).unwrap());
    let lora = lora("a_peft");
    let deltas = lora.deltas(&stacked, 1.0).unwrap();
    assert!(deltas.keys().any(|k| k.ends_with("attn1.to_k.weight")), "{:?}", deltas.keys());
    let merged = stacked.with_deltas(deltas.clone()).unwrap();
    let model = PixArtTransformer::from_weights(&config, &merged).unwrap();
    assert_eq!(model.blocks_with_stacked_qkv(), config.num_layers);
    let reference = PixArtTransformer::from_weights(&config, &unstacked.with_deltas(deltas).unwrap()).unwrap();
    assert_eq!(reference.blocks_with_stacked_qkv(), 0);
    let (ours, want) = (run(&model), run(&reference));
    assert!(diff(&ours, &want) < 1e-5, "stacked merge {} from the unstacked one", diff(&ours, &want));
    assert!(diff(&before, &want) > 1e-3, "the LoRA changed nothing");
    let after = run(&PixArtTransformer::from_weights(&config, &stacked).unwrap());
    assert_eq!(diff(&after, &before), 0.0, "the base weights changed");
}

/// A safetensors file of `tensors` in a temporary folder.
fn write_lora(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pixart-lora-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let map: std::collections::HashMap<String, Tensor> =
        tensors.iter().map(|(k, t)| ((*k).to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn bad_loras_are_refused_naming_the_problem() {
    let read = |path: PathBuf| Lora::read(&path).unwrap_err();
    let lokr = read(fixtures_dir().join("lora/lokr.safetensors"));
    assert!(matches!(lokr, LoraError::Unsupported(_)) && lokr.to_string().contains("LyCORIS LoKr"), "{lokr}");
    let bytes = std::fs::read(fixtures_dir().join("lora/a_simpletuner.safetensors")).unwrap();
    let truncated = Lora::from_safetensors(&bytes[..bytes.len() / 2], None).unwrap_err();
    assert!(matches!(truncated, LoraError::NotSafetensors(_)), "{truncated}");
    assert!(matches!(Lora::from_safetensors(b"not a file", None), Err(LoraError::NotSafetensors(_))));
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let nan = (zeros(&[4, 32]) + f64::NAN).unwrap();
    let path = write_lora("nan.safetensors", &[("x.lora_A.weight", nan), ("x.lora_B.weight", zeros(&[32, 4]))]);
    assert!(matches!(read(path), LoraError::NotFinite(_)));
    let path = write_lora("stray.safetensors", &[("x.lora_A.weight", zeros(&[4, 32])), ("x.weight", zeros(&[4]))]);
    assert!(read(path).to_string().contains("x.weight"));
    // Layers this model lacks, and shapes that do not fit it, fail the request before any step,
    // naming the LoRA.
    let pipeline = pipeline(None);
    let refused = |lora: Lora| match pipeline.generate(&params().with_lora(Arc::new(lora), 1.0)) {
        Err(PipelineError::InvalidParameter(invalid)) => {
            assert_eq!(invalid.parameter, "loras[0]");
            invalid.message
        }
        other => panic!("expected a refusal naming loras[0], got {other:?}"),
    };
    let unknown = refused(Lora::read(&fixtures_dir().join("lora/unknown_module.safetensors")).unwrap());
    assert!(unknown.contains("transformer_blocks.7.attn1.to_q"), "{unknown}");
    let narrow = write_lora(
        "narrow.safetensors",
        &[
            ("transformer_blocks.0.attn1.to_q.lora_A.weight", zeros(&[4, 16])),
            ("transformer_blocks.0.attn1.to_q.lora_B.weight", zeros(&[32, 4])),
        ],
    );
    let shape = refused(Lora::read(&narrow).unwrap());
    assert!(shape.contains("transformer_blocks.0.attn1.to_q") && shape.contains("[32, 16]"), "{shape}");
    // A refusal through fal names the field.
    let field = pixart_fal::invalid_fields(
        &pipeline.generate(&params().with_lora(Arc::new(Lora::read(&narrow).unwrap()), 1.0)).unwrap_err(),
    );
    assert_eq!(field.unwrap()[0].field, "loras.0.path");
}

#[test]
fn single_file_transformers_give_the_folders_image() {
    let folder = pipeline(None).generate(&params()).unwrap();
    let files = [
        fixtures_dir().join("single-file/tiny-sigma-256-original.safetensors"),
        fixtures_dir().join("single-file/tiny-sigma-256-original.pth"),
        model_dir("tiny-sigma-256").join("transformer/diffusion_pytorch_model.safetensors"),
    ];
    for file in files {
        let generation = pipeline(Some(file.clone())).generate(&params()).unwrap();
        assert_eq!(generation.images, folder.images, "{}", file.display());
        // LoRAs in original keys apply to a model loaded from original keys too.
        let with_lora = pipeline(Some(file.clone())).generate(&params().with_lora(lora("a_kohya.safetensors"), 1.0));
        assert!(max_pixel_diff(&with_lora.unwrap().images[0].pixels, &golden("one")) <= 2, "{}", file.display());
    }
}

#[test]
fn single_files_with_parts_no_sigma_model_has_are_refused_by_name() {
    let original = fixtures_dir().join("single-file/tiny-sigma-256-original.safetensors");
    let mut tensors = candle_core::safetensors::load(&original, &Device::Cpu).unwrap();
    tensors.insert("blocks.0.attn.sr.weight".into(), Tensor::zeros((32, 32, 2, 2), DType::F32, &Device::Cpu).unwrap());
    let dir = std::env::temp_dir().join(format!("pixart-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kv-compression.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut options = LoadOptions::on(Device::Cpu, DType::F32);
    options.transformer = Some(path);
    let error = Pipeline::load(model_dir("tiny-sigma-256").to_str().unwrap(), &options).unwrap_err();
    let report = pixart_pipeline::error_report(&error);
    assert!(report.contains("blocks.0.attn.sr.weight") && report.contains("KV-token compression"), "{report}");
    // A caption width the model's T5 does not give: refused naming the transformer's tensor.
    tensors.remove("blocks.0.attn.sr.weight");
    let wide = Tensor::zeros((32, 48), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("y_embedder.y_proj.fc1.weight".into(), wide);
    let path = dir.join("wide-caption.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    options.transformer = Some(path);
    let error = Pipeline::load(model_dir("tiny-sigma-256").to_str().unwrap(), &options).unwrap_err();
    let report = pixart_pipeline::error_report(&error);
    assert!(report.contains("caption_projection.linear_1.weight") && report.contains("d_model (32)"), "{report}");
    std::fs::remove_dir_all(dir).unwrap();
}
