//! fal's `fal-ai/pixart-sigma` input schema, parsed once into typed values.
//!
//! A [`GenerateRequest`] can only hold valid values: each bounded field is a type whose
//! constructor checks its range ([`Steps`], [`NumImages`], [`GuidanceScale`], [`Dimensions`]),
//! and names are enums ([`Style`], [`SizePreset`], [`SchedulerKind`]). JSON is parsed by
//! [`GenerateRequest::from_json`] / [`GenerateRequest::from_value`], which report every invalid
//! field at once; [`PartialRequest`] holds any subset of fields (a request file to which command
//! line flags are added). The defaults live here, once: in the types' `DEFAULT`s, used by the
//! parser, by [`GenerateRequest::new`], by [`input_schema`] and by the command line's help.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use crate::field_error::FieldError;
pub use crate::sizes::{Dimensions, SizePreset};
pub use crate::styles::Style;

/// An integer field with an inclusive range and a default, checked on construction.
macro_rules! bounded_integer {
    ($(#[$doc:meta])* $name:ident, field = $field:literal, min = $min:literal, max = $max:literal, default = $default:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "u32", into = "u32")]
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
                    Err(Self::range_error())
                }
            }

            fn range_error() -> FieldError {
                FieldError::new(
                    Self::FIELD,
                    "value_error",
                    format!("must be an integer from {} to {}", Self::MIN, Self::MAX),
                )
            }

            /// The value.
            pub fn get(self) -> u32 {
                self.0
            }

            fn from_json(value: &Value) -> Result<Self, FieldError> {
                json_integer(value).and_then(|v| u32::try_from(v).ok()).ok_or_else(Self::range_error).and_then(Self::new)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::DEFAULT
            }
        }

        impl TryFrom<u32> for $name {
            type Error = FieldError;
            fn try_from(value: u32) -> Result<Self, FieldError> {
                Self::new(value)
            }
        }

        impl From<$name> for u32 {
            fn from(value: $name) -> u32 {
                value.0
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
                text.trim().parse::<u32>().map_err(|_| Self::range_error()).and_then(Self::new)
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
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
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
        if (Self::MIN..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Self::range_error())
        }
    }

    fn range_error() -> FieldError {
        FieldError::new(Self::FIELD, "value_error", format!("must be a number from {} to {}", Self::MIN, Self::MAX))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether classifier-free guidance runs (scale > 1), as diffusers decides.
    pub fn guides(self) -> bool {
        self.0 > 1.0
    }
}

impl Default for GuidanceScale {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<f64> for GuidanceScale {
    type Error = FieldError;
    fn try_from(value: f64) -> Result<Self, FieldError> {
        Self::new(value)
    }
}

impl From<GuidanceScale> for f64 {
    fn from(value: GuidanceScale) -> f64 {
        value.0
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
        text.trim().parse::<f64>().map_err(|_| Self::range_error()).and_then(Self::new)
    }
}

/// The sampler, as fal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SchedulerKind {
    /// DPM-Solver++ 2M, the model repo's scheduler.
    #[default]
    #[serde(rename = "DPM-SOLVER")]
    DpmSolver,
    /// SA-Solver as the official demo configures it.
    #[serde(rename = "SA-SOLVER")]
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

    fn error() -> FieldError {
        FieldError::new("scheduler", "value_error", "must be \"DPM-SOLVER\" or \"SA-SOLVER\"")
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
        Self::ALL.into_iter().find(|k| k.name() == text).ok_or_else(Self::error)
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

    fn from_json(value: &Value) -> Result<Self, FieldError> {
        match value {
            Value::String(name) => SizePreset::by_name(name).map(Self::Preset).ok_or_else(|| {
                FieldError::new(
                    "image_size",
                    "value_error",
                    format!("must be one of {} or an object {{\"width\", \"height\"}}", SizePreset::names()),
                )
            }),
            Value::Object(fields) => {
                if let Some(extra) = fields.keys().find(|k| *k != "width" && *k != "height") {
                    return Err(FieldError::new(format!("image_size.{extra}"), "extra_forbidden", "unknown field"));
                }
                let side = |name: &str| {
                    fields
                        .get(name)
                        .and_then(json_integer)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| Dimensions::side_error(name))
                };
                Ok(Self::Custom(Dimensions::new(side("width")?, side("height")?)?))
            }
            _ => Err(FieldError::new(
                "image_size",
                "type_error",
                "must be a preset name or an object {\"width\", \"height\"}",
            )),
        }
    }

