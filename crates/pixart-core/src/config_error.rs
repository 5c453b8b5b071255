//! The one error every model part raises for a config it does not compute, naming the file (when
//! known), the field, the value found and what is accepted.

use std::path::{Path, PathBuf};

/// A config value this implementation refuses: out of range (`norm_num_groups: 0`) or asking for
/// behaviour it does not have (`beta_schedule: "scaled_linear"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field} = {value} is not supported (supported: {supported})", .file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
pub struct UnsupportedConfig {
    /// The config file, once the loader knows it.
    pub file: Option<PathBuf>,
    /// The config key (or a short description of a combination of keys).
    pub field: String,
    /// The value found.
    pub value: String,
    /// What is accepted.
    pub supported: String,
}

impl UnsupportedConfig {
    /// A refusal of `field = value`, accepting `supported`.
    pub fn new(field: impl Into<String>, value: impl std::fmt::Display, supported: impl Into<String>) -> Self {
        Self { file: None, field: field.into(), value: value.to_string(), supported: supported.into() }
    }

    /// The same refusal, attributed to `file`.
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }
}

/// The largest width, channel count or vocabulary a config may declare (2²⁰; XXL T5 is 10 240
/// wide at most). Anything larger is a corrupt file, and products of two such values must not
/// overflow.
pub const MAX_DIMENSION: usize = 1 << 20;

/// Checks a config's numeric fields: `Err` names the first field out of its range.
pub struct ConfigCheck;

impl ConfigCheck {
    /// A size or count: `1 ≤ value ≤` [`MAX_DIMENSION`], so products of two never overflow.
    pub fn dimension(field: &str, value: usize) -> Result<(), UnsupportedConfig> {
        Self::within(field, value, 1, MAX_DIMENSION)
    }

    /// `lo ≤ value ≤ hi`.
    pub fn within(field: &str, value: usize, lo: usize, hi: usize) -> Result<(), UnsupportedConfig> {
        if !(lo..=hi).contains(&value) {
            return Err(UnsupportedConfig::new(field, value, format!("an integer from {lo} to {hi}")));
        }
        Ok(())
    }

    /// A finite number with `value > 0` (or `≥ 0` when `zero_ok`).
    pub fn finite_positive(field: &str, value: f64, zero_ok: bool) -> Result<(), UnsupportedConfig> {
        let ok = value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0));
        if !ok {
            let supported = if zero_ok { "a finite number ≥ 0" } else { "a finite number > 0" };
            return Err(UnsupportedConfig::new(field, value, supported));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_file_field_value_and_range() {
        let e =
            UnsupportedConfig::new("norm_num_groups", 0, "a positive integer").in_file(Path::new("vae/config.json"));
        assert_eq!(
            e.to_string(),
            "vae/config.json: norm_num_groups = 0 is not supported (supported: a positive integer)"
        );
        assert!(ConfigCheck::dimension("x", 0).is_err());
        assert!(ConfigCheck::dimension("x", 1).is_ok());
        assert!(ConfigCheck::dimension("x", usize::MAX).unwrap_err().to_string().contains("from 1 to 1048576"));
        assert!(ConfigCheck::within("x", 9, 1, 8).unwrap_err().to_string().contains("from 1 to 8"));
        assert!(ConfigCheck::finite_positive("eps", f64::NAN, true).is_err());
        assert!(ConfigCheck::finite_positive("eps", 0.0, true).is_ok());
        assert!(ConfigCheck::finite_positive("scale", 0.0, false).is_err());
    }
}
