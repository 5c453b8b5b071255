//! The request's `loras` field, as fal's `fal-ai/lora` and `fal-ai/flux-lora` have it:
//! `[{"path": "URL or path", "scale": 1.0}]`.

use serde_json::{json, Map, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::FieldValue;

/// One LoRA of a request: where it is and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    /// A URL, or a path the server allows.
    pub path: String,
    /// The scale its change is applied at, from [`LoraWeight::MIN_SCALE`] to
    /// [`LoraWeight::MAX_SCALE`] (negative subtracts it); default 1.
    pub scale: f64,
}

impl LoraWeight {
    /// The lowest scale.
    pub const MIN_SCALE: f64 = -4.0;
    /// The highest scale.
    pub const MAX_SCALE: f64 = 4.0;
    /// The default scale.
    pub const DEFAULT_SCALE: f64 = 1.0;
    /// The most LoRAs in one request.
    pub const MAX_COUNT: usize = 8;

    fn scale_error(field: &str) -> FieldError {
        FieldError::value(field, format!("must be a number from {} to {}", Self::MIN_SCALE, Self::MAX_SCALE))
    }

    fn checked_scale(field: &str, scale: f64) -> Result<f64, FieldError> {
        if (Self::MIN_SCALE..=Self::MAX_SCALE).contains(&scale) {
            Ok(scale)
        } else {
            Err(Self::scale_error(field))
        }
    }

    fn from_object(field: &str, fields: &Map<String, Value>) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        if let Some(extra) = fields.keys().find(|k| *k != "path" && *k != "scale") {
            errors.push(FieldError::new(format!("{field}.{extra}"), ErrorKind::ExtraForbidden, "unknown field"));
        }
        let path = match fields.get("path") {
            None | Some(Value::Null) => Err(FieldError::missing(format!("{field}.path"))),
            Some(Value::String(path)) if !path.trim().is_empty() => Ok(path.clone()),
            Some(_) => {
                Err(FieldError::new(format!("{field}.path"), ErrorKind::TypeError, "must be a non-empty string"))
            }
        };
        let scale = match fields.get("scale") {
            None | Some(Value::Null) => Ok(Self::DEFAULT_SCALE),
            Some(value) => {
                let field = format!("{field}.scale");
                value.as_f64().ok_or_else(|| Self::scale_error(&field)).and_then(|s| Self::checked_scale(&field, s))
            }
        };
        match (path, scale) {
            (Ok(path), Ok(scale)) if errors.is_empty() => Ok(Self { path, scale }),
            (path, scale) => {
                errors.extend(path.err());
                errors.extend(scale.err());
                Err(errors)
            }
        }
    }
}

impl FieldValue for Vec<LoraWeight> {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        let Some(items) = value.as_array() else {
            return Err(FieldError::new(field, ErrorKind::TypeError, "must be a list of {\"path\", \"scale\"}"));
        };
        if items.len() > LoraWeight::MAX_COUNT {
            return Err(FieldError::value(field, format!("at most {} LoRAs", LoraWeight::MAX_COUNT)));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("{field}.{i}");
                let object = item.as_object().ok_or_else(|| {
                    FieldError::new(&at, ErrorKind::TypeError, "must be an object {\"path\", \"scale\"}")
                })?;
                // The first problem of an item (a request reports each item's first).
                LoraWeight::from_object(&at, object).map_err(|mut errors| errors.remove(0))
            })
            .collect()
    }

    /// `PATH[:SCALE]`: the text after the last `:` is the scale when it is a number (so a URL's
    /// own colons stay in the path).
    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        let (path, scale) = match text.rsplit_once(':') {
            Some((path, scale)) if scale.trim().parse::<f64>().is_ok() && !path.is_empty() => {
                let field = format!("{field}.0.scale");
                (path, LoraWeight::checked_scale(&field, scale.trim().parse::<f64>().unwrap_or(f64::NAN))?)
            }
            _ => (text, LoraWeight::DEFAULT_SCALE),
        };
        if path.trim().is_empty() {
            return Err(FieldError::new(format!("{field}.0.path"), ErrorKind::TypeError, "must be a non-empty string"));
        }
        Ok(vec![LoraWeight { path: path.to_string(), scale }])
    }

    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(|l| json!({"path": l.path, "scale": l.scale})).collect())
    }

    fn schema() -> Value {
        json!({
            "type": "array",
            "maxItems": LoraWeight::MAX_COUNT,
            "items": {
                "type": "object", "additionalProperties": false, "required": ["path"],
                "properties": {
                    "path": { "type": "string", "description": "A URL, or a file the server allows." },
                    "scale": { "type": "number", "minimum": LoraWeight::MIN_SCALE, "maximum": LoraWeight::MAX_SCALE,
                               "default": LoraWeight::DEFAULT_SCALE }
                }
            }
        })
    }

    fn allowed() -> String {
        format!(
            "up to {} `{{path, scale}}`, scale from {} to {} (default {}); `PATH[:SCALE]`, repeatable, on the command line",
            LoraWeight::MAX_COUNT,
            LoraWeight::MIN_SCALE,
            LoraWeight::MAX_SCALE,
            LoraWeight::DEFAULT_SCALE
        )
    }

    const IS_LIST: bool = true;

    fn combine(mut self, later: Self) -> Self {
        self.extend(later);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loras_parse_from_json_and_flags_with_errors_by_item() {
        let parsed =
            Vec::<LoraWeight>::from_json("loras", &json!([{"path": "a.safetensors"}, {"path": "b", "scale": -0.5}]));
        assert_eq!(
            parsed.unwrap(),
            [LoraWeight { path: "a.safetensors".into(), scale: 1.0 }, LoraWeight { path: "b".into(), scale: -0.5 }]
        );
        let error = |value: Value| Vec::<LoraWeight>::from_json("loras", &value).unwrap_err();
        assert_eq!(error(json!([{"path": "a"}, {"scale": 1}])).field, "loras.1.path");
        assert_eq!(error(json!([{"path": "a", "scale": 5}])).field, "loras.0.scale");
        assert_eq!(error(json!([{"path": "a", "weight": 1}])).field, "loras.0.weight");
        assert_eq!(error(json!("a")).kind, ErrorKind::TypeError);
        assert!(error(json!(vec![json!({"path": "a"}); 9])).message.contains("at most 8"));
        let flag = |text: &str| Vec::<LoraWeight>::from_text("loras", text);
        assert_eq!(flag("https://host/x.safetensors").unwrap()[0].path, "https://host/x.safetensors");
        assert_eq!(flag("https://host/x.safetensors:0.5").unwrap()[0].scale, 0.5);
        assert_eq!(flag("x:-1").unwrap()[0], LoraWeight { path: "x".into(), scale: -1.0 });
        assert_eq!(flag("x:9").unwrap_err().field, "loras.0.scale");
        let both = flag("a").unwrap().combine(flag("b:2").unwrap());
        assert_eq!(both.len(), 2);
    }
}
