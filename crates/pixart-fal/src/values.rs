//! The values of fal's request fields: bounded numbers ([`Steps`], [`NumImages`],
//! [`GuidanceScale`], [`Strength`], [`PagScale`]), the sampler's name ([`SchedulerKind`]), the
//! style's, perturbed-attention guidance's layer patterns ([`PagLayers`]) and the output format
//! ([`OutputFormat`]). Each checks its range on construction, so a request holds only valid
//! values.

use pixart_pipeline::{GenerationParams, Sampler};
use serde_json::{json, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::{json_integer, FieldValue};
use crate::styles::Style;

/// What every bounded field value has: its range and default as constants, a checked
/// constructor whose error names the field and the range, `get`, `Default`, `Display` and
/// `FromStr` (the flag's parser).
macro_rules! bounded_value {
    ($name:ident, $ty:ty, $kind:literal, field = $field:literal, min = $min:literal, max = $max:literal,
     default = $default:literal) => {
        impl $name {
            /// The smallest accepted value.
            pub const MIN: $ty = $min;
            /// The largest accepted value.
            pub const MAX: $ty = $max;
            /// The default.
            pub const DEFAULT: Self = Self($default);
            /// The request field this value fills.
            pub const FIELD: &'static str = $field;

            /// Checks the range (NaN is refused); the error names the field and the range.
            pub fn new(value: $ty) -> Result<Self, FieldError> {
                Self::checked(Self::FIELD, value)
            }

            fn checked(field: &str, value: $ty) -> Result<Self, FieldError> {
                if (Self::MIN..=Self::MAX).contains(&value) {
                    Ok(Self(value))
                } else {
                    Err(Self::range_error(field))
                }
            }

            fn range_error(field: &str) -> FieldError {
                FieldError::value(field, format!("must be {} from {} to {}", $kind, Self::MIN, Self::MAX))
            }

            /// The value.
            pub fn get(self) -> $ty {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::DEFAULT
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = FieldError;
            fn from_str(text: &str) -> Result<Self, FieldError> {
                Self::from_text(Self::FIELD, text)
            }
        }
    };
}

/// An integer field with an inclusive range and a default, checked on construction.
macro_rules! bounded_integer {
    ($(#[$doc:meta])* $name:ident, field = $field:literal, min = $min:literal, max = $max:literal, default = $default:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u32);

        bounded_value!($name, u32, "an integer", field = $field, min = $min, max = $max, default = $default);

        impl FieldValue for $name {
            fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
                json_integer(value)
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| Self::range_error(field))
                    .and_then(|v| Self::checked(field, v))
            }

            fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
                text.trim().parse::<u32>().map_err(|_| Self::range_error(field)).and_then(|v| Self::checked(field, v))
            }

            fn to_json(&self) -> Value {
                json!(self.0)
            }

            fn schema() -> Value {
                json!({"type": "integer", "minimum": Self::MIN, "maximum": Self::MAX})
            }

            fn allowed() -> String {
                format!("{}–{}", Self::MIN, Self::MAX)
            }
        }
    };
}

bounded_integer!(
    /// `num_inference_steps`: denoising steps.
    Steps, field = "num_inference_steps", min = 1, max = 200, default = 35
);
bounded_integer!(
    /// `num_images`: images per request, drawn as one noise batch.
    NumImages, field = "num_images", min = 1, max = 8, default = 1
);

/// A number field with an inclusive range and a default, checked on construction (NaN is
/// refused).
macro_rules! bounded_number {
    ($(#[$doc:meta])* $name:ident, field = $field:literal, min = $min:literal, max = $max:literal,
     default = $default:literal, note = $note:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
        pub struct $name(f64);

        bounded_value!($name, f64, "a number", field = $field, min = $min, max = $max, default = $default);

        impl FieldValue for $name {
            fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
                value.as_f64().ok_or_else(|| Self::range_error(field)).and_then(|v| Self::checked(field, v))
            }

            fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
                text.trim().parse::<f64>().map_err(|_| Self::range_error(field)).and_then(|v| Self::checked(field, v))
            }

            fn to_json(&self) -> Value {
                json!(self.0)
            }

            fn schema() -> Value {
                json!({"type": "number", "minimum": Self::MIN, "maximum": Self::MAX})
            }

            fn allowed() -> String {
                format!("{}–{}{}", Self::MIN, Self::MAX, $note)
            }
        }
    };
}

bounded_number!(
    /// `guidance_scale`: the classifier-free guidance scale; ≤ 1 turns guidance off.
    GuidanceScale, field = "guidance_scale", min = 0.0, max = 20.0, default = 4.5,
    note = " (≤ 1 turns classifier-free guidance off)"
);
bounded_number!(
    /// `strength`: how much of the input image is repainted (image-to-image and inpainting).
    Strength, field = "strength", min = 0.0, max = 1.0, default = 0.8,
    note = " (the run takes the last ⌊steps · strength⌋ steps)"
);
bounded_number!(
    /// `pag_scale`: the perturbed-attention guidance scale; 0 turns it off.
    PagScale, field = "pag_scale", min = 0.0, max = 20.0, default = 0.0, note = " (0 is off)"
);

/// The sampler, as fal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulerKind {
    /// DPM-Solver++ 2M, the model repo's scheduler.
    #[default]
    DpmSolver,
    /// SA-Solver as the official demo configures it.
    SaSolver,
}

impl SchedulerKind {
    /// Both samplers, the default first.
    pub const ALL: [Self; 2] = [Self::DpmSolver, Self::SaSolver];

