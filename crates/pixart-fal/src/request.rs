//! fal's `fal-ai/pixart-sigma` input, declared once.
//!
//! The table at the bottom of this file (`request_fields!`) declares every request field once:
//! its name, type, default, command-line flag and description. From it come the typed
//! [`GenerateRequest`], [`PartialRequest`] (any subset of fields: a request file before flags are
//! applied), the JSON parser (every invalid field reported at once, with pydantic's error kinds),
//! the flag parser, [`FIELDS`] (what the command line, the JSON Schema and the docs read) and
//! the conversion to the engine's [`GenerationParams`]. A field's type says how it is read and
//! described ([`FieldValue`]); adding a field is one entry in the table.

use std::sync::Arc;

use pixart_pipeline::{Dimensions, GenerationParams, RgbImage};
use serde_json::{Map, Value};

use crate::field_error::{ErrorKind, FieldError};
use crate::field_value::FieldValue;
use crate::image_size::ImageSize;
use crate::image_url::ImageUrl;
use crate::loras::LoraWeight;
use crate::styles::Style;
use crate::values::{GuidanceScale, NumImages, OutputFormat, PagLayers, PagScale, SchedulerKind, Steps, Strength};

/// One request field as the command line, the JSON Schema and the docs see it.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    /// The JSON name.
    pub name: &'static str,
    /// The command-line flag, without `--` (its variable is `PIXART_` and the flag in capitals).
    pub flag: &'static str,
    /// What the field does (its doc comment).
    pub description: &'static str,
    /// Whether the request must have it.
    pub required: bool,
    /// Whether its flag may be given without a value (`--sync-mode` means true).
    pub is_switch: bool,
    /// Whether its flag may be repeated, each value adding an item (`--lora`).
    pub is_list: bool,
    /// The JSON Schema of its value.
    pub schema: fn() -> Value,
    /// What it allows, in words.
    pub allowed: fn() -> String,
    /// Its default as JSON (`None` when required; `null` when absence means "none").
    pub default: fn() -> Option<Value>,
}

/// The default as the schema states it: the field's own, or an override (a field whose absence
/// leaves the decision to the server, such as `enable_safety_checker`).
macro_rules! stated_default {
    ($ty:ty, $default:expr,) => {
        <$ty as FieldValue>::to_json(&$default)
    };
    ($ty:ty, $default:expr, $stated:expr) => {
        serde_json::json!($stated)
    };
}

