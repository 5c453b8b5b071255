//! The error type of this crate.

/// Errors from loading or running the T5 tokenizer and encoder.
#[derive(Debug, thiserror::Error)]
pub enum T5Error {
    /// A weights or config file is missing, unreadable or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The tokenizer files are missing or unusable.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The checkpoint's config asks for something this implementation does not do.
    #[error("text_encoder config: {0}")]
    Unsupported(String),
    /// Input ids or mask of the wrong shape or content.
    #[error("invalid input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