    /// The name as fal spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::DpmSolver => "DPM-SOLVER",
            Self::SaSolver => "SA-SOLVER",
        }
    }

    /// The engine's sampler.
    pub fn sampler(self) -> Sampler {
        match self {
            Self::DpmSolver => Sampler::DpmSolver,
            Self::SaSolver => Sampler::SaSolver,
        }
    }

    fn error(field: &str) -> FieldError {
        FieldError::value(field, "must be \"DPM-SOLVER\" or \"SA-SOLVER\"")
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = FieldError;
    fn from_str(text: &str) -> Result<Self, FieldError> {
        Self::from_text("scheduler", text)
    }
}

impl FieldValue for SchedulerKind {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        Self::from_text(field, value.as_str().ok_or_else(|| Self::error(field))?)
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        Self::ALL.into_iter().find(|k| k.name() == text).ok_or_else(|| Self::error(field))
    }

    fn to_json(&self) -> Value {
        json!(self.name())
    }

    fn schema() -> Value {
        json!({"enum": Self::ALL.map(Self::name)})
    }

    fn allowed() -> String {
        Self::ALL.map(|k| format!("`{}`", k.name())).join(", ")
    }
}

impl FieldValue for Style {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        Self::from_text(field, value.as_str().ok_or_else(Style::error)?)
    }

    fn from_text(_: &str, text: &str) -> Result<Self, FieldError> {
        text.parse()
    }

    fn to_json(&self) -> Value {
        json!(self.name())
    }

    fn schema() -> Value {
        json!({"enum": Style::ALL.map(Style::name)})
    }

    fn allowed() -> String {
        Style::ALL.map(|s| format!("`{}`", s.name())).join(", ")
    }
}

/// `pag_applied_layers`: which self-attention layers perturbed-attention guidance perturbs,
/// as diffusers' `pag_applied_layers`: regular expressions searched in the layer names
/// (`transformer_blocks.{i}.attn1`). `blocks.1` is also found in `transformer_blocks.10.attn1`
/// (diffusers' rule); `blocks\.1\.` is block 1 alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagLayers(Vec<String>);

impl PagLayers {
    /// The most patterns a request may give.
    pub const MAX_PATTERNS: usize = 64;
    /// The longest pattern, in bytes.
    pub const MAX_PATTERN_BYTES: usize = 256;

    /// Checks the patterns (non-empty, at most [`Self::MAX_PATTERN_BYTES`] each, at most
    /// [`Self::MAX_PATTERNS`]); errors name `pag_applied_layers[.i]`.
    pub fn new(patterns: Vec<String>) -> Result<Self, FieldError> {
        Self::checked("pag_applied_layers", patterns)
    }

    fn checked(field: &str, patterns: Vec<String>) -> Result<Self, FieldError> {
        if patterns.len() > Self::MAX_PATTERNS {
            return Err(FieldError::value(field, format!("at most {} patterns", Self::MAX_PATTERNS)));
        }
        for (i, pattern) in patterns.iter().enumerate() {
            if pattern.is_empty() || pattern.len() > Self::MAX_PATTERN_BYTES {
                return Err(FieldError::value(
                    format!("{field}.{i}"),
                    format!("must be a non-empty pattern of at most {} bytes", Self::MAX_PATTERN_BYTES),
                ));
            }
        }
        Ok(Self(patterns))
    }

    /// The patterns.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

impl Default for PagLayers {
    fn default() -> Self {
        Self(vec![GenerationParams::DEFAULT_PAG_LAYER.to_string()])
    }
}

impl FieldValue for PagLayers {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        let Some(items) = value.as_array() else {
            return Err(FieldError::new(field, ErrorKind::TypeError, "must be a list of strings"));
        };
        let patterns = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| FieldError::new(format!("{field}.{i}"), ErrorKind::TypeError, "must be a string"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::checked(field, patterns)
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        Self::checked(field, vec![text.to_string()])
    }

    fn to_json(&self) -> Value {
        json!(self.0)
    }

    fn schema() -> Value {
        json!({"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": Self::MAX_PATTERN_BYTES},
               "maxItems": Self::MAX_PATTERNS})
    }

    fn allowed() -> String {
        "regular expressions (one per flag, repeatable)".into()
    }

    const IS_LIST: bool = true;

    fn combine(mut self, later: Self) -> Self {
        self.0.extend(later.0);
        self
    }
}

/// `output_format`: how the images are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutputFormat {
    /// Lossless PNG (the default).
    #[default]
    Png,
    /// JPEG at quality [`OutputFormat::JPEG_QUALITY`].
    Jpeg,
}

impl OutputFormat {
    /// Both formats, the default first.
    pub const ALL: [Self; 2] = [Self::Png, Self::Jpeg];
    /// The JPEG quality.
    pub const JPEG_QUALITY: u8 = 95;

    /// The name as the request spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
        }
    }

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
        }
    }

    fn error(field: &str) -> FieldError {
        FieldError::value(field, "must be \"png\" or \"jpeg\"")
    }
}

impl FieldValue for OutputFormat {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        Self::from_text(field, value.as_str().ok_or_else(|| Self::error(field))?)
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        Self::ALL.into_iter().find(|k| k.name() == text).ok_or_else(|| Self::error(field))
    }

    fn to_json(&self) -> Value {
        json!(self.name())
    }

    fn schema() -> Value {
        json!({"enum": Self::ALL.map(Self::name)})
    }

    fn allowed() -> String {
        Self::ALL.map(|k| format!("`{}`", k.name())).join(", ")
    }
}
