//! `config.json` (transformers' `ViTConfig`) and `preprocessor_config.json` (`ViTImageProcessor`),
//! reduced to what the classifier uses.

use std::collections::BTreeMap;
use std::path::Path;

use pixart_core::{ConfigCheck, UnsupportedConfig};
use serde::Deserialize;

use crate::error::SafetyError;

/// Hyper-parameters of a ViT image classifier.
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Hidden width of the MLP.
    pub intermediate_size: usize,
    /// The MLP activation: `gelu` (exact erf), `gelu_new`/`gelu_pytorch_tanh` (tanh) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Input side in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Whether q, k and v have biases.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Class index → label.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the exact erf.
    GeluErf,
    /// GELU with the tanh approximation.
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

impl VitConfig {
    /// Reads and validates `config.json`; errors name the file and field.
    pub fn load(path: &Path) -> Result<Self, SafetyError> {
        pixart_core::load_checked_config(path, Self::validate)
    }

    /// Refuses configs the classifier cannot run, naming the first field at fault.
    pub fn validate(&self) -> Result<(), UnsupportedConfig> {
        ConfigCheck::dimension("hidden_size", self.hidden_size)?;
        ConfigCheck::dimension("intermediate_size", self.intermediate_size)?;
        ConfigCheck::within("num_hidden_layers", self.num_hidden_layers, 0, 1024)?;
        ConfigCheck::dimension("num_attention_heads", self.num_attention_heads)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(UnsupportedConfig::new(
                "num_attention_heads",
                self.num_attention_heads,
                format!("a divisor of hidden_size ({})", self.hidden_size),
            ));
        }
        ConfigCheck::within("patch_size", self.patch_size, 1, 64)?;
        ConfigCheck::within("image_size", self.image_size, 1, 4096)?;
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(UnsupportedConfig::new(
                "image_size",
                self.image_size,
                format!("a multiple of patch_size ({})", self.patch_size),
            ));
        }
        if self.num_channels != 3 {
            return Err(UnsupportedConfig::new("num_channels", self.num_channels, "3 (RGB)"));
        }
        ConfigCheck::finite_positive("layer_norm_eps", self.layer_norm_eps, false)?;
        if self.id2label.len() < 2 {
            return Err(UnsupportedConfig::new("id2label", self.id2label.len(), "at least two labels"));
        }
        self.activation().map(|_| ())
    }

    /// The MLP activation named by `hidden_act`.
    pub fn activation(&self) -> Result<Activation, UnsupportedConfig> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(UnsupportedConfig::new(
                "hidden_act",
                format!("{other:?}"),
                "gelu, gelu_new, gelu_pytorch_tanh, relu",
            )),
        }
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// The class index whose label is `name` (case-insensitive).
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.id2label.iter().find(|(_, l)| l.eq_ignore_ascii_case(name)).and_then(|(i, _)| i.parse().ok())
    }
}

/// The output size of the resize.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ResizeTo {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

/// `ViTImageProcessor`'s settings.
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    /// Resize to `size` first.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// The resize target.
    #[serde(default = "default_size")]
    pub size: ResizeTo,
    /// PIL's resampling filter number (2 = bilinear, the only one supported).
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// Usually 1/255.
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std`, per channel.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "default_half")]
    pub image_mean: Vec<f64>,
    /// Per-channel standard deviation.
    #[serde(default = "default_half")]
    pub image_std: Vec<f64>,
}

fn default_size() -> ResizeTo {
    ResizeTo { height: 224, width: 224 }
}
fn default_resample() -> u32 {
    2
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_half() -> Vec<f64> {
    vec![0.5, 0.5, 0.5]
}

impl PreprocessorConfig {
    /// Reads and validates `preprocessor_config.json`; errors name the file and field.
    pub fn load(path: &Path) -> Result<Self, SafetyError> {
        let config: PreprocessorConfig = pixart_core::load_config(path)?;
        config.validate().map_err(|e| SafetyError::Unsupported(e.in_file(path)))?;
        Ok(config)
    }

    /// Refuses settings the preprocessor does not implement.
    pub fn validate(&self) -> Result<(), UnsupportedConfig> {
        if self.resample != 2 {
            return Err(UnsupportedConfig::new("resample", self.resample, "2 (PIL bilinear)"));
        }
        ConfigCheck::within("size.height", self.size.height, 1, 4096)?;
        ConfigCheck::within("size.width", self.size.width, 1, 4096)?;
        for (field, values) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
            if values.len() != 3 || values.iter().any(|v| !v.is_finite()) {
                return Err(UnsupportedConfig::new(field, format!("{values:?}"), "three finite numbers (R, G, B)"));
            }
        }
        if self.image_std.contains(&0.0) {
            return Err(UnsupportedConfig::new("image_std", format!("{:?}", self.image_std), "non-zero values"));
        }
        ConfigCheck::finite_positive("rescale_factor", self.rescale_factor, false)
    }
}
