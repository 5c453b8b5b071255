//! The transformer against diffusers' `PixArtTransformer2DModel` on the fixtures: every
//! sub-block and the output within 1e-5 (f32), on non-square latents with a masked caption batch.

use candle_core::{DType, Device};
use pixart_dit::{DitConfig, PixArtTransformer};
use pixart_suite::{assert_close, golden, load_goldens, model_dir, FIXTURE_MODELS};

fn timesteps(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn every_block_and_the_output_match_diffusers() {
    for model in FIXTURE_MODELS {
        let g = load_goldens(&format!("{model}/transformer.safetensors"));
        let dit = PixArtTransformer::load(&model_dir(model).join("transformer"), DType::F32, &Device::Cpu).unwrap();
        // In f32 on the CPU every self-attention's Q, K and V come out of one product.
        assert_eq!(dit.blocks_with_stacked_qkv(), dit.config().num_layers, "{model}");
        let latents = golden(&g, "hidden_states");
        let (_, _, h, w) = latents.dims4().unwrap();
        assert_ne!(h, w, "the golden latent must be non-square");
        let (out, trace) = dit
            .forward_traced(
                latents,
                &timesteps(golden(&g, "timestep")),
                golden(&g, "encoder_hidden_states"),
                Some(golden(&g, "encoder_attention_mask")),
                true,
            )
            .unwrap();
        let trace = trace.unwrap();
        assert_close(&format!("{model} pos_embed"), &trace.pos_embed, golden(&g, "pos_embed"), 1e-5);
        assert_close(&format!("{model} adaln t6"), &trace.t6, golden(&g, "adaln_single.t6"), 1e-5);
        assert_close(
            &format!("{model} embedded timestep"),
            &trace.embedded_timestep,
            golden(&g, "adaln_single.embedded_timestep"),
            1e-5,
        );
        // diffusers projects all 12 caption tokens; we drop positions padded in every row (none here).
        assert_close(&format!("{model} caption projection"), &trace.caption, golden(&g, "caption_projection"), 1e-5);
        for (i, block) in trace.blocks.iter().enumerate() {
            assert_close(&format!("{model} block {i}"), block, golden(&g, &format!("block.{i}")), 1e-5);
        }
        assert_close(&format!("{model} output"), &out, golden(&g, "output"), 1e-5);
    }
}

/// With the linear layers multiplying in bf16 or f16 (where this CPU has the instructions;
/// elsewhere in f32), every self-attention's Q, K and V still come out of one product (the
/// three packed layers in one op), and the output stays within half precision's rounding of
/// diffusers' f32 output.
#[test]
fn half_products_multiply_qkv_in_one_product_near_diffusers() {
    use pixart_core::linear_bf16::CpuProducts;
    use pixart_dit::TransformerWeights;
    for (products, runs, bound) in [
        (CpuProducts::Bf16, CpuProducts::Bf16.in_bf16(), BF16_BOUND),
        (CpuProducts::F16, CpuProducts::F16.in_f16(), F16_BOUND),
    ] {
        for model in FIXTURE_MODELS {
            let g = load_goldens(&format!("{model}/transformer.safetensors"));
            let dir = model_dir(model).join("transformer");
            let mut config: DitConfig =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            config.cpu_products = products;
            let weights = TransformerWeights::from_folder(&dir, DType::F32, &Device::Cpu)
                .unwrap()
                .for_cpu_products(products)
                .unwrap();
            let dit = PixArtTransformer::from_weights(&config, &weights).unwrap();
            assert_eq!(dit.blocks_with_stacked_qkv(), config.num_layers, "{model} {products:?}");
            let out = dit
                .forward(
                    golden(&g, "hidden_states"),
                    &timesteps(golden(&g, "timestep")),
                    golden(&g, "encoder_hidden_states"),
                    Some(golden(&g, "encoder_attention_mask")),
                )
                .unwrap();
            let tol = if runs { bound } else { 1e-5 };
            assert_close(&format!("{model} {products:?} output"), &out, golden(&g, "output"), tol);
            // And the half-precision products did run: their rounding shows.
            assert_eq!(pixart_suite::max_abs_diff(&out, golden(&g, "output")) > 1e-5, runs, "{model} {products:?}");
        }
    }
}

/// See [`half_products_multiply_qkv_in_one_product_near_diffusers`]: on outputs up to 1.7–2.0,
/// 0.9–1.0e-3 measured (Intel Xeon), below bf16's unit roundoff (2⁻⁹) of them; room for
/// another CPU's order of sums.
const BF16_BOUND: f32 = 4e-3;
/// See [`half_products_multiply_qkv_in_one_product_near_diffusers`]: 3.1–4.7e-4 measured (Intel
/// Xeon), f16's 11-bit significands; room as above.
const F16_BOUND: f32 = 2e-3;

#[test]
fn absent_use_additional_conditions_means_false_and_true_is_refused() {
    let dir = model_dir("tiny-sigma-256").join("transformer");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("use_additional_conditions");
    let config: DitConfig = serde_json::from_value(json.clone()).unwrap();
    config.validate().unwrap();
    json["use_additional_conditions"] = serde_json::Value::Bool(true);
    let config: DitConfig = serde_json::from_value(json).unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("use_additional_conditions"), "{err}");
}

