//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), shared with `tests/fuzz_corpus.rs`,
//! which replays the committed corpus through them on every test run. Each checks properties that
//! must hold for any input, and panics (the fuzzer's signal) when one does not.

use std::sync::OnceLock;

use pixart_fal::{ErrorKind, GenerateRequest, PartialRequest, FIELDS};
use pixart_pipeline::sizes::AspectRatioBins;
use pixart_pipeline::SizePlan;
use pixart_t5::spiece::SentencePieceModel;
use pixart_t5::{T5Tokenizer, MAX_SEQUENCE_LENGTH};

/// Request JSON → typed request. Never panics; a request that parses serialises to JSON that
/// parses back to the same request; every error names its field and says what is allowed; the
/// size plan of an accepted request has the requested output size on every bin table.
pub fn request_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match GenerateRequest::from_json(text) {
        Ok(request) => {
            let json = serde_json::to_string(&request).expect("a request serialises");
            assert_eq!(GenerateRequest::from_json(&json).as_ref(), Ok(&request), "round trip of {json}");
            let size = request.to_params().size;
            for bins in [32, 64, 128, 256, 0].map(AspectRatioBins::for_sample_size) {
                let plan = SizePlan::new(size, bins, 16);
                assert_eq!(plan.output, size);
                assert!(plan.resized.width >= size.width() && plan.resized.height >= size.height());
                assert!(plan.crop_offset.width + size.width() <= plan.resized.width);
                assert!(plan.crop_offset.height + size.height() <= plan.resized.height);
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in &errors {
                assert!(!error.message.is_empty(), "{error:?}");
                // Only a body that is not JSON, or not an object, has no field to name (and an
                // unknown field whose name is the empty string).
                let whole_body = error.kind == ErrorKind::JsonInvalid || error.message.contains("JSON object");
                assert!(!error.field.is_empty() || whole_body || error.kind == ErrorKind::ExtraForbidden, "{error:?}");
            }
        }
    }
    let _ = PartialRequest::from_json(text);
    // The command line's parser of every field, on the same text.
    for field in FIELDS {
        let _ = PartialRequest::default().set_text(field.name, text);
    }
}

fn fixture_tokenizer() -> &'static T5Tokenizer {
    static TOKENIZER: OnceLock<T5Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = crate::model_dir("tiny-sigma-256").join("tokenizer");
        T5Tokenizer::from_dir(&dir).expect("the fixture tokenizer loads")
    })
}

/// Arbitrary text through the fixture's `spiece.model` tokenizer and through caption cleaning.
/// Encoding always succeeds with at most 300 ids, `</s>` last, every id inside the vocabulary;
/// cleaning returns a caption or an error, never panics.
pub fn tokenizer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let tokenizer = fixture_tokenizer();
    for max_length in [1, 7, MAX_SEQUENCE_LENGTH] {
        let ids = tokenizer.encode(&text, max_length).expect("any text encodes");
        assert!(!ids.is_empty() && ids.len() <= max_length);
        assert_eq!(ids.last(), Some(&tokenizer.eos_id()));
        assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()), "{ids:?}");
    }
    let padded = tokenizer.encode_padded(&text, 16).expect("any text encodes");
    assert_eq!((padded.ids.len(), padded.mask.len()), (16, 16));
    let _ = pixart_pipeline::caption::clean_caption(&text);
}

/// Arbitrary bytes as a `spiece.model`: parsing fails cleanly or gives a model; a model either
/// builds a tokenizer or fails cleanly; a tokenizer encodes text with ids inside its vocabulary.
pub fn spiece_model(data: &[u8]) {
    let Ok(model) = SentencePieceModel::parse(data) else { return };
    let Ok(tokenizer) = T5Tokenizer::from_sentencepiece(&model, 3) else { return };
    let tail = String::from_utf8_lossy(&data[data.len().saturating_sub(64)..]).into_owned();
    for text in ["a test", " </s> <extra_id_0> x", "", tail.as_str()] {
        if let Ok(ids) = tokenizer.encode(text, 32) {
            assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()), "{ids:?}");
        }
    }
}

/// Arbitrary bytes as a GGUF text encoder for the tiny fixture's config: loading fails with an
/// error or gives an encoder; an encoder encodes a short input to `[1, L, d_model]`. Never panics.
pub fn gguf(data: &[u8]) {
    use candle_core::{DType, Device, Tensor};
    use pixart_t5::{T5Config, T5Encoder, T5LoadOptions, T5WeightsFile};
    static CONFIG: OnceLock<T5Config> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        T5Config::load(&crate::model_dir("tiny-sigma-256").join("text_encoder/config.json")).expect("fixture config")
    });
    let path = std::env::temp_dir().join(format!(
        "pixart-fuzz-gguf-{}-{:?}.gguf",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, data).expect("temp file");
    let options = T5LoadOptions { dtype: DType::F32, device: Device::Cpu, quant: None, cpu_repack: false };
    let loaded = T5Encoder::load_weights(config, &T5WeightsFile::Gguf(path.clone()), &options);
    let _ = std::fs::remove_file(&path);
    let Ok(encoder) = loaded else { return };
    let ids = Tensor::new(&[[5u32, 9, 1]], &Device::Cpu).expect("ids");
    let out = encoder.forward(&ids, None).expect("a loaded encoder encodes");
    assert_eq!(out.dims(), [1, 3, config.d_model]);
}
