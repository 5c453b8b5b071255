//! The engine's refusals in fal's words: a parameter the model cannot run with becomes the
//! request field it came from.

use pixart_pipeline::{InvalidParameter, PipelineError};

use crate::field_error::FieldError;

/// The request field an engine parameter is filled from (`loras[i]` is the file of
/// `loras.i.path`, `image` the picture of `image_url`).
pub fn field_of(parameter: &str) -> String {
    let field = match parameter {
        "size" => "image_size",
        "width" => "image_size.width",
        "height" => "image_size.height",
        "steps" => "num_inference_steps",
        "sampler" => "scheduler",
        "safety_check" => "enable_safety_checker",
        "image" => "image_url",
        "mask" => "mask_url",
        other => {
            if let Some(index) = other.strip_prefix("loras[").and_then(|rest| rest.strip_suffix(']')) {
                return format!("loras.{index}.path");
            }
            if let Some(index) = other.strip_prefix("pag_applied_layers[").and_then(|rest| rest.strip_suffix(']')) {
                return format!("pag_applied_layers.{index}");
            }
            other
        }
    };
    field.to_string()
}

impl From<InvalidParameter> for FieldError {
    fn from(error: InvalidParameter) -> Self {
        FieldError::value(field_of(&error.parameter), error.message)
    }
}

/// The invalid fields behind a generation's failure, when the request (not the model or the
/// machine) is at fault.
pub fn invalid_fields(error: &PipelineError) -> Option<Vec<FieldError>> {
    match error {
        PipelineError::InvalidParameter(invalid) => Some(vec![invalid.clone().into()]),
        _ => None,
    }
}
