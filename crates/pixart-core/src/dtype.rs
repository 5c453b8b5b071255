//! User-facing dtype names (`f32`, `bf16`, `f16`).

use candle_core::DType;

use crate::weights::WeightsError;

/// The dtypes the engine computes in, as named on the command line and in configs.
pub const SUPPORTED_DTYPES: &str = "f32, bf16, f16";

/// Parses `f32` / `bf16` / `f16` (also `float32`, `bfloat16`, `float16`).
pub fn parse_dtype(name: &str) -> Result<DType, WeightsError> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(WeightsError::UnknownDtype { name: other.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_rejects_unknown() {
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
        let err = parse_dtype("f8").unwrap_err().to_string();
        assert!(err.contains("f8") && err.contains(SUPPORTED_DTYPES), "{err}");
    }
}
