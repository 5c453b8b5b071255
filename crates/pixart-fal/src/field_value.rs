//! [`FieldValue`]: how a request field's type is read from JSON and from a command-line flag,
//! written back to JSON, and described in the JSON Schema and the docs. Every request field's
//! type implements it, so the field table in [`crate::request`] needs nothing else per field.

use serde_json::{json, Value};

use crate::field_error::{ErrorKind, FieldError};

/// A type one request field holds.
pub trait FieldValue: Sized {
    /// Reads the field's JSON value; errors name `field`.
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError>;
    /// Reads a flag's text (`--steps 20`); errors name `field`, with the same messages as JSON.
    fn from_text(field: &str, text: &str) -> Result<Self, FieldError>;
    /// The value as JSON (what [`FieldValue::from_json`] reads back).
    fn to_json(&self) -> Value;
    /// The JSON Schema of the value (type, range, choices), without default or description.
    fn schema() -> Value;
    /// What is allowed, in words, for help texts and docs (`an integer from 1 to 200`).
    fn allowed() -> String;
    /// Whether a flag of this type may be given without a value, meaning `true`.
    const IS_SWITCH: bool = false;
    /// Whether its flag may be repeated, each value adding to the list.
    const IS_LIST: bool = false;
    /// The value after a flag set it again: the later one, or both for a list.
    fn combine(self, later: Self) -> Self {
        later
    }
}

impl FieldValue for String {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        value
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| FieldError::new(field, ErrorKind::TypeError, "must be a string"))
    }

    fn from_text(_: &str, text: &str) -> Result<Self, FieldError> {
        Ok(text.to_string())
    }

    fn to_json(&self) -> Value {
        json!(self)
    }

    fn schema() -> Value {
        json!({"type": "string"})
    }

    fn allowed() -> String {
        "any string".into()
    }
}

fn boolean_error(field: &str) -> FieldError {
    FieldError::new(field, ErrorKind::TypeError, "must be true or false")
}

/// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off` on the command line.
fn boolean_text(field: &str, text: &str) -> Result<bool, FieldError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(boolean_error(field)),
    }
}

impl FieldValue for bool {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        value.as_bool().ok_or_else(|| boolean_error(field))
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        boolean_text(field, text)
    }

    fn to_json(&self) -> Value {
        json!(self)
    }

    fn schema() -> Value {
        json!({"type": "boolean"})
    }

    fn allowed() -> String {
        "true or false".into()
    }

    const IS_SWITCH: bool = true;
}

/// A switch whose absence means something of its own (left to the server's setup); `null` is
/// refused as for a plain switch.
impl FieldValue for Option<bool> {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        bool::from_json(field, value).map(Some)
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        bool::from_text(field, text).map(Some)
    }

    fn to_json(&self) -> Value {
        json!(self)
    }

    fn schema() -> Value {
        bool::schema()
    }

    fn allowed() -> String {
        bool::allowed()
    }

    const IS_SWITCH: bool = true;
}

/// A seed: an integer from 0 to 2⁶⁴−1, or `null` for a random one.
impl FieldValue for Option<u64> {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        match value {
            Value::Null => Ok(None),
            _ => value.as_u64().map(Some).ok_or_else(|| seed_error(field)),
        }
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        text.trim().parse::<u64>().map(Some).map_err(|_| seed_error(field))
    }

    fn to_json(&self) -> Value {
        json!(self)
    }

    fn schema() -> Value {
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX})
    }

    fn allowed() -> String {
        "0 – 2⁶⁴−1".into()
    }
}

fn seed_error(field: &str) -> FieldError {
    FieldError::value(field, format!("must be an integer from 0 to {}", u64::MAX))
}

/// A JSON integer, also written as a float with no fraction (`20.0`), as pydantic accepts.
pub(crate) fn json_integer(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19).map(|f| f as u64))
}
