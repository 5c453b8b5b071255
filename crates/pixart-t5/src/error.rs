//! The error types of this crate.

use std::path::PathBuf;

/// What is wrong with the bytes of a `spiece.model` (sentencepiece's `ModelProto`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpieceError {
    /// The protobuf ends in the middle of a field, or is not a protobuf at all.
    #[error("truncated, or not a sentencepiece model")]
    Truncated,
    /// A vocabulary piece is not valid UTF-8.
    #[error("a vocabulary piece is not UTF-8")]
    PieceNotUtf8,
    /// A vocabulary piece has a type outside sentencepiece's 1–6.
    #[error("a vocabulary piece has the unknown type {0} (known: 1 to 6)")]
    UnknownPieceType(u64),
    /// The model has no vocabulary.
    #[error("no vocabulary pieces")]
    NoPieces,
    /// The normalizer's precompiled charsmap is malformed.
    #[error("an invalid precompiled charsmap")]
    InvalidCharsmap,
    /// The model is not a Unigram model.
    #[error("model_type {0}, but T5 uses a Unigram model (1)")]
    NotUnigram(i32),
    /// A required special piece is absent.
    #[error("no {what} piece (id {id})")]
    MissingPiece {
        /// Which piece (`unknown`, `end-of-sequence`, `padding`).
        what: &'static str,
        /// The id the trainer spec names.
        id: i32,
    },
}

/// What is wrong with a GGUF text encoder file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The header or a tensor could not be read (truncated, not GGUF, unknown type…).
    #[error("{}{source}", .tensor.as_ref().map(|t| format!("tensor {t}: ")).unwrap_or_default())]
    Read {
        /// The tensor being read, if the header was read already.
        tensor: Option<String>,
        /// What candle reported.
        source: candle_core::Error,
    },
    /// The header's `general.alignment` is 0.
    #[error("general.alignment is 0 (must be a positive power of two)")]
    Alignment,
    /// A tensor the encoder needs is not in the file under either naming scheme.
    #[error("no tensor {name}{}", .llama_cpp_name.as_ref().map(|n| format!(" (or {n})")).unwrap_or_default())]
    MissingTensor {
        /// The transformers name.
        name: String,
        /// llama.cpp's name for it, also looked for.
        llama_cpp_name: Option<String>,
    },
    /// A tensor's shape is not what the text encoder's config.json implies.
    #[error("tensor {name} has shape {found:?}, expected {expected:?} (from the text encoder's config.json)")]
    Shape {
        /// The stored name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A quantized tensor whose rows do not fill whole blocks of its type.
    #[error("tensor {name} has rows of {width} weights, not a multiple of its {ggml_type} blocks of {block}")]
    Blocks {
        /// The stored name.
        name: String,
        /// Weights per row.
        width: usize,
        /// The storage type.
        ggml_type: &'static str,
        /// Weights per block.
        block: usize,
    },
    /// A storage type that is not meant for weights.
    #[error("tensor {name} is stored as {ggml_type}; allowed: f32, f16, bf16, q8_0, q6k, q5k, q4k (and q4_0, q4_1, q5_0, q5_1, q2k, q3k)")]
    UnsupportedType {
        /// The stored name.
        name: String,
        /// The type.
        ggml_type: &'static str,
    },
}

/// Errors from loading or running the T5 tokenizer and encoder.
#[derive(Debug, thiserror::Error)]
pub enum T5Error {
    /// A weights or config file is missing, unreadable or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The tokenizer folder has neither tokenizer file.
    #[error("no tokenizer in {dir}: expected spiece.model or tokenizer.json")]
    NoTokenizer {
        /// The folder searched.
        dir: PathBuf,
    },
    /// A `spiece.model` could not be used.
    #[error("{}: {source}", .path.as_ref().map_or("spiece.model".into(), |p| p.display().to_string()))]
    Spiece {
        /// The file, when the model was read from one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        source: SpieceError,
    },
    /// The `tokenizers` library failed to load a `tokenizer.json` or to encode with it.
    #[error("{context}: {source}")]
    Tokenizers {
        /// What was being done (naming the file when one was read).
        context: String,
        /// The library's error.
        source: tokenizers::Error,
    },
    /// A GGUF text encoder file could not be used.
    #[error("GGUF text encoder {path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (boxed: candle's error is large).
        source: Box<GgufError>,
    },
    /// The checkpoint's config asks for something this implementation does not do.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// Input ids or mask of the wrong shape or content.
    #[error("invalid input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<SpieceError> for T5Error {
    fn from(source: SpieceError) -> Self {
        Self::Spiece { path: None, source }
    }
}
