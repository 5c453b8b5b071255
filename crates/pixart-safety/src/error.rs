//! Errors of the safety checker.

/// Errors from loading or running the safety checker.
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    /// A config or weights file is missing, unreadable or corrupt.
    #[error(transparent)]
    Weights(#[from] pixart_core::WeightsError),
    /// The checker's config asks for something this implementation does not do.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// The classifier has no label named `nsfw` (case-insensitive) in its `id2label`.
    #[error("{path}: no label named \"nsfw\" in id2label (labels: {labels})")]
    NoNsfwLabel {
        /// The config file.
        path: std::path::PathBuf,
        /// The labels it has.
        labels: String,
    },
    /// An image of the wrong size for its pixel buffer, or of zero size.
    #[error("invalid image: {0}")]
    Image(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
