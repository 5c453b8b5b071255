//! The safety checker: preprocessing, the classifier and the threshold, batched over a
//! request's images on the generation device.

use std::path::Path;

use candle_core::{DType, Device};

use crate::config::{PreprocessorConfig, VitConfig};
use crate::error::SafetyError;
use crate::preprocess::Preprocessor;
use crate::vit::{probabilities, VitForImageClassification};

/// An image is flagged when p(nsfw) is above this (fal's toolkit).
pub const NSFW_THRESHOLD: f32 = 0.5;

/// A borrowed 8-bit RGB image, row-major.
#[derive(Debug, Clone, Copy)]
pub struct RgbView<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 3` bytes.
    pub pixels: &'a [u8],
}

/// The checker's opinion of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Softmax probability of the `nsfw` class.
    pub nsfw_probability: f32,
    /// `nsfw_probability > NSFW_THRESHOLD`.
    pub flagged: bool,
}

/// A loaded NSFW image classifier with its preprocessing.
#[derive(Debug, Clone)]
pub struct SafetyChecker {
    model: VitForImageClassification,
    preprocessor: Preprocessor,
    nsfw_index: usize,
    device: Device,
}

impl SafetyChecker {
    /// Loads a transformers `ViTForImageClassification` folder (`config.json`,
    /// `preprocessor_config.json`, `model.safetensors`) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, SafetyError> {
        let config_path = dir.join("config.json");
        let config = VitConfig::load(&config_path)?;
        let preprocessor = Preprocessor::new(PreprocessorConfig::load(&dir.join("preprocessor_config.json"))?);
        let nsfw_index = config.label_index("nsfw").filter(|i| *i < config.num_labels()).ok_or_else(|| {
            SafetyError::NoNsfwLabel {
                path: config_path.clone(),
                labels: config.id2label.values().cloned().collect::<Vec<_>>().join(", "),
            }
        })?;
        let (h, w) = preprocessor.output_size();
        if h != config.image_size || w != config.image_size {
            return Err(pixart_core::UnsupportedConfig::new(
                "size",
                format!("{w}x{h}"),
                format!("the classifier's image_size ({0}x{0})", config.image_size),
            )
            .in_file(&dir.join("preprocessor_config.json"))
            .into());
        }
        let vb = pixart_core::var_builder(dir, "model", dtype, device)?;
        let model = VitForImageClassification::new(&config, vb).map_err(|e| match e {
            SafetyError::Candle(source) => pixart_core::WeightsError::tensor(dir, source).into(),
            other => other,
        })?;
        Ok(Self { model, preprocessor, nsfw_index, device: device.clone() })
    }

    /// The logits `[B, labels]` (f32, on the CPU) of a batch of images.
    pub fn logits(&self, images: &[RgbView<'_>]) -> Result<candle_core::Tensor, SafetyError> {
        let batch: Vec<(&[u8], usize, usize)> =
            images.iter().map(|i| (i.pixels, i.width as usize, i.height as usize)).collect();
        let pixels = self.preprocessor.batch(&batch, &self.device)?;
        Ok(self.model.forward(&pixels)?.to_device(&Device::Cpu)?)
    }

    /// Classifies a batch of images in one forward pass.
    pub fn check(&self, images: &[RgbView<'_>]) -> Result<Vec<Verdict>, SafetyError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let probs = probabilities(&self.logits(images)?)?.to_vec2::<f32>()?;
        Ok(probs
            .iter()
            .map(|row| {
                let p = row.get(self.nsfw_index).copied().unwrap_or(0.0);
                Verdict { nsfw_probability: p, flagged: p > NSFW_THRESHOLD }
            })
            .collect())
    }

    /// The preprocessing, for inspection.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }
}