    fn to_json(self) -> Value {
        match self {
            Self::Preset(preset) => json!(preset.name()),
            Self::Custom(d) => json!({ "width": d.width(), "height": d.height() }),
        }
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
        let text = text.trim();
        match text.split_once(['x', 'X']) {
            Some((w, h)) if SizePreset::by_name(text).is_none() => {
                let side = |s: &str, name: &str| s.trim().parse::<u32>().map_err(|_| Dimensions::side_error(name));
                Ok(Self::Custom(Dimensions::new(side(w, "width")?, side(h, "height")?)?))
            }
            _ => Self::from_json(&json!(text)),
        }
    }
}

impl Serialize for ImageSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::from_json(&Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// A generation request: every field of fal's input schema, typed, with fal's defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateRequest {
    /// The prompt (required).
    pub prompt: String,
    /// What to steer away from.
    pub negative_prompt: String,
    /// The style template.
    pub style: Style,
    /// Output size.
    pub image_size: ImageSize,
    /// Denoising steps (default 35).
    pub num_inference_steps: Steps,
    /// Sampler (default DPM-Solver++).
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale (default 4.5); ≤ 1 turns guidance off.
    pub guidance_scale: GuidanceScale,
    /// Seed of the CPU generator; random when absent (and returned in the response).
    pub seed: Option<u64>,
    /// Return images inline as data URIs instead of stored files.
    pub sync_mode: bool,
    /// Number of images, drawn as one noise batch (default 1).
    pub num_images: NumImages,
    /// Run the safety checker on the images (flagged ones become black, `has_nsfw_concepts`
    /// says which). `None` (the field absent): check when the pipeline has a checker loaded, as
    /// fal's default `true` does; `Some(true)` without a checker is refused, naming the field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_safety_checker: Option<bool>,
}

impl GenerateRequest {
    /// `enable_safety_checker`'s default (fal's).
    pub const DEFAULT_SAFETY_CHECKER: bool = true;

    /// A request with the given prompt and every other field at its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            style: Style::default(),
            image_size: ImageSize::default(),
            num_inference_steps: Steps::DEFAULT,
            scheduler: SchedulerKind::default(),
            guidance_scale: GuidanceScale::DEFAULT,
            seed: None,
            sync_mode: false,
            num_images: NumImages::DEFAULT,
            enable_safety_checker: None,
        }
    }

    /// Parses JSON text; every problem is reported with the field it concerns.
    pub fn from_json(text: &str) -> Result<Self, Vec<FieldError>> {
        Self::from_value(&parse_json(text)?)
    }

    /// Parses a JSON value field by field (types, ranges, unknown fields); every problem is
    /// reported with the field it concerns.
    pub fn from_value(value: &Value) -> Result<Self, Vec<FieldError>> {
        let (partial, mut errors) = PartialRequest::parse(value);
        if value.is_object() && partial.prompt.is_none() && !errors.iter().any(|e| e.field == "prompt") {
            errors.insert(0, missing_prompt());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        partial.into_request()
    }
}

impl<'de> Deserialize<'de> for GenerateRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_value(&value).map_err(|errors| {
            serde::de::Error::custom(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })
    }
}

fn parse_json(text: &str) -> Result<Value, Vec<FieldError>> {
    serde_json::from_str(text).map_err(|e| vec![FieldError::new("", "json_invalid", format!("malformed JSON: {e}"))])
}

fn missing_prompt() -> FieldError {
    FieldError::new("prompt", "missing", "field required")
}

