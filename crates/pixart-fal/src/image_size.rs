//! `image_size`: one of fal's presets or explicit dimensions; absent, the default preset or
//! the input image's size.

use pixart_pipeline::Dimensions;
use serde_json::{json, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::{json_integer, FieldValue};

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

/// `image_size` as the request holds it: absent (`null`) means the default preset, or the input
/// image's size when there is one.
impl FieldValue for Option<ImageSize> {
    fn from_json(field: &str, value: &Value) -> Result<Self, FieldError> {
        match value {
            Value::Null => Ok(None),
            _ => ImageSize::from_json(field, value).map(Some),
        }
    }

    fn from_text(field: &str, text: &str) -> Result<Self, FieldError> {
        ImageSize::from_text(field, text).map(Some)
    }

    fn to_json(&self) -> Value {
        self.map_or(Value::Null, |size| size.to_json())
    }

    fn schema() -> Value {
        ImageSize::schema()
    }

    fn allowed() -> String {
        ImageSize::allowed()
    }
}
