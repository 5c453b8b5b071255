//! No panic is reachable from a model's config files: every numeric (and list) field of every
//! config of the tiny model is set to zero, one, odd, negative, huge (up to u64::MAX), fractional and wrong-typed
//! values in turn, and the model is loaded and run. Each either works or fails with an error that
//! names the file (and, for values out of range, the field).

use std::path::Path;

use candle_core::{DType, Device};
use pixart_pipeline::{GenerationParams, LoadOptions, Pipeline};
use pixart_suite::fixture_copy;
use serde_json::{json, Value};

fn load_and_run(model: &Path) -> Result<(), String> {
    let options = LoadOptions::on(Device::Cpu, DType::F32);
    let pipeline = Pipeline::load(model.to_str().unwrap(), &options).map_err(|e| pixart_pipeline::error_report(&e))?;
    let params = GenerationParams::new("a cat")
        .with_size(32, 48)
        .map_err(|e| e.to_string())?
        .with_steps(2)
        .with_guidance_scale(2.0)
        .with_seed(1);
    let generation = pipeline.generate(&params).map_err(|e| pixart_pipeline::error_report(&e))?;
    assert_eq!((generation.images[0].width, generation.images[0].height), (32, 48));
    Ok(())
}

/// The values tried for a field holding `original`.
fn mutations(original: &Value) -> Vec<Value> {
    match original {
        Value::Number(_) => vec![
            json!(0),
            json!(1),
            json!(3),
            json!(-1),
            json!(1_000_000_000_000u64),
            json!(u64::MAX),
            json!(1e19),
            json!(0.5),
            json!(1e300),
            json!("x"),
            Value::Null,
        ],
        Value::Array(items) if items.iter().all(Value::is_number) => vec![
            json!([]),
            json!([0]),
            json!([4]),
            json!([3, 3]),
            json!([4, 8, 8, 8, 8, 8, 8, 8, 8, 8]),
            json!([-1, 8]),
            json!("x"),
        ],
        Value::Bool(b) => vec![json!(!b), json!(1)],
        _ => Vec::new(),
    }
}

#[test]
fn every_config_field_gives_a_result_or_an_error_never_a_panic() {
    let model = fixture_copy("tiny-sigma-256", "config-robustness");
    load_and_run(&model).expect("the unmodified fixture runs");

    let files = [
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
    ];
    let (mut cases, mut refused, mut panics) = (0, 0, Vec::new());
    for file in files {
        let path = model.join(file);
        let original_text = std::fs::read_to_string(&path).unwrap();
        let original: Value = serde_json::from_str(&pixart_core::python_json(&original_text)).unwrap();
        let mut keys: Vec<String> = original.as_object().unwrap().keys().cloned().collect();
        if file.starts_with("tokenizer") {
            keys.push("extra_ids".into());
        }
        for key in keys {
            let current = original.get(&key).cloned().unwrap_or(json!(100));
            for value in mutations(&current) {
                let mut mutated = original.clone();
                mutated[&key] = value.clone();
                std::fs::write(&path, serde_json::to_string(&mutated).unwrap()).unwrap();
                cases += 1;
                match std::panic::catch_unwind(|| load_and_run(&model)) {
                    Ok(Ok(())) => {}
                    Ok(Err(message)) => {
                        refused += 1;
                        let folder = file.split('/').next().unwrap();
                        assert!(
                            message.contains(folder),
                            "{file} {key} = {value}: error does not name the file: {message}"
                        );
                    }
                    Err(_) => panics.push(format!("{file}: {key} = {value}")),
                }
            }
        }
        std::fs::write(&path, original_text).unwrap();
    }
    std::fs::remove_dir_all(&model).unwrap();
    eprintln!("{cases} config mutations: {refused} refused with an error, {} ran", cases - refused - panics.len());
    assert!(panics.is_empty(), "{} mutations panicked:\n{}", panics.len(), panics.join("\n"));
    assert!(cases > 200 && refused > 100, "{cases} cases, {refused} refused");
}

/// A named out-of-range value is reported with the file and the field.
#[test]
fn out_of_range_values_name_the_file_and_the_field() {
    let model = fixture_copy("tiny-sigma-256", "config-fields");
    for (file, key, value) in [
        ("vae/config.json", "norm_num_groups", json!(0)),
        ("vae/config.json", "block_out_channels", json!([4, 8, 8, 8, 8, 8, 8, 8, 8, 8])),
        ("transformer/config.json", "patch_size", json!(0)),
        ("transformer/config.json", "num_attention_heads", json!(0)),
        ("text_encoder/config.json", "relative_attention_num_buckets", json!(1)),
        ("text_encoder/config.json", "num_heads", json!(0)),
        ("scheduler/scheduler_config.json", "num_train_timesteps", json!(1_000_000_000_000u64)),
        ("scheduler/scheduler_config.json", "beta_end", json!(1.5)),
        ("tokenizer/tokenizer_config.json", "extra_ids", json!(1_000_000_000_000u64)),
    ] {
        let path = model.join(file);
        let original = std::fs::read_to_string(&path).unwrap();
        let mut json: Value = serde_json::from_str(&pixart_core::python_json(&original)).unwrap();
        json[key] = value.clone();
        std::fs::write(&path, json.to_string()).unwrap();
        let message = load_and_run(&model).unwrap_err();
        assert!(message.contains(file) && message.contains(key), "{file} {key} = {value}: {message}");
        std::fs::write(&path, original).unwrap();
    }
    std::fs::remove_dir_all(&model).unwrap();
}