/// Any subset of a request's fields, each already typed: a request file before command line
/// flags are applied to it, or flags alone. [`PartialRequest::into_request`] fills the rest with
/// the defaults and requires a prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialRequest {
    /// `prompt`.
    pub prompt: Option<String>,
    /// `negative_prompt`.
    pub negative_prompt: Option<String>,
    /// `style`.
    pub style: Option<Style>,
    /// `image_size`.
    pub image_size: Option<ImageSize>,
    /// `num_inference_steps`.
    pub num_inference_steps: Option<Steps>,
    /// `scheduler`.
    pub scheduler: Option<SchedulerKind>,
    /// `guidance_scale`.
    pub guidance_scale: Option<GuidanceScale>,
    /// `seed` (JSON `null` counts as absent: a random seed).
    pub seed: Option<u64>,
    /// `sync_mode`.
    pub sync_mode: Option<bool>,
    /// `num_images`.
    pub num_images: Option<NumImages>,
    /// `enable_safety_checker`.
    pub enable_safety_checker: Option<bool>,
}

impl PartialRequest {
    /// Parses JSON text holding any subset of the fields.
    pub fn from_json(text: &str) -> Result<Self, Vec<FieldError>> {
        Self::from_value(&parse_json(text)?)
    }

    /// Parses JSON text holding any subset of the fields, then applies `overrides` (e.g. command
    /// line flags): a field `overrides` sets may be invalid in the text; every other must be valid.
    pub fn from_json_with_overrides(text: &str, overrides: Self) -> Result<Self, Vec<FieldError>> {
        let (parsed, errors) = Self::parse(&parse_json(text)?);
        let replaced = overrides.fields();
        let errors: Vec<FieldError> =
            errors.into_iter().filter(|e| !replaced.contains(&e.field.split('.').next().unwrap_or_default())).collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(parsed.overridden_by(overrides))
    }

    /// Parses a JSON object holding any subset of the fields.
    pub fn from_value(value: &Value) -> Result<Self, Vec<FieldError>> {
        let (partial, errors) = Self::parse(value);
        if errors.is_empty() {
            Ok(partial)
        } else {
            Err(errors)
        }
    }

    /// Every valid field of a JSON object, and an error for every invalid one.
    fn parse(value: &Value) -> (Self, Vec<FieldError>) {
        let mut partial = Self::default();
        let Some(object) = value.as_object() else {
            return (partial, vec![FieldError::new("", "type_error", "the request must be a JSON object")]);
        };
        let mut errors = Vec::new();
        // The prompt first, so its error leads the list as in fal's responses.
        let mut fields: Vec<(&String, &Value)> = object.iter().collect();
        fields.sort_by_key(|(key, _)| key.as_str() != "prompt");
        for (key, value) in fields {
            let result = partial.set_field(key, value);
            if let Err(error) = result {
                errors.push(error);
            }
        }
        (partial, errors)
    }

    fn set_field(&mut self, key: &str, value: &Value) -> Result<(), FieldError> {
        let string = |value: &Value| {
            value.as_str().map(str::to_string).ok_or_else(|| FieldError::new(key, "type_error", "must be a string"))
        };
        let boolean =
            |value: &Value| value.as_bool().ok_or_else(|| FieldError::new(key, "type_error", "must be true or false"));
        match key {
            "prompt" => match value {
                Value::Null => return Err(missing_prompt()),
                _ => self.prompt = Some(string(value)?),
            },
            "negative_prompt" => self.negative_prompt = Some(string(value)?),
            "style" => self.style = Some(value.as_str().ok_or_else(Style::error)?.parse()?),
            "image_size" => self.image_size = Some(ImageSize::from_json(value)?),
            "num_inference_steps" => self.num_inference_steps = Some(Steps::from_json(value)?),
            "scheduler" => {
                self.scheduler =
                    Some(value.as_str().ok_or_else(SchedulerKind::error)?.parse().map_err(|_| SchedulerKind::error())?)
            }
            "guidance_scale" => {
                self.guidance_scale =
                    Some(value.as_f64().ok_or_else(GuidanceScale::range_error).and_then(GuidanceScale::new)?)
            }
            "seed" => {
                self.seed = match value {
                    Value::Null => None,
                    _ => Some(value.as_u64().ok_or_else(|| {
                        FieldError::new(key, "value_error", format!("must be an integer from 0 to {}", u64::MAX))
                    })?),
                }
            }
            "sync_mode" => self.sync_mode = Some(boolean(value)?),
            "enable_safety_checker" => self.enable_safety_checker = Some(boolean(value)?),
            "num_images" => self.num_images = Some(NumImages::from_json(value)?),
            _ => return Err(FieldError::new(key, "extra_forbidden", "unknown field")),
        }
        Ok(())
    }

