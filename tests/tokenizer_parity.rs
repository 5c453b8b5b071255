//! The T5 tokenizer against the slow (sentencepiece) T5Tokenizer and transformers' T5Tokenizer,
//! on the goldens of `tests/reference/make_fixtures.py`.

use pixart_suite::{goldens_dir, load_goldens, load_json, model_dir, to_u32_rows, FIXTURE_MODELS};
use pixart_t5::{T5Tokenizer, MAX_SEQUENCE_LENGTH};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn cases() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let doc = load_json("tokenizer_cases.json");
    assert_eq!(doc["max_length"].as_u64().unwrap() as usize, MAX_SEQUENCE_LENGTH);
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["text"].as_str().unwrap().to_string(), ids(&c["sentencepiece"]), ids(&c["transformers"])))
        .collect()
}

/// Runs every case through `encode` and returns the texts whose ids differ from `expected`.
fn mismatches(tokenizer: &T5Tokenizer, pick: impl Fn(&(String, Vec<u32>, Vec<u32>)) -> &Vec<u32>) -> Vec<String> {
    let cases = cases();
    assert!(cases.len() >= 200, "only {} tokenizer cases", cases.len());
    cases
        .iter()
        .filter_map(|case| {
            let got = tokenizer.encode(&case.0, MAX_SEQUENCE_LENGTH).unwrap();
            let want = pick(case);
            (&got != want).then(|| format!("{:?}: got {got:?}, want {want:?}", case.0))
        })
        .collect()
}

#[test]
fn spiece_model_matches_slow_sentencepiece_tokenizer() {
    let tokenizer = T5Tokenizer::from_dir(&model_dir("tiny-sigma-256").join("tokenizer")).unwrap();
    let bad = mismatches(&tokenizer, |c| &c.1);
    assert!(bad.is_empty(), "{} of the cases differ from sentencepiece:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn long_prompts_are_truncated_to_299_tokens_plus_eos() {
    let tokenizer = T5Tokenizer::from_dir(&model_dir("tiny-sigma-256").join("tokenizer")).unwrap();
    let long = "dragon castle neon ".repeat(200);
    let ids = tokenizer.encode(&long, MAX_SEQUENCE_LENGTH).unwrap();
    assert_eq!(ids.len(), MAX_SEQUENCE_LENGTH);
    assert_eq!(*ids.last().unwrap(), tokenizer.eos_id());
    assert_eq!(tokenizer.encode("", MAX_SEQUENCE_LENGTH).unwrap(), vec![tokenizer.eos_id()]);
    assert!(tokenizer.encode("x", 0).is_err());
}

#[test]
fn tokenizer_json_matches_transformers_tokenizer() {
    // transformers 5 converts spiece.model to a fast tokenizer; its tokenizer.json is what a
    // folder without spiece.model would ship. It is loaded through the same public entry point.
    let tokenizer = T5Tokenizer::from_dir(&goldens_dir().join("tokenizer_json")).unwrap();
    let bad = mismatches(&tokenizer, |c| &c.2);
    assert!(bad.is_empty(), "{} of the cases differ from transformers:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn padded_ids_and_masks_equal_the_pipeline_tokenizer() {
    for model in FIXTURE_MODELS {
        let tokenizer = T5Tokenizer::from_dir(&model_dir(model).join("tokenizer")).unwrap();
        let goldens = load_goldens(&format!("{model}/t5.safetensors"));
        let prompts = load_json(&format!("{model}/t5.json"));
        let want_ids = to_u32_rows(&goldens["input_ids"]);
        let want_mask = to_u32_rows(&goldens["attention_mask"]);
        for (i, prompt) in prompts["prompts"].as_array().unwrap().iter().enumerate() {
            let padded = tokenizer.encode_padded(prompt.as_str().unwrap(), MAX_SEQUENCE_LENGTH).unwrap();
            assert_eq!(padded.ids, want_ids[i], "{model} prompt {i} ids");
            assert_eq!(padded.mask, want_mask[i], "{model} prompt {i} mask");
        }
    }
}

#[test]
fn missing_tokenizer_files_name_what_is_expected() {
    let empty = std::env::temp_dir().join(format!("pixart-empty-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = T5Tokenizer::from_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("spiece.model") && err.contains("tokenizer.json"), "{err}");
    std::fs::write(empty.join("spiece.model"), b"\x0a\xff\xff").unwrap();
    let err = T5Tokenizer::from_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("spiece.model"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
}
