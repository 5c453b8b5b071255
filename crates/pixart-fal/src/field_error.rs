//! The error of one request field, shaped like fal's (pydantic's) validation details, and fal's
//! 422 body that lists them.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What kind of problem a field has (pydantic's error kinds as fal reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A required field is absent.
    Missing,
    /// The value has the wrong JSON type.
    TypeError,
    /// The value is out of range or not one of the choices.
    ValueError,
    /// The field does not exist.
    ExtraForbidden,
    /// The body is not JSON.
    JsonInvalid,
}

impl ErrorKind {
    /// The `type` fal's 422 body gives it.
    pub fn fal_type(self) -> &'static str {
        match self {
            Self::Missing => "value_error.missing",
            Self::TypeError => "type_error",
            Self::ValueError => "value_error",
            Self::ExtraForbidden => "value_error.extra",
            Self::JsonInvalid => "value_error.jsondecode",
        }
    }
}

/// One invalid field: where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field name (`image_size.width` for nested fields; empty for the whole body).
    pub field: String,
    /// What kind of problem it is.
    pub kind: ErrorKind,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl FieldError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { field: field.into(), kind, message: message.into() }
    }

    /// A value out of range or not among the choices.
    pub fn value(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(field, ErrorKind::ValueError, message)
    }

    /// A required field that is absent.
    pub fn missing(field: impl Into<String>) -> Self {
        Self::new(field, ErrorKind::Missing, "field required")
    }

    /// One entry of fal's 422 `detail` list: `{"loc": [location, …field path], "msg", "type"}`
    /// (list indices as numbers, as pydantic gives them).
    pub fn detail(&self, location: &str) -> Value {
        let mut loc = vec![Value::from(location)];
        loc.extend(self.field.split('.').filter(|s| !s.is_empty()).map(|s| match s.parse::<u64>() {
            Ok(index) => Value::from(index),
            Err(_) => Value::from(s),
        }));
        json!({"loc": loc, "msg": self.message, "type": self.kind.fal_type()})
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

/// fal's 422 body for invalid fields found in `location` (`body`, `query`, `header`):
/// `{"detail": [{"loc": […], "msg", "type"}, …]}`.
pub fn validation_body(location: &str, errors: &[FieldError]) -> Value {
    json!({"detail": errors.iter().map(|e| e.detail(location)).collect::<Vec<_>>()})
}

/// A request that does not validate: every invalid field, each with what it allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request:{}", .0.iter().map(|e| format!("\n  - {e}")).collect::<String>())]
pub struct InvalidRequest(pub Vec<FieldError>);

impl From<Vec<FieldError>> for InvalidRequest {
    fn from(errors: Vec<FieldError>) -> Self {
        Self(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_422_body_is_fals_detail_list() {
        let errors = [
            FieldError::value("image_size.width", "must be an integer from 16 to 4096"),
            FieldError::missing("prompt"),
        ];
        let body = validation_body("body", &errors);
        assert_eq!(body["detail"][0]["loc"], json!(["body", "image_size", "width"]));
        assert_eq!(body["detail"][0]["type"], "value_error");
        assert_eq!(body["detail"][1]["type"], "value_error.missing");
        assert_eq!(
            validation_body("query", &[FieldError::value("fal_webhook", "x")])["detail"][0]["loc"],
            json!(["query", "fal_webhook"])
        );
        // Stored as records keep the kind names of pydantic.
        let stored = serde_json::to_value(&errors[1]).unwrap();
        assert_eq!(stored, json!({"field": "prompt", "kind": "missing", "message": "field required"}));
    }
}