    /// The names of the fields set here.
    pub fn fields(&self) -> Vec<&'static str> {
        let set = [
            ("prompt", self.prompt.is_some()),
            ("negative_prompt", self.negative_prompt.is_some()),
            ("style", self.style.is_some()),
            ("image_size", self.image_size.is_some()),
            ("num_inference_steps", self.num_inference_steps.is_some()),
            ("scheduler", self.scheduler.is_some()),
            ("guidance_scale", self.guidance_scale.is_some()),
            ("seed", self.seed.is_some()),
            ("sync_mode", self.sync_mode.is_some()),
            ("num_images", self.num_images.is_some()),
            ("enable_safety_checker", self.enable_safety_checker.is_some()),
        ];
        set.into_iter().filter(|(_, is_set)| *is_set).map(|(name, _)| name).collect()
    }

    /// These fields, with every field `overrides` sets replacing this one's.
    pub fn overridden_by(self, overrides: Self) -> Self {
        Self {
            prompt: overrides.prompt.or(self.prompt),
            negative_prompt: overrides.negative_prompt.or(self.negative_prompt),
            style: overrides.style.or(self.style),
            image_size: overrides.image_size.or(self.image_size),
            num_inference_steps: overrides.num_inference_steps.or(self.num_inference_steps),
            scheduler: overrides.scheduler.or(self.scheduler),
            guidance_scale: overrides.guidance_scale.or(self.guidance_scale),
            seed: overrides.seed.or(self.seed),
            sync_mode: overrides.sync_mode.or(self.sync_mode),
            num_images: overrides.num_images.or(self.num_images),
            enable_safety_checker: overrides.enable_safety_checker.or(self.enable_safety_checker),
        }
    }

    /// The request: these fields, the defaults for the rest. Fails only without a prompt.
    pub fn into_request(self) -> Result<GenerateRequest, Vec<FieldError>> {
        let Some(prompt) = self.prompt else { return Err(vec![missing_prompt()]) };
        let defaults = GenerateRequest::new(prompt);
        Ok(GenerateRequest {
            negative_prompt: self.negative_prompt.unwrap_or(defaults.negative_prompt),
            style: self.style.unwrap_or(defaults.style),
            image_size: self.image_size.unwrap_or(defaults.image_size),
            num_inference_steps: self.num_inference_steps.unwrap_or(defaults.num_inference_steps),
            scheduler: self.scheduler.unwrap_or(defaults.scheduler),
            guidance_scale: self.guidance_scale.unwrap_or(defaults.guidance_scale),
            seed: self.seed.or(defaults.seed),
            sync_mode: self.sync_mode.unwrap_or(defaults.sync_mode),
            num_images: self.num_images.unwrap_or(defaults.num_images),
            enable_safety_checker: self.enable_safety_checker.or(defaults.enable_safety_checker),
            prompt: defaults.prompt,
        })
    }
}

/// A JSON integer, also written as a float with no fraction (`20.0`), as pydantic accepts.
fn json_integer(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19).map(|f| f as u64))
}