#[test]
fn bad_latent_shapes_are_errors() {
    let g = load_goldens("tiny-sigma-256/transformer.safetensors");
    let dit =
        PixArtTransformer::load(&model_dir("tiny-sigma-256").join("transformer"), DType::F32, &Device::Cpu).unwrap();
    let odd = candle_core::Tensor::zeros((2, 4, 5, 6), DType::F32, &Device::Cpu).unwrap();
    let err = dit.forward(&odd, &[1.0, 2.0], golden(&g, "encoder_hidden_states"), None).unwrap_err().to_string();
    assert!(err.contains("multiples of 2"), "{err}");
    let err = dit
        .forward(golden(&g, "hidden_states"), &[1.0], golden(&g, "encoder_hidden_states"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch"), "{err}");
}

/// One denoising step with everything constant prepared once (timestep MLP for all steps,
/// caption keys/values, cached position embedding) equals diffusers' output for that step.
#[test]
fn prepared_steps_equal_diffusers() {
    for model in FIXTURE_MODELS {
        let g = load_goldens(&format!("{model}/transformer.safetensors"));
        let dit = PixArtTransformer::load(&model_dir(model).join("transformer"), DType::F32, &Device::Cpu).unwrap();
        let latents = golden(&g, "hidden_states");
        let t = timesteps(golden(&g, "timestep"));
        // The golden batch has one timestep per row; prepare each row's timestep among others.
        let all = dit.prepare_timesteps(&[999.0, t[0], 3.0, t[1]], &Device::Cpu).unwrap();
        assert_eq!(all.len(), 4);
        assert!(all.get(4).is_err());
        let out = golden(&g, "output");
        for (row, index) in [(0usize, 1usize), (1, 3)] {
            let x = latents.narrow(0, row, 1).unwrap();
            let one = |c: &candle_core::Tensor| c.narrow(0, row, 1).unwrap();
            let caption = dit
                .prepare_caption(
                    &one(golden(&g, "encoder_hidden_states")),
                    Some(&one(golden(&g, "encoder_attention_mask"))),
                )
                .unwrap();
            for _ in 0..2 {
                // twice: the second call takes the position embedding from the cache
                let got = dit.forward_prepared(&x, &all.get(index).unwrap(), &caption).unwrap();
                assert_close(&format!("{model} row {row}"), &got, &out.narrow(0, row, 1).unwrap(), 1e-5);
            }
        }
        // A whole batch with one prepared timestep for every row.
        let same = dit.forward(latents, &[t[0], t[0]], golden(&g, "encoder_hidden_states"), None).unwrap();
        let prepared = dit.prepare_caption(golden(&g, "encoder_hidden_states"), None).unwrap();
        let got = dit.forward_prepared(latents, &all.get(1).unwrap(), &prepared).unwrap();
        assert_close(&format!("{model} shared timestep"), &got, &same, 1e-6);
    }
}

/// A classifier-free-guidance batch (one latent at one timestep under two captions) computes
/// the first block's self-attention once for both rows (`SharedRows`); each row still equals
/// that row alone: the first against diffusers' output for it, the second against a batch of one.
#[test]
fn rows_with_equal_latents_share_the_first_self_attention_and_equal_diffusers() {
    use candle_core::Tensor;
    use pixart_dit::shared_rows::SharedRows;
    for model in FIXTURE_MODELS {
        let g = load_goldens(&format!("{model}/transformer.safetensors"));
        let dit = PixArtTransformer::load(&model_dir(model).join("transformer"), DType::F32, &Device::Cpu).unwrap();
        let t = timesteps(golden(&g, "timestep"));
        let first = golden(&g, "hidden_states").narrow(0, 0, 1).unwrap();
        let latents = Tensor::cat(&[&first, &first], 0).unwrap();
        let (caption, mask) = (golden(&g, "encoder_hidden_states"), golden(&g, "encoder_attention_mask"));
        let t6 = Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap();
        assert!(SharedRows::of(&latents, &t6).unwrap().is_some());
        assert!(SharedRows::of(golden(&g, "hidden_states"), &t6).unwrap().is_none());
        let both = dit.forward(&latents, &[t[0], t[0]], caption, Some(mask)).unwrap();
        let row0 = golden(&g, "output").narrow(0, 0, 1).unwrap();
        assert_close(&format!("{model} shared row 0"), &both.narrow(0, 0, 1).unwrap(), &row0, 1e-5);
        let one = |x: &Tensor| x.narrow(0, 1, 1).unwrap();
        let alone = dit.forward(&first, &[t[0]], &one(caption), Some(&one(mask))).unwrap();
        assert_close(&format!("{model} shared row 1"), &both.narrow(0, 1, 1).unwrap(), &alone, 1e-6);
    }
}
