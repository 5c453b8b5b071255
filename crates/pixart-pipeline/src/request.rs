//! fal's `fal-ai/pixart-sigma` input schema, with validation that names the field at fault.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sizes;
use crate::styles::Style;

/// Largest accepted `num_inference_steps`.
pub const MAX_STEPS: u32 = 200;
/// Largest accepted `num_images`.
pub const MAX_IMAGES: u32 = 8;
/// Accepted range of each side of a custom `image_size`, in pixels.
pub const SIZE_RANGE: (u32, u32) = (16, 4096);
/// Accepted range of `guidance_scale`.
pub const GUIDANCE_RANGE: (f64, f64) = (0.0, 20.0);

/// The sampler, as fal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SchedulerKind {
    /// DPM-Solver++ 2M, the model repo's scheduler.
    #[default]
    #[serde(rename = "DPM-SOLVER")]
    DpmSolver,
    /// SA-Solver as the official demo configures it.
    #[serde(rename = "SA-SOLVER")]
    SaSolver,
}

/// `image_size`: a preset name or explicit dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageSize {
    /// One of [`sizes::PRESETS`].
    Preset(String),
    /// Explicit pixels.
    Custom {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

impl Default for ImageSize {
    fn default() -> Self {
        Self::Preset("square_hd".into())
    }
}

impl ImageSize {
    /// `(width, height)` in pixels, if the preset exists.
    pub fn dimensions(&self) -> Option<(u32, u32)> {
        match self {
            Self::Preset(name) => sizes::preset(name),
            Self::Custom { width, height } => Some((*width, *height)),
        }
    }
}

/// A generation request: every field of fal's input schema, with fal's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The prompt (required).
    pub prompt: String,
    /// What to steer away from.
    #[serde(default)]
    pub negative_prompt: String,
    /// One of the style names in [`crate::styles::STYLES`].
    #[serde(default = "default_style")]
    pub style: String,
    /// Output size.
    #[serde(default)]
    pub image_size: ImageSize,
    /// Denoising steps (default 35).
    #[serde(default = "default_steps")]
    pub num_inference_steps: u32,
    /// Sampler (default DPM-Solver++).
    #[serde(default)]
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale (default 4.5); ≤ 1 turns guidance off.
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Seed of the CPU generator; random when absent (and returned in the response).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Return images inline as data URIs instead of stored files.
    #[serde(default)]
    pub sync_mode: bool,
    /// Number of images, drawn as one noise batch (default 1).
    #[serde(default = "default_images")]
    pub num_images: u32,
    /// Accepted for compatibility. No safety checker runs yet: `has_nsfw_concepts` is all false.
    #[serde(default = "default_true")]
    pub enable_safety_checker: bool,
}

fn default_style() -> String {
    "(No style)".into()
}
fn default_steps() -> u32 {
    35
}
fn default_guidance() -> f64 {
    4.5
}
fn default_images() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

/// One invalid field: where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field name (`image_size.width` for nested fields; empty for the whole body).
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
    /// A machine-readable kind (`missing`, `type_error`, `value_error`, `extra_forbidden`).
    pub kind: &'static str,
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

fn err(field: &str, kind: &'static str, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into(), kind }
}

