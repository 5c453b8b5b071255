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