/// The request's JSON Schema (as in fal's OpenAPI document), with the ranges, choices and
/// defaults the parser applies.
pub fn input_schema() -> Value {
    let defaults = GenerateRequest::new("");
    let mut properties = Map::new();
    let mut add = |name: &str, schema: Value| {
        properties.insert(name.to_string(), schema);
    };
    add(
        "prompt",
        json!({ "type": "string", "title": "Prompt", "description": "The prompt to generate an image from." }),
    );
    add(
        "negative_prompt",
        json!({ "type": "string", "default": defaults.negative_prompt,
                "description": "What the image should not contain." }),
    );
    add(
        "style",
        json!({ "enum": Style::ALL.map(Style::name), "default": defaults.style.name(),
                "description": "A style template applied to the prompt and negative prompt." }),
    );
    add(
        "image_size",
        json!({
            "default": defaults.image_size.to_json(),
            "anyOf": [
                { "enum": SizePreset::ALL.map(SizePreset::name) },
                { "type": "object", "additionalProperties": false, "required": ["width", "height"],
                  "properties": {
                      "width": { "type": "integer", "minimum": Dimensions::MIN, "maximum": Dimensions::MAX },
                      "height": { "type": "integer", "minimum": Dimensions::MIN, "maximum": Dimensions::MAX } } }
            ],
            "description": "A preset or explicit pixels; the output always has exactly this size."
        }),
    );
    add(
        "num_inference_steps",
        json!({ "type": "integer", "minimum": Steps::MIN, "maximum": Steps::MAX,
                "default": defaults.num_inference_steps.get() }),
    );
    add(
        "scheduler",
        json!({ "enum": SchedulerKind::ALL.map(SchedulerKind::name), "default": defaults.scheduler.name() }),
    );
    add(
        "guidance_scale",
        json!({ "type": "number", "minimum": GuidanceScale::MIN, "maximum": GuidanceScale::MAX,
                "default": defaults.guidance_scale.get() }),
    );
    add(
        "seed",
        json!({ "type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX,
                "description": "Random (and returned in the response) when absent." }),
    );
    add("sync_mode", json!({ "type": "boolean", "default": defaults.sync_mode }));
    add(
        "num_images",
        json!({ "type": "integer", "minimum": NumImages::MIN, "maximum": NumImages::MAX,
                "default": defaults.num_images.get() }),
    );
    add(
        "enable_safety_checker",
        json!({ "type": "boolean", "default": GenerateRequest::DEFAULT_SAFETY_CHECKER,
                "description": "Default true; false on a server started without a safety checker, which refuses true." }),
    );
    json!({
        "title": "Input",
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": false,
        "properties": properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_fals() {
        let r = GenerateRequest::from_json(r#"{"prompt": "a cat"}"#).unwrap();
        assert_eq!(r, GenerateRequest::new("a cat"));
        assert_eq!(r.num_inference_steps.get(), 35);
        assert_eq!(r.guidance_scale.get(), 4.5);
        assert_eq!((r.image_size.dimensions().width(), r.image_size.dimensions().height()), (1024, 1024));
        assert_eq!(r.style.name(), "(No style)");
        assert_eq!(r.num_images.get(), 1);
        assert_eq!(r.enable_safety_checker, None, "absent: the pipeline's default (checked when it has a checker)");
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = GenerateRequest::from_json(
            r#"{"num_inference_steps": 0, "image_size": {"width": -5, "height": 64}, "style": "Nope",
                "scheduler": "EULER", "num_images": 1000, "guidance_scale": "high", "extra": 1, "seed": -1}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields[0], "prompt");
        for f in [
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
        for not_object in ["[]", "\"x\"", "5", "null"] {
            let errors = GenerateRequest::from_json(not_object).unwrap_err();
            assert_eq!(errors.len(), 1, "{not_object}: {errors:?}");
            assert!(errors[0].message.contains("JSON object"), "{errors:?}");
        }
        let both = GenerateRequest::from_json(r#"{"image_size": "huge"}"#).unwrap_err();
        assert_eq!(both.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["prompt", "image_size"]);
        assert!(GenerateRequest::from_json(r#"{"prompt": "x", "image_size": "huge"}"#).unwrap_err()[0]
            .message
            .contains("square_hd"));
        let nan = GenerateRequest::from_value(&json!({"prompt": "x", "guidance_scale": f64::NAN})).unwrap_err();
        assert_eq!(nan[0].field, "guidance_scale");
    }

    #[test]
    fn serialises_to_what_it_parses() {
        let mut request = GenerateRequest::new("a cat");
        request.style = Style::Anime;
        request.image_size = ImageSize::Custom(Dimensions::new(64, 118).unwrap());
        request.num_inference_steps = Steps::new(2).unwrap();
        request.scheduler = SchedulerKind::SaSolver;
        request.guidance_scale = GuidanceScale::new(1.0).unwrap();
        request.seed = Some(u64::MAX);
        request.num_images = NumImages::new(8).unwrap();
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(value["style"], "Anime");
        assert_eq!(value["image_size"], json!({"width": 64, "height": 118}));
        assert_eq!(GenerateRequest::from_value(&value).unwrap(), request);
        assert_eq!(serde_json::from_value::<GenerateRequest>(value).unwrap(), request);
        let bad = serde_json::from_value::<GenerateRequest>(json!({"prompt": "x", "num_images": 9})).unwrap_err();
        assert!(bad.to_string().contains("num_images: must be an integer from 1 to 8"), "{bad}");
    }

    #[test]
    fn flags_parse_into_the_same_types() {
        assert_eq!("64x118".parse::<ImageSize>().unwrap().dimensions(), Dimensions::new(64, 118).unwrap());
        assert_eq!("landscape_16_9".parse::<ImageSize>().unwrap(), ImageSize::Preset(SizePreset::Landscape16x9));
        assert_eq!("0x64".parse::<ImageSize>().unwrap_err().field, "image_size.width");
        assert_eq!("64x5000".parse::<ImageSize>().unwrap_err().field, "image_size.height");
        assert_eq!("huge".parse::<ImageSize>().unwrap_err().field, "image_size");
        assert_eq!(
            "0".parse::<Steps>().unwrap_err().to_string(),
            "num_inference_steps: must be an integer from 1 to 200"
        );
        assert_eq!("SA-SOLVER".parse::<SchedulerKind>().unwrap(), SchedulerKind::SaSolver);
        assert!("21".parse::<GuidanceScale>().is_err());
    }

    #[test]
    fn a_partial_request_takes_overrides_and_defaults() {
        let file = PartialRequest::from_json(r#"{"negative_prompt": "blurry", "num_inference_steps": 20}"#).unwrap();
        assert_eq!(file.clone().into_request().unwrap_err()[0].field, "prompt");
        let flags = PartialRequest {
            prompt: Some("a fox".into()),
            num_inference_steps: Some(Steps::new(3).unwrap()),
            ..PartialRequest::default()
        };
        let request = file.overridden_by(flags).into_request().unwrap();
        assert_eq!((request.prompt.as_str(), request.negative_prompt.as_str()), ("a fox", "blurry"));
        assert_eq!(request.num_inference_steps.get(), 3);
        assert_eq!(request.num_images, NumImages::DEFAULT);
        // A bad field the overrides replace is not an error; another one is.
        let text = r#"{"num_inference_steps": 0, "image_size": {"width": 1, "height": 64}}"#;
        let overrides = PartialRequest {
            prompt: Some("x".into()),
            num_inference_steps: Some(Steps::new(2).unwrap()),
            image_size: Some(ImageSize::Preset(SizePreset::Square)),
            ..PartialRequest::default()
        };
        let merged = PartialRequest::from_json_with_overrides(text, overrides.clone()).unwrap();
        assert_eq!(merged.into_request().unwrap().num_inference_steps.get(), 2);
        let only_steps = PartialRequest { image_size: None, ..overrides };
        let errors = PartialRequest::from_json_with_overrides(text, only_steps).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["image_size.width"]);
    }

    #[test]
    fn the_schema_states_the_parsers_defaults_and_ranges() {
        let schema = input_schema();
        let defaults: Map<String, Value> = schema["properties"]
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| v.get("default").map(|d| (k.clone(), d.clone())))
            .collect();
        let mut with_prompt = defaults.clone();
        with_prompt.insert("prompt".into(), json!("x"));
        // Every default the schema states is what the parser fills in, and every field but the
        // prompt and seed has one. `enable_safety_checker` states fal's `true`: absent, the
        // parser leaves it to the pipeline, which checks whenever it has a checker loaded.
        assert_eq!(with_prompt.remove("enable_safety_checker"), Some(json!(true)));
        assert_eq!(GenerateRequest::from_value(&Value::Object(with_prompt)).unwrap(), GenerateRequest::new("x"));
        assert_eq!(defaults.len(), schema["properties"].as_object().unwrap().len() - 2);
        assert_eq!(schema["properties"]["num_inference_steps"]["maximum"], 200);
        assert_eq!(schema["properties"]["image_size"]["anyOf"][1]["properties"]["width"]["minimum"], 16);
    }
}
