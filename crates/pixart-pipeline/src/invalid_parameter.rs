//! The refusal of a generation parameter, naming it.

/// A parameter this model cannot run with: which ([`crate::GenerationParams`]' field name, or `width` /
/// `height` for one side of [`crate::GenerationParams::size`]) and what it allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct InvalidParameter {
    /// The parameter: `prompt`, `negative_prompt`, `size`, `width`, `height`, `steps`,
    /// `guidance_scale`, `num_images`, `safety_check`, `loras[i]`, `image`, `strength`, `mask`,
    /// `pag_scale` or `pag_applied_layers[i]`.
    pub parameter: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl InvalidParameter {
    /// An error naming `parameter`.
    pub fn new(parameter: impl Into<String>, message: impl Into<String>) -> Self {
        Self { parameter: parameter.into(), message: message.into() }
    }
}
