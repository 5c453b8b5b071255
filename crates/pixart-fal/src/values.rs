//! The values of fal's request fields: bounded numbers ([`Steps`], [`NumImages`],
//! [`GuidanceScale`]), the sampler's name ([`SchedulerKind`]) and the size ([`ImageSize`], a
//! [`SizePreset`] or explicit [`Dimensions`]). Each checks its range on construction, so a
//! request holds only valid values.

use pixart_pipeline::{Dimensions, Sampler};
use serde_json::{json, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::{json_integer, FieldValue};
use crate::styles::Style;

/// An integer field with an inclusive range and a default, checked on construction.
macro_rules! bounded_integer {
    ($(#[$doc:meta])* $name:ident, field = $field:literal, min = $min:literal, max = $max:literal, default = $default:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u32);

        impl $name {
            /// The smallest accepted value.
            pub const MIN: u32 = $min;
            /// The largest accepted value.
            pub const MAX: u32 = $max;
            /// fal's default.
            pub const DEFAULT: Self = Self($default);
            /// The request field this value fills.
            pub const FIELD: &'static str = $field;

            /// Checks the range; the error names the field and the range.
            pub fn new(value: u32) -> Result<Self, FieldError> {
                if (Self::MIN..=Self::MAX).contains(&value) {
                    Ok(Self(value))
                } else {
                    Err(Self::range_error(Self::FIELD))
                }
            }

            fn range_error(field: &str) -> FieldError {
                FieldError::value(field, format!("must be an integer from {} to {}", Self::MIN, Self::MAX))
            }

            /// The value.
            pub fn get(self) -> u32 {
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

        impl FieldValue for $name {
            fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
                json_integer(value)
                    .and_then(|v| u32::try_from(v).ok())
                    .filter(|v| (Self::MIN..=Self::MAX).contains(v))
                    .map(Self)
                    .ok_or_else(|| Self::range_error(field))
            }

            fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
                text.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|v| (Self::MIN..=Self::MAX).contains(v))
                    .map(Self)
                    .ok_or_else(|| Self::range_error(field))
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

/// `guidance_scale`: the classifier-free guidance scale; ≤ 1 turns guidance off.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct GuidanceScale(f64);

impl GuidanceScale {
    /// The smallest accepted value.
    pub const MIN: f64 = 0.0;
    /// The largest accepted value.
    pub const MAX: f64 = 20.0;
    /// fal's default.
    pub const DEFAULT: Self = Self(4.5);
    /// The request field this value fills.
    pub const FIELD: &'static str = "guidance_scale";

    /// Checks the range (NaN is refused); the error names the field and the range.
    pub fn new(value: f64) -> Result<Self, FieldError> {
        Self::checked(Self::FIELD, value)
    }

    fn checked(field: &str, value: f64) -> Result<Self, FieldError> {
        if (Self::MIN..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Self::range_error(field))
        }
    }

    fn range_error(field: &str) -> FieldError {
        FieldError::value(field, format!("must be a number from {} to {}", Self::MIN, Self::MAX))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for GuidanceScale {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for GuidanceScale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for GuidanceScale {
    type Err = FieldError;
    fn from_str(text: &str) -> Result<Self, FieldError> {
        Self::from_text(Self::FIELD, text)
    }
}

impl FieldValue for GuidanceScale {
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
        format!("{}–{} (≤ 1 turns classifier-free guidance off)", Self::MIN, Self::MAX)
    }
}

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

/// fal's size presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SizePreset {
    /// 1024×1024 (the default).
    #[default]
    SquareHd,
    /// 512×512.
    Square,
    /// 768×1024.
    Portrait4x3,
    /// 576×1024.
    Portrait16x9,
    /// 1024×768.
    Landscape4x3,
    /// 1024×576.
    Landscape16x9,
}

impl SizePreset {
    /// Every preset, in fal's order.
    pub const ALL: [Self; 6] =
        [Self::SquareHd, Self::Square, Self::Portrait4x3, Self::Portrait16x9, Self::Landscape4x3, Self::Landscape16x9];

    /// The name as fal spells it (`square_hd`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::SquareHd => "square_hd",
            Self::Square => "square",
            Self::Portrait4x3 => "portrait_4_3",
            Self::Portrait16x9 => "portrait_16_9",
            Self::Landscape4x3 => "landscape_4_3",
            Self::Landscape16x9 => "landscape_16_9",
        }
    }

    /// The preset's pixel size.
    pub fn dimensions(self) -> Dimensions {
        let (width, height) = match self {
            Self::SquareHd => (1024, 1024),
            Self::Square => (512, 512),
            Self::Portrait4x3 => (768, 1024),
            Self::Portrait16x9 => (576, 1024),
            Self::Landscape4x3 => (1024, 768),
            Self::Landscape16x9 => (1024, 576),
        };
        // Every preset is within the engine's range.
        Dimensions::new(width, height).unwrap_or(Dimensions::DEFAULT)
    }

    /// Looks a preset up by its exact name.
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The preset names, for error messages and help.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

/// `image_size`: a preset or explicit dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSize {
    /// One of fal's presets.
    Preset(SizePreset),
    /// Explicit pixels.
    Custom(Dimensions),
}

impl Default for ImageSize {
    fn default() -> Self {
        Self::Preset(SizePreset::default())
    }
}

impl ImageSize {
    /// The size in pixels.
    pub fn dimensions(self) -> Dimensions {
        match self {
            Self::Preset(preset) => preset.dimensions(),
            Self::Custom(dimensions) => dimensions,
        }
    }

    /// Explicit dimensions; the error names `image_size.width` or `image_size.height`.
    pub fn custom(width: u32, height: u32) -> Result<Self, FieldError> {
        Dimensions::new(width, height).map(Self::Custom).map_err(FieldError::from)
    }

    fn side_error(field: &str, side: &str) -> FieldError {
        FieldError::value(format!("{field}.{side}"), Dimensions::range())
    }

    fn preset_error(field: &str) -> FieldError {
        FieldError::value(
            field,
            format!("must be one of {} or an object {{\"width\", \"height\"}}", SizePreset::names()),
        )
    }
}

impl std::fmt::Display for ImageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Preset(preset) => f.write_str(preset.name()),
            Self::Custom(d) => write!(f, "{d}"),
        }
    }
}

