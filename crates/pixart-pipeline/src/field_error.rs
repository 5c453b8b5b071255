//! The error of one request field, shaped like fal's (pydantic's) validation details.

use serde::Serialize;

/// One invalid field: where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field name (`image_size.width` for nested fields; empty for the whole body).
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
    /// A machine-readable kind (`missing`, `type_error`, `value_error`, `extra_forbidden`,
    /// `json_invalid`).
    pub kind: &'static str,
}

impl FieldError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, kind: &'static str, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into(), kind }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for FieldError {}