/// Generates the request types, their parsers and [`FIELDS`] from one table of fields.
macro_rules! request_fields {
    (
        required { $( $(#[doc = $rdoc:literal])* $rname:ident: $rty:ty, flag = $rflag:literal; )* }
        optional { $( $(#[doc = $odoc:literal])* $oname:ident: $oty:ty = $odefault:expr, flag = $oflag:literal
                      $(, stated_default = $ostated:expr)?; )* }
    ) => {
        /// A generation request: every field of fal's input schema, typed, with fal's defaults.
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub struct GenerateRequest {
            $( $(#[doc = $rdoc])* pub $rname: $rty, )*
            $( $(#[doc = $odoc])* pub $oname: $oty, )*
        }

        /// Any subset of a request's fields, each already typed: a request file before command
        /// line flags are applied to it, or flags alone. [`PartialRequest::into_request`] fills
        /// the rest with the defaults.
        #[derive(Debug, Clone, Default, PartialEq)]
        #[non_exhaustive]
        pub struct PartialRequest {
            $( #[doc = concat!("`", stringify!($rname), "`.")] pub $rname: Option<$rty>, )*
            $( #[doc = concat!("`", stringify!($oname), "`.")] pub $oname: Option<$oty>, )*
        }

        /// Every request field, required ones first, then in fal's order.
        pub const FIELDS: &[FieldSpec] = &[
            $( FieldSpec {
                name: stringify!($rname),
                flag: $rflag,
                description: concat!($($rdoc),*),
                required: true,
                is_switch: <$rty as FieldValue>::IS_SWITCH,
                is_list: <$rty as FieldValue>::IS_LIST,
                schema: <$rty as FieldValue>::schema,
                allowed: <$rty as FieldValue>::allowed,
                default: || None,
            }, )*
            $( FieldSpec {
                name: stringify!($oname),
                flag: $oflag,
                description: concat!($($odoc),*),
                required: false,
                is_switch: <$oty as FieldValue>::IS_SWITCH,
                is_list: <$oty as FieldValue>::IS_LIST,
                schema: <$oty as FieldValue>::schema,
                allowed: <$oty as FieldValue>::allowed,
                default: || Some(stated_default!($oty, $odefault, $($ostated)?)),
            }, )*
        ];

        impl GenerateRequest {
            /// A request with the required fields and every other field at fal's default.
            pub fn new($( $rname: impl Into<$rty> ),*) -> Self {
                Self { $( $rname: $rname.into(), )* $( $oname: $odefault, )* }
            }

            /// The request as JSON (what [`GenerateRequest::from_value`] reads back; fields
            /// whose value is "none" are left out).
            pub fn to_value(&self) -> Value {
                let mut map = Map::new();
                $( map.insert(stringify!($rname).into(), FieldValue::to_json(&self.$rname)); )*
                $( map.insert(stringify!($oname).into(), FieldValue::to_json(&self.$oname)); )*
                map.retain(|_, v| !v.is_null());
                Value::Object(map)
            }
        }

        impl PartialRequest {
            /// Sets one field from its JSON value.
            fn set_json(&mut self, key: &str, value: &Value) -> Result<(), FieldError> {
                match key {
                    $( stringify!($rname) => {
                        if value.is_null() {
                            return Err(FieldError::missing(key));
                        }
                        self.$rname = Some(<$rty as FieldValue>::from_json(key, value)?)
                    } )*
                    $( stringify!($oname) => self.$oname = Some(<$oty as FieldValue>::from_json(key, value)?), )*
                    _ => return Err(FieldError::new(key, ErrorKind::ExtraForbidden, "unknown field")),
                }
                Ok(())
            }

            /// Sets one field from a flag's text (`name` is the JSON name): a repeated list
            /// flag adds to the list, another flag replaces the value. The error is the one the
            /// same value gets in JSON.
            pub fn set_text(&mut self, name: &str, text: &str) -> Result<(), FieldError> {
                match name {
                    $( stringify!($rname) => {
                        let value = <$rty as FieldValue>::from_text(name, text)?;
                        self.$rname = Some(match self.$rname.take() { Some(earlier) => earlier.combine(value), None => value });
                    } )*
                    $( stringify!($oname) => {
                        let value = <$oty as FieldValue>::from_text(name, text)?;
                        self.$oname = Some(match self.$oname.take() { Some(earlier) => earlier.combine(value), None => value });
                    } )*
                    _ => return Err(FieldError::new(name, ErrorKind::ExtraForbidden, "unknown field")),
                }
                Ok(())
            }

            /// The names of the fields set here.
            pub fn fields(&self) -> Vec<&'static str> {
                let mut set = Vec::new();
                $( if self.$rname.is_some() { set.push(stringify!($rname)); } )*
                $( if self.$oname.is_some() { set.push(stringify!($oname)); } )*
                set
            }

            /// These fields, with every field `overrides` sets replacing this one's.
            pub fn overridden_by(self, overrides: Self) -> Self {
                Self {
                    $( $rname: overrides.$rname.or(self.$rname), )*
                    $( $oname: overrides.$oname.or(self.$oname), )*
                }
            }

            /// The request: these fields, the defaults for the rest. Fails only when a required
            /// field is absent.
            pub fn into_request(self) -> Result<GenerateRequest, Vec<FieldError>> {
                let missing: Vec<FieldError> = [$( (stringify!($rname), self.$rname.is_none()) ),*]
                    .into_iter()
                    .filter(|(_, absent)| *absent)
                    .map(|(name, _)| FieldError::missing(name))
                    .collect();
                let ($( Some($rname), )*) = ($( self.$rname, )*) else { return Err(missing) };
                let request = GenerateRequest {
                    $( $rname, )*
                    $( $oname: self.$oname.unwrap_or($odefault), )*
                };
                request.check_combination()?;
                Ok(request)
            }
        }
    };
}

request_fields! {
    required {
        /// The prompt to generate an image from.
        prompt: String, flag = "prompt";
    }
    optional {
        /// What the image should not contain.
        negative_prompt: String = String::new(), flag = "negative-prompt";
        /// A style template applied to the prompt; its negative prompt is put before yours.
        style: Style = Style::default(), flag = "style";
        /// The output size; the output always has exactly this size. Absent: `square_hd`, or
        /// the input image's size with `image_url`.
        image_size: Option<ImageSize> = None, flag = "image-size", stated_default = "square_hd";
        /// Denoising steps.
        num_inference_steps: Steps = Steps::DEFAULT, flag = "steps";
        /// The sampler.
        scheduler: SchedulerKind = SchedulerKind::default(), flag = "scheduler";
        /// Classifier-free guidance scale.
        guidance_scale: GuidanceScale = GuidanceScale::DEFAULT, flag = "guidance-scale";
        /// Seed of the generator; random when absent (and returned in the response).
        seed: Option<u64> = None, flag = "seed";
        /// Return the images inline as data URIs instead of stored files.
        sync_mode: bool = false, flag = "sync-mode";
        /// Images, drawn as one noise batch.
        num_images: NumImages = NumImages::DEFAULT, flag = "num-images";
        /// Run the safety checker: flagged images become black and `has_nsfw_concepts` says
        /// which. Absent: checked when the server has a checker loaded (fal's default `true`);
        /// `true` where none is loaded is refused.
        enable_safety_checker: Option<bool> = None, flag = "enable-safety-checker", stated_default = true;
        /// LoRAs merged into the transformer for this request; their changes add up (see the
        /// README's "Fine-tunes and LoRAs" for the files and where they may come from).
        loras: Vec<LoraWeight> = Vec::new(), flag = "lora";
        /// Image-to-image: the picture to start from (see the README's "Image input" for the
        /// semantics and where pictures may come from).
        image_url: Option<ImageUrl> = None, flag = "image";
        /// Image-to-image and inpainting: how much of the input picture is repainted.
        strength: Strength = Strength::DEFAULT, flag = "strength";
        /// Inpainting (with `image_url`): white repaints, black keeps.
        mask_url: Option<ImageUrl> = None, flag = "mask";
        /// Perturbed-attention guidance's scale; 0 turns it off.
        pag_scale: PagScale = PagScale::DEFAULT, flag = "pag-scale";
        /// The layers perturbed-attention guidance perturbs, as diffusers' `pag_applied_layers`
        /// (`blocks.1` also selects blocks 10–19 of a 28-block model, as in diffusers).
        pag_applied_layers: PagLayers = PagLayers::default(), flag = "pag-layer";
        /// How the images are encoded.
        output_format: OutputFormat = OutputFormat::default(), flag = "output-format";
    }
}

/// The decoded input pictures of a request (from `image_url` and `mask_url`), fetched by
/// whoever runs it with its own rules of where they may come from.
#[derive(Debug, Clone, Default)]
pub struct InputPictures {
    /// The picture to start from.
    pub image: Option<Arc<RgbImage>>,
    /// The inpainting mask.
    pub mask: Option<Arc<RgbImage>>,
}

impl GenerateRequest {
    /// Parses JSON text; every problem is reported with the field it concerns.
    pub fn from_json(text: &str) -> Result<Self, Vec<FieldError>> {
        Self::from_value(&parse_json(text)?)
    }

    /// Parses a JSON value field by field (types, ranges, unknown fields); every problem is
    /// reported with the field it concerns, missing required fields first.
    pub fn from_value(value: &Value) -> Result<Self, Vec<FieldError>> {
        let (partial, mut errors) = PartialRequest::parse(value);
        if value.is_object() {
            let missing = FIELDS
                .iter()
                .filter(|f| f.required && !partial.fields().contains(&f.name))
                .filter(|f| !errors.iter().any(|e| e.field == f.name))
                .map(|f| FieldError::missing(f.name));
            errors.splice(0..0, missing.collect::<Vec<_>>());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        partial.into_request()
    }

    /// What the engine runs: the style applied to the prompt and negative prompt, the size in
    /// pixels, the sampler, and the other fields as they are (`sync_mode` is the response's).
    /// `loras` name files or URLs: whoever runs the request reads them (with the rules of where
    /// they may come from) and adds them to the parameters.
    ///
    /// `image_url` and `mask_url` are fetched the same way and given to
    /// [`Self::to_params_with_pictures`]; this method leaves them out.
    pub fn to_params(&self) -> GenerationParams {
        let (prompt, negative) = self.style.apply(&self.prompt, &self.negative_prompt);
        let mut params = GenerationParams::new(prompt)
            .with_negative_prompt(negative)
            .with_steps(self.num_inference_steps.get())
            .with_sampler(self.scheduler.sampler())
            .with_guidance_scale(self.guidance_scale.get())
            .with_num_images(self.num_images.get())
            .with_pag(self.pag_scale.get(), self.pag_applied_layers.patterns().to_vec());
        params.size = self.image_size.unwrap_or_default().dimensions();
        params.seed = self.seed;
        params.safety_check = self.enable_safety_checker;
        params.strength = self.strength.get();
        params
    }

    /// [`Self::to_params`] with the request's input pictures: without `image_size`, the output
    /// takes the input image's size (refused naming `image_url` when a side is outside
    /// 16–4096).
    pub fn to_params_with_pictures(&self, pictures: InputPictures) -> Result<GenerationParams, FieldError> {
        let mut params = self.to_params();
        if let (Some(image), None) = (&pictures.image, self.image_size) {
            params.size = Dimensions::new(image.width, image.height).map_err(|_| {
                FieldError::value(
                    "image_url",
                    format!(
                        "the picture is {}x{}: without image_size the output takes its size, whose sides must be \
                         from {} to {}; give image_size",
                        image.width,
                        image.height,
                        Dimensions::MIN,
                        Dimensions::MAX
                    ),
                )
            })?;
        }
        params.image = pictures.image;
        params.mask = pictures.mask;
        Ok(params)
    }

    /// Fields that are valid alone but not together.
    fn check_combination(&self) -> Result<(), Vec<FieldError>> {
        if self.mask_url.is_some() && self.image_url.is_none() {
            return Err(vec![FieldError::value("mask_url", "needs image_url: the picture the mask repaints")]);
        }
        Ok(())
    }
}

impl serde::Serialize for GenerateRequest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for GenerateRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_value(&value).map_err(|errors| {
            serde::de::Error::custom(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })
    }
}

fn parse_json(text: &str) -> Result<Value, Vec<FieldError>> {
    serde_json::from_str(text)
        .map_err(|e| vec![FieldError::new("", ErrorKind::JsonInvalid, format!("malformed JSON: {e}"))])
}

impl PartialRequest {
    /// Parses JSON text holding any subset of the fields.
    pub fn from_json(text: &str) -> Result<Self, Vec<FieldError>> {
        let (partial, errors) = Self::parse(&parse_json(text)?);
        if errors.is_empty() {
            Ok(partial)
        } else {
            Err(errors)
        }
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

    /// Fields from flags: `(JSON name, text)` pairs; every bad value is reported.
    pub fn from_texts<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, Vec<FieldError>> {
        let mut partial = Self::default();
        let errors: Vec<FieldError> =
            pairs.into_iter().filter_map(|(name, text)| partial.set_text(name, text).err()).collect();
        if errors.is_empty() {
            Ok(partial)
        } else {
            Err(errors)
        }
    }

    /// Every valid field of a JSON object, and an error for every invalid one (required fields
    /// first, so their errors lead the list as in fal's responses).
    fn parse(value: &Value) -> (Self, Vec<FieldError>) {
        let mut partial = Self::default();
        let Some(object) = value.as_object() else {
            return (partial, vec![FieldError::new("", ErrorKind::TypeError, "the request must be a JSON object")]);
        };
        let required = |key: &str| FIELDS.iter().any(|f| f.required && f.name == key);
        let mut fields: Vec<(&String, &Value)> = object.iter().collect();
        fields.sort_by_key(|(key, _)| !required(key));
        let errors = fields.into_iter().filter_map(|(key, value)| partial.set_json(key, value).err()).collect();
        (partial, errors)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::image_size::SizePreset;

    #[test]
    fn defaults_are_fals() {
        let r = GenerateRequest::from_json(r#"{"prompt": "a cat"}"#).unwrap();
        assert_eq!(r, GenerateRequest::new("a cat"));
        assert_eq!(r.num_inference_steps.get(), 35);
        assert_eq!(r.guidance_scale.get(), 4.5);
        assert_eq!(r.image_size, None, "absent: square_hd, or the input picture's size");
        assert_eq!((r.to_params().size.width(), r.to_params().size.height()), (1024, 1024));
        assert_eq!((r.strength.get(), r.pag_scale.get(), r.output_format), (0.8, 0.0, OutputFormat::Png));
        assert_eq!(r.pag_applied_layers.patterns(), ["blocks.1"]);
        assert_eq!(r.style.name(), "(No style)");
        assert_eq!(r.num_images.get(), 1);
        assert_eq!(r.enable_safety_checker, None, "absent: the server's default (checked when it has a checker)");
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
        assert_eq!(errors[0].kind, ErrorKind::Missing);
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
        assert_eq!(errors.iter().find(|e| e.field == "extra").unwrap().kind, ErrorKind::ExtraForbidden);
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
        let null_prompt = GenerateRequest::from_json(r#"{"prompt": null}"#).unwrap_err();
        assert_eq!((null_prompt[0].field.as_str(), null_prompt[0].kind), ("prompt", ErrorKind::Missing));
        assert_eq!(null_prompt.len(), 1);
    }

    #[test]
    fn serialises_to_what_it_parses() {
        let mut request = GenerateRequest::new("a cat");
        request.style = Style::Anime;
        request.image_size = Some(ImageSize::custom(64, 118).unwrap());
        request.num_inference_steps = Steps::new(2).unwrap();
        request.scheduler = SchedulerKind::SaSolver;
        request.guidance_scale = GuidanceScale::new(1.0).unwrap();
        request.seed = Some(u64::MAX);
        request.num_images = NumImages::new(8).unwrap();
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(value["style"], "Anime");
        assert_eq!(value["image_size"], json!({"width": 64, "height": 118}));
        assert!(value.get("enable_safety_checker").is_none(), "absent stays absent: {value}");
        assert_eq!(GenerateRequest::from_value(&value).unwrap(), request);
        assert_eq!(serde_json::from_value::<GenerateRequest>(value).unwrap(), request);
        let bad = serde_json::from_value::<GenerateRequest>(json!({"prompt": "x", "num_images": 9})).unwrap_err();
        assert!(bad.to_string().contains("num_images: must be an integer from 1 to 8"), "{bad}");
    }

    #[test]
    fn flags_parse_into_the_same_values_with_the_same_errors() {
        let field = |name: &str, text: &str| {
            let mut partial = PartialRequest::default();
            partial.set_text(name, text).map(|()| partial)
        };
        let size = field("image_size", "64x118").unwrap().image_size.unwrap().unwrap();
        assert_eq!(size.dimensions(), pixart_pipeline::Dimensions::new(64, 118).unwrap());
        assert_eq!(
            field("image_size", "landscape_16_9").unwrap().image_size,
            Some(Some(ImageSize::Preset(SizePreset::Landscape16x9)))
        );
        assert_eq!(field("image_size", "0x64").unwrap_err().field, "image_size.width");
        assert_eq!(field("image_size", "64x5000").unwrap_err().field, "image_size.height");
        assert_eq!(field("image_size", "huge").unwrap_err().field, "image_size");
        assert_eq!(
            field("num_inference_steps", "0").unwrap_err().to_string(),
            "num_inference_steps: must be an integer from 1 to 200"
        );
        assert_eq!(field("scheduler", "SA-SOLVER").unwrap().scheduler, Some(SchedulerKind::SaSolver));
        assert!(field("guidance_scale", "21").is_err());
        assert_eq!(field("sync_mode", "yes").unwrap().sync_mode, Some(true));
        assert_eq!(field("enable_safety_checker", "0").unwrap().enable_safety_checker, Some(Some(false)));
        // The same text gives the same error in JSON and as a flag.
        for (name, text, json) in
            [("num_images", "9", json!(9)), ("style", "Nope", json!("Nope")), ("seed", "-1", json!(-1))]
        {
            let from_json = GenerateRequest::from_value(&json!({"prompt": "x", name: json})).unwrap_err();
            assert_eq!(field(name, text).unwrap_err(), from_json[0], "{name}");
        }
        let errors = PartialRequest::from_texts([("num_images", "0"), ("style", "x"), ("prompt", "a")]).unwrap_err();
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn a_partial_request_takes_overrides_and_defaults() {
        let file = PartialRequest::from_json(r#"{"negative_prompt": "blurry", "num_inference_steps": 20}"#).unwrap();
        assert_eq!(file.clone().into_request().unwrap_err()[0].field, "prompt");
        let flags = PartialRequest::from_texts([("prompt", "a fox"), ("num_inference_steps", "3")]).unwrap();
        let request = file.overridden_by(flags).into_request().unwrap();
        assert_eq!((request.prompt.as_str(), request.negative_prompt.as_str()), ("a fox", "blurry"));
        assert_eq!(request.num_inference_steps.get(), 3);
        assert_eq!(request.num_images, NumImages::DEFAULT);
        // A bad field the overrides replace is not an error; another one is.
        let text = r#"{"num_inference_steps": 0, "image_size": {"width": 1, "height": 64}}"#;
        let overrides =
            PartialRequest::from_texts([("prompt", "x"), ("num_inference_steps", "2"), ("image_size", "square")])
                .unwrap();
        let merged = PartialRequest::from_json_with_overrides(text, overrides).unwrap();
        assert_eq!(merged.into_request().unwrap().num_inference_steps.get(), 2);
        let only_steps = PartialRequest::from_texts([("prompt", "x"), ("num_inference_steps", "2")]).unwrap();
        let errors = PartialRequest::from_json_with_overrides(text, only_steps).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["image_size.width"]);
    }

    #[test]
    fn the_engine_gets_the_styled_prompt_and_the_fields() {
        let mut request = GenerateRequest::new("a cat");
        request.style = Style::Anime;
        request.negative_prompt = "blurry".into();
        request.image_size = Some(ImageSize::custom(64, 118).unwrap());
        request.seed = Some(7);
        request.enable_safety_checker = Some(false);
        let params = request.to_params();
        assert_eq!(Style::Anime.apply("a cat", "blurry"), (params.prompt.clone(), params.negative_prompt.clone()));
        assert_eq!((params.size.width(), params.size.height(), params.steps), (64, 118, 35));
        assert_eq!((params.seed, params.safety_check, params.num_images), (Some(7), Some(false), 1));
        assert_eq!(params.guidance_scale, 4.5);
    }

    #[test]
    fn image_fields_parse_and_combine() {
        let request = GenerateRequest::from_value(&json!({
            "prompt": "x", "image_url": "https://example.com/a.png", "strength": 0.3,
            "mask_url": "data:image/png;base64,AAAA", "pag_scale": 2.5,
            "pag_applied_layers": ["blocks.0", "blocks\\.1\\."], "output_format": "jpeg"
        }))
        .unwrap();
        assert_eq!(request.image_url.as_ref().unwrap().as_str(), "https://example.com/a.png");
        assert_eq!(request.mask_url.as_ref().unwrap().to_string(), "data:image/png;base64,…");
        assert_eq!((request.strength.get(), request.pag_scale.get()), (0.3, 2.5));
        assert_eq!(request.pag_applied_layers.patterns(), ["blocks.0", "blocks\\.1\\."]);
        assert_eq!(request.output_format, OutputFormat::Jpeg);
        let params = request.to_params();
        assert_eq!((params.strength, params.pag_scale, params.pag_layers.len()), (0.3, 2.5, 2));
        // A mask alone, and values out of range, are refused by name.
        let errors = GenerateRequest::from_value(&json!({"prompt": "x", "mask_url": "m.png"})).unwrap_err();
        assert_eq!(errors[0].field, "mask_url");
        let errors = GenerateRequest::from_value(&json!({
            "prompt": "x", "strength": 1.5, "pag_scale": -1, "output_format": "gif", "image_url": "",
            "pag_applied_layers": ["", 3]
        }))
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for field in ["strength", "pag_scale", "output_format", "image_url", "pag_applied_layers.1"] {
            assert!(fields.contains(&field), "{field} not reported: {errors:?}");
        }
        // The output takes the input picture's size unless image_size is given.
        let picture = Arc::new(RgbImage { width: 40, height: 24, pixels: vec![0; 40 * 24 * 3] });
        let pictures = InputPictures { image: Some(picture.clone()), mask: None };
        let request = GenerateRequest::from_value(&json!({"prompt": "x", "image_url": "a.png"})).unwrap();
        let params = request.to_params_with_pictures(pictures.clone()).unwrap();
        assert_eq!((params.size.width(), params.size.height()), (40, 24));
        let sized = GenerateRequest::from_value(&json!({"prompt": "x", "image_url": "a.png", "image_size": "square"}));
        let params = sized.unwrap().to_params_with_pictures(pictures).unwrap();
        assert_eq!((params.size.width(), params.size.height()), (512, 512));
        let huge = Arc::new(RgbImage { width: 5000, height: 20, pixels: Vec::new() });
        let refused = request.to_params_with_pictures(InputPictures { image: Some(huge), mask: None }).unwrap_err();
        assert_eq!(refused.field, "image_url");
        // Repeated --pag-layer flags add up.
        let flags =
            PartialRequest::from_texts([("pag_applied_layers", "blocks.0"), ("pag_applied_layers", "blocks.2")]);
        assert_eq!(flags.unwrap().pag_applied_layers.unwrap().patterns(), ["blocks.0", "blocks.2"]);
    }
}