impl GenerateRequest {
    /// A request with the given prompt and every other field at its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            style: default_style(),
            image_size: ImageSize::default(),
            num_inference_steps: default_steps(),
            scheduler: SchedulerKind::default(),
            guidance_scale: default_guidance(),
            seed: None,
            sync_mode: false,
            num_images: default_images(),
            enable_safety_checker: true,
        }
    }

    /// Parses JSON text; every problem is reported with the field it concerns.
    pub fn from_json(text: &str) -> Result<Self, Vec<FieldError>> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| vec![err("", "json_invalid", format!("malformed JSON: {e}"))])?;
        Self::from_value(&value)
    }

    /// Checks a JSON value field by field (types, ranges, unknown fields) and builds the request.
    pub fn from_value(value: &Value) -> Result<Self, Vec<FieldError>> {
        let Some(object) = value.as_object() else {
            return Err(vec![err("", "type_error", "the request must be a JSON object")]);
        };
        let mut errors = Vec::new();
        let mut request = Self::new("");
        match object.get("prompt") {
            None | Some(Value::Null) => errors.push(err("prompt", "missing", "field required")),
            Some(Value::String(s)) => request.prompt = s.clone(),
            Some(_) => errors.push(err("prompt", "type_error", "must be a string")),
        }
        for (key, value) in object {
            match key.as_str() {
                "prompt" => {}
                "negative_prompt" => match value {
                    Value::String(s) => request.negative_prompt = s.clone(),
                    _ => errors.push(err(key, "type_error", "must be a string")),
                },
                "style" => match value.as_str() {
                    Some(s) if Style::by_name(s).is_some() => request.style = s.to_string(),
                    _ => errors.push(err(key, "value_error", format!("must be one of {}", Style::names()))),
                },
                "image_size" => match parse_image_size(value) {
                    Ok(size) => request.image_size = size,
                    Err(e) => errors.push(e),
                },
                "num_inference_steps" => match int_in(value, 1, MAX_STEPS) {
                    Some(v) => request.num_inference_steps = v,
                    None => errors.push(err(key, "value_error", format!("must be an integer from 1 to {MAX_STEPS}"))),
                },
                "scheduler" => match value.as_str() {
                    Some("DPM-SOLVER") => request.scheduler = SchedulerKind::DpmSolver,
                    Some("SA-SOLVER") => request.scheduler = SchedulerKind::SaSolver,
                    _ => errors.push(err(key, "value_error", "must be \"DPM-SOLVER\" or \"SA-SOLVER\"")),
                },
                "guidance_scale" => {
                    match value.as_f64().filter(|g| (GUIDANCE_RANGE.0..=GUIDANCE_RANGE.1).contains(g)) {
                        Some(g) => request.guidance_scale = g,
                        None => errors.push(err(
                            key,
                            "value_error",
                            format!("must be a number from {} to {}", GUIDANCE_RANGE.0, GUIDANCE_RANGE.1),
                        )),
                    }
                }
                "seed" => match value {
                    Value::Null => request.seed = None,
                    _ => match value.as_u64() {
                        Some(s) => request.seed = Some(s),
                        None => {
                            errors.push(err(key, "value_error", "must be an integer from 0 to 18446744073709551615"))
                        }
                    },
                },
                "sync_mode" | "enable_safety_checker" => match value.as_bool() {
                    Some(b) if key == "sync_mode" => request.sync_mode = b,
                    Some(b) => request.enable_safety_checker = b,
                    None => errors.push(err(key, "type_error", "must be true or false")),
                },
                "num_images" => match int_in(value, 1, MAX_IMAGES) {
                    Some(v) => request.num_images = v,
                    None => errors.push(err(key, "value_error", format!("must be an integer from 1 to {MAX_IMAGES}"))),
                },
                _ => errors.push(err(key, "extra_forbidden", "unknown field")),
            }
        }
        if errors.is_empty() {
            Ok(request)
        } else {
            Err(errors)
        }
    }

    /// Re-checks a request built in code (the same rules as [`Self::from_value`]).
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let value = serde_json::to_value(self).expect("a request serialises");
        Self::from_value(&value).map(|_| ())
    }

    /// The style preset named by [`Self::style`].
    pub fn style_preset(&self) -> Option<&'static Style> {
        Style::by_name(&self.style)
    }
}

fn int_in(value: &Value, lo: u32, hi: u32) -> Option<u32> {
    let v = value.as_u64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))?;
    u32::try_from(v).ok().filter(|v| (lo..=hi).contains(v))
}

fn parse_image_size(value: &Value) -> Result<ImageSize, FieldError> {
    match value {
        Value::String(name) if sizes::preset(name).is_some() => Ok(ImageSize::Preset(name.clone())),
        Value::String(_) => Err(err(
            "image_size",
            "value_error",
            format!("must be one of {} or an object {{\"width\", \"height\"}}", sizes::preset_names()),
        )),
        Value::Object(fields) => {
            if let Some(extra) = fields.keys().find(|k| *k != "width" && *k != "height") {
                return Err(err(&format!("image_size.{extra}"), "extra_forbidden", "unknown field"));
            }
            let side = |name: &str| {
                fields.get(name).and_then(|v| int_in(v, SIZE_RANGE.0, SIZE_RANGE.1)).ok_or_else(|| {
                    err(
                        &format!("image_size.{name}"),
                        "value_error",
                        format!("must be an integer from {} to {}", SIZE_RANGE.0, SIZE_RANGE.1),
                    )
                })
            };
            Ok(ImageSize::Custom { width: side("width")?, height: side("height")? })
        }
        _ => Err(err("image_size", "type_error", "must be a preset name or an object {\"width\", \"height\"}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_fals() {
        let r = GenerateRequest::from_json(r#"{"prompt": "a cat"}"#).unwrap();
        assert_eq!(r, GenerateRequest::new("a cat"));
        assert_eq!(r.num_inference_steps, 35);
        assert_eq!(r.guidance_scale, 4.5);
        assert_eq!(r.image_size.dimensions(), Some((1024, 1024)));
        assert_eq!(r.style, "(No style)");
        assert_eq!(r.num_images, 1);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = GenerateRequest::from_json(
            r#"{"num_inference_steps": 0, "image_size": {"width": -5, "height": 64}, "style": "Nope",
                "scheduler": "EULER", "num_images": 1000, "guidance_scale": "high", "extra": 1, "seed": -1}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "prompt",
            "num_inference_steps",
            "image_size.width",
            "style",
            "scheduler",
            "num_images",
            "guidance_scale",
            "extra",
            "seed",
        ] {
            assert!(fields.contains(&f), "{f} not reported: {errors:?}");
        }
        let steps = errors.iter().find(|e| e.field == "num_inference_steps").unwrap();
        assert!(steps.message.contains("1 to 200"), "{steps}");
        assert!(GenerateRequest::from_json("{not json").unwrap_err()[0].message.contains("malformed JSON"));
        assert!(GenerateRequest::from_json(r#"{"prompt": "x", "image_size": "huge"}"#).unwrap_err()[0]
            .message
            .contains("square_hd"));
    }
}