impl std::str::FromStr for ImageSize {
    type Err = FieldError;
    /// `WIDTHxHEIGHT` (e.g. `768x512`) or a preset name.
    fn from_str(text: &str) -> Result<Self, FieldError> {
        Self::from_text("image_size", text)
    }
}

impl FieldValue for ImageSize {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        match value {
            Value::String(name) => SizePreset::by_name(name).map(Self::Preset).ok_or_else(|| Self::preset_error(field)),
            Value::Object(fields) => {
                if let Some(extra) = fields.keys().find(|k| *k != "width" && *k != "height") {
                    return Err(FieldError::new(
                        format!("{field}.{extra}"),
                        ErrorKind::ExtraForbidden,
                        "unknown field",
                    ));
                }
                let side = |name: &str| {
                    fields
                        .get(name)
                        .and_then(json_integer)
                        .and_then(|v| u32::try_from(v).ok())
                        .filter(|v| (Dimensions::MIN..=Dimensions::MAX).contains(v))
                        .ok_or_else(|| Self::side_error(field, name))
                };
                Ok(Self::Custom(Dimensions::new(side("width")?, side("height")?)?))
            }
            _ => Err(FieldError::new(
                field,
                ErrorKind::TypeError,
                "must be a preset name or an object {\"width\", \"height\"}",
            )),
        }
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        let text = text.trim();
        match text.split_once(['x', 'X']) {
            Some((w, h)) if SizePreset::by_name(text).is_none() => {
                let side = |s: &str, name: &str| {
                    s.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|v| (Dimensions::MIN..=Dimensions::MAX).contains(v))
                        .ok_or_else(|| Self::side_error(field, name))
                };
                Ok(Self::Custom(Dimensions::new(side(w, "width")?, side(h, "height")?)?))
            }
            _ => SizePreset::by_name(text).map(Self::Preset).ok_or_else(|| Self::preset_error(field)),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Preset(preset) => json!(preset.name()),
            Self::Custom(d) => json!({ "width": d.width(), "height": d.height() }),
        }
    }

    fn schema() -> Value {
        json!({
            "anyOf": [
                { "enum": SizePreset::ALL.map(SizePreset::name) },
                { "type": "object", "additionalProperties": false, "required": ["width", "height"],
                  "properties": {
                      "width": { "type": "integer", "minimum": Dimensions::MIN, "maximum": Dimensions::MAX },
                      "height": { "type": "integer", "minimum": Dimensions::MIN, "maximum": Dimensions::MAX } } }
            ]
        })
    }

    fn allowed() -> String {
        format!(
            "{}, or `{{width, height}}` with each side {}–{} (`WxH` on the command line)",
            SizePreset::ALL.map(|p| format!("`{}`", p.name())).join(", "),
            Dimensions::MIN,
            Dimensions::MAX
        )
    }
}
