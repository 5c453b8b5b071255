//! The transformer as the pipeline holds it: the base model, its weights by name, and the model
//! with a generation's LoRAs merged, built per request from shared tensors (only the changed
//! layers are new) and kept for the next request with the same LoRAs.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use pixart_core::UnsupportedConfig;
use pixart_dit::{CpuProducts, DitConfig, DitError, PixArtTransformer, TransformerWeights};

use crate::invalid_parameter::InvalidParameter;
use crate::params::LoraUse;
use crate::PipelineError;

/// Which LoRAs at which scales a merged model has: `(digest, scale bits)`.
type MergeKey = Vec<(String, u64)>;

/// The base transformer and the most recently merged one.
#[derive(Debug)]
pub(crate) struct TransformerSlot {
    weights: TransformerWeights,
    config: DitConfig,
    base: Arc<PixArtTransformer>,
    merged: Mutex<Option<(MergeKey, Arc<PixArtTransformer>)>>,
}

impl TransformerSlot {
    /// The model folder's `transformer/`, or `file` (a single-file checkpoint in either layout)
    /// with the folder's config for what the weights do not say; `products` as
    /// [`crate::LoadOptions::cpu_products`].
    pub(crate) fn load(
        model_dir: &Path,
        file: Option<&Path>,
        (dtype, products): (DType, CpuProducts),
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let folder = model_dir.join("transformer");
        let mut config: DitConfig =
            pixart_core::load_checked_config::<_, DitError>(&folder.join("config.json"), DitConfig::validate)?;
        config.cpu_products = products;
        let (weights, config) = match file {
            None => (TransformerWeights::from_folder(&folder, dtype, device)?, config),
            Some(file) => {
                let weights = TransformerWeights::from_file(file, dtype, device)?;
                let config = weights.config(&config)?;
                (weights, config)
            }
        };
        let weights = weights.for_cpu_products(products)?;
        let base = Arc::new(PixArtTransformer::from_weights(&config, &weights)?);
        Ok(Self { weights, config, base, merged: Mutex::new(None) })
    }

    /// The model's config.
    pub(crate) fn config(&self) -> &DitConfig {
        &self.config
    }

    /// Where the weights came from.
    pub(crate) fn source(&self) -> &Path {
        self.weights.source()
    }

    /// Refuses a caption or latent width the rest of the model does not give, naming the
    /// transformer's tensor.
    pub(crate) fn check_widths(&self, caption: usize, latent: usize) -> Result<(), UnsupportedConfig> {
        let wrong = |tensor: &str, width: usize, what: String| {
            Err(UnsupportedConfig::new(format!("{tensor} input width"), width, what).in_file(self.source()))
        };
        if self.config.caption_channels != caption {
            let what = format!("the text encoder's d_model ({caption})");
            return wrong("caption_projection.linear_1.weight", self.config.caption_channels, what);
        }
        if self.config.in_channels != latent {
            return wrong(
                "pos_embed.proj.weight",
                self.config.in_channels,
                format!("the VAE's latent channels ({latent})"),
            );
        }
        Ok(())
    }

    /// The model with `loras` merged (the base model when none has a scale other than 0). A LoRA
    /// that does not fit the model is refused naming `loras[i]`.
    pub(crate) fn with_loras(&self, loras: &[LoraUse]) -> Result<Arc<PixArtTransformer>, PipelineError> {
        let active: Vec<(usize, &LoraUse)> = loras.iter().enumerate().filter(|(_, l)| l.scale != 0.0).collect();
        if active.is_empty() {
            return Ok(self.base.clone());
        }
        let key: MergeKey = active.iter().map(|(_, l)| (l.lora.digest().to_string(), l.scale.to_bits())).collect();
        let mut merged = self.merged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, model)) = merged.as_ref() {
            if *cached == key {
                return Ok(model.clone());
            }
        }
        let mut deltas = std::collections::HashMap::new();
        for (i, lora) in active {
            let refused = |e: &dyn std::fmt::Display| InvalidParameter::new(format!("loras[{i}]"), e.to_string());
            for (tensor, delta) in lora.lora.deltas(&self.weights, lora.scale).map_err(|e| refused(&e))? {
                let sum = match deltas.remove(&tensor) {
                    Some(earlier) => (earlier + delta)?,
                    None => delta,
                };
                deltas.insert(tensor, sum);
            }
        }
        let model = Arc::new(PixArtTransformer::from_weights(&self.config, &self.weights.with_deltas(deltas)?)?);
        *merged = Some((key, model.clone()));
        Ok(model)
    }
}
