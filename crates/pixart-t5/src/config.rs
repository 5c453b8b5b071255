//! The text encoder's `config.json` (transformers' `T5Config`), reduced to what the encoder uses.

use serde::Deserialize;

use pixart_core::config_error::MAX_DIMENSION;
use pixart_core::{ConfigCheck, UnsupportedConfig};

use crate::error::T5Error;

/// Hyper-parameters of a T5 encoder, deserialised from the checkpoint's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Hidden width of the feed-forward block.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Buckets of the relative position bias.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu` (T5 v1.1), or `[gated-]{gelu,gelu_new,relu,silu}`.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// The activation inside the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// GELU with the exact erf (transformers' `gelu`).
    GeluErf,
    /// GELU with the tanh approximation (transformers' `gelu_new`, T5 v1.1).
    GeluTanh,
    /// `x · sigmoid(x)`.
    Silu,
}

/// How the feed-forward block is built, parsed from `feed_forward_proj` as transformers does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardKind {
    /// `wo(act(wi_0 x) ⊙ wi_1 x)` when true, `wo(act(wi x))` when false.
    pub gated: bool,
    /// The activation.
    pub activation: Activation,
}

impl T5Config {
    /// Reads and validates a `config.json`; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Self, T5Error> {
        let config: T5Config = pixart_core::load_config(path)?;
        config.validate().map_err(|e| match e {
            T5Error::Unsupported(e) => T5Error::Unsupported(e.in_file(path)),
            other => other,
        })?;
        Ok(config)
    }

    /// Refuses configs the encoder cannot run, naming the first field at fault.
    pub fn validate(&self) -> Result<(), T5Error> {
        ConfigCheck::dimension("vocab_size", self.vocab_size)?;
        ConfigCheck::dimension("d_model", self.d_model)?;
        ConfigCheck::dimension("d_kv", self.d_kv)?;
        ConfigCheck::dimension("d_ff", self.d_ff)?;
        ConfigCheck::dimension("num_heads", self.num_heads)?;
        ConfigCheck::within("num_layers", self.num_layers, 0, 1024)?;
        let buckets = self.relative_attention_num_buckets;
        if !(4..=MAX_DIMENSION).contains(&buckets) || !buckets.is_multiple_of(2) {
            return Err(UnsupportedConfig::new(
                "relative_attention_num_buckets",
                buckets,
                "an even number from 4 to 2^20",
            )
            .into());
        }
        // The logarithmic buckets span max_exact = buckets/4 up to max_distance.
        let max_distance = self.relative_attention_max_distance;
        if max_distance <= buckets / 4 || max_distance > MAX_DIMENSION {
            return Err(UnsupportedConfig::new(
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
                format!("more than relative_attention_num_buckets / 4 ({}), at most 2^20", buckets / 4),
            )
            .into());
        }
        ConfigCheck::finite_positive("layer_norm_epsilon", self.layer_norm_epsilon, true)?;
        self.feed_forward().map(|_| ())
    }

    /// Parses `feed_forward_proj`; `gated-gelu` means the tanh GELU, as in transformers.
    pub fn feed_forward(&self) -> Result<FeedForwardKind, T5Error> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => return Err(unsupported_ff(proj)),
        };
        let activation = match (gated, act) {
            (true, "gelu") => Activation::GeluTanh,
            (_, "gelu_new") => Activation::GeluTanh,
            (false, "gelu") => Activation::GeluErf,
            (_, "relu") => Activation::Relu,
            (_, "silu") => Activation::Silu,
            _ => return Err(unsupported_ff(proj)),
        };
        Ok(FeedForwardKind { gated, activation })
    }
}

fn unsupported_ff(proj: &str) -> T5Error {
    UnsupportedConfig::new(
        "feed_forward_proj",
        format!("{proj:?}"),
        "relu, gelu, gelu_new, silu, each optionally prefixed with gated-",
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ff: &str) -> T5Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2,
            "feed_forward_proj": ff
        }))
        .unwrap()
    }

    #[test]
    fn feed_forward_kinds() {
        assert_eq!(
            cfg("gated-gelu").feed_forward().unwrap(),
            FeedForwardKind { gated: true, activation: Activation::GeluTanh }
        );
        assert_eq!(cfg("relu").feed_forward().unwrap(), FeedForwardKind { gated: false, activation: Activation::Relu });
        assert_eq!(cfg("gelu").feed_forward().unwrap().activation, Activation::GeluErf);
        let err = cfg("gated-swish").feed_forward().unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj = \"gated-swish\"") && err.contains("gated-"), "{err}");
        assert!(cfg("fancy-gelu").feed_forward().is_err());
    }
}
