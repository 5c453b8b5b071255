//! `image_url` and `mask_url`: where an input picture comes from. The request holds the text;
//! whoever runs it fetches it with its own rules (see the server's and the command line's image
//! sources) and decodes it with [`crate::decode_image`].

use serde_json::{json, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::FieldValue;

/// An http(s) URL, a `data:` URI, a URL of the server's own `/files/`, or (on the command line)
/// a local path. At most [`ImageUrl::MAX_BYTES`] long (a data URI carries the file).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageUrl(String);

impl ImageUrl {
    /// The longest accepted text, in bytes (a `data:` URI of a 48 MiB file).
    pub const MAX_BYTES: usize = 64 << 20;

    /// Checks the text (non-empty, not too long); the error names `field`.
    pub fn new(field: &str, text: impl Into<String>) -> Result<Self, FieldError> {
        let text = text.into();
        if text.trim().is_empty() {
            return Err(FieldError::value(field, "must be a URL, a data: URI or a path, not empty"));
        }
        if text.len() > Self::MAX_BYTES {
            return Err(FieldError::value(field, format!("is longer than {} bytes", Self::MAX_BYTES)));
        }
        Ok(Self(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ImageUrl {
    /// The text, a `data:` URI shortened to its head.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.split_once(',') {
            Some((head, _)) if self.0.starts_with("data:") => write!(f, "{head},…"),
            _ => f.write_str(&self.0),
        }
    }
}

/// Absent (`null`) means no input picture.
impl FieldValue for Option<ImageUrl> {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        match value {
            Value::Null => Ok(None),
            Value::String(text) => ImageUrl::new(field, text.as_str()).map(Some),
            _ => Err(FieldError::new(field, ErrorKind::TypeError, "must be a string (a URL)")),
        }
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        ImageUrl::new(field, text).map(Some)
    }

    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, |url| json!(url.0))
    }

    fn schema() -> Value {
        json!({"type": ["string", "null"], "maxLength": ImageUrl::MAX_BYTES})
    }

    fn allowed() -> String {
        "an http(s) URL, a `data:` URI, or a path (command line)".into()
    }
}
