//! The text encoder's weights, storage and residency: which file it is read from (the model's
//! `text_encoder/` folder, another safetensors folder, or a GGUF file), whether it is quantized
//! on load, and whether it stays in memory between prompts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use pixart_t5::{QuantType, T5Config, T5Encoder, T5Error, T5LoadOptions, T5WeightsFile, WeightSummary};

/// Whether the text encoder stays loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Offload {
    /// Loaded once, kept for every request (fastest; T5 XXL holds 9.5 GB in bf16).
    #[default]
    None,
    /// Loaded only while prompts are encoded and released before the transformer runs, so its
    /// memory is never held together with the transformer's and the VAE's. Each request whose
    /// prompts are not in the prompt cache reads the weights again (from the OS page cache when
    /// memory allows).
    Sequential,
}

impl Offload {
    /// The allowed names, as the command line spells them.
    pub const NAMES: &'static str = "none, sequential";

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Sequential => "sequential",
        }
    }
}

impl std::str::FromStr for Offload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Offload::None),
            "sequential" => Ok(Offload::Sequential),
            _ => Err(format!("unknown offload mode {s:?}: allowed values are {}", Offload::NAMES)),
        }
    }
}

/// How the text encoder is loaded.
#[derive(Debug, Clone, Default)]
pub struct TextEncoderOptions {
    /// Weights to use instead of the model's `text_encoder/` folder: a `.gguf` file (f32, f16,
    /// bf16, q8_0, q6k, q5k, q4k; transformers or llama.cpp tensor names) or a transformers
    /// safetensors folder. The config and the tokenizer still come from the model folder.
    pub weights: Option<PathBuf>,
    /// Quantize the unquantized matrices to this type while loading.
    pub quant: Option<QuantType>,
    /// Keep the encoder loaded, or load it only while encoding.
    pub offload: Offload,
    /// On the CPU, let candle repack quantized matrices for its faster kernels, keeping a second
    /// copy of them ([`pixart_t5::T5LoadOptions::cpu_repack`]).
    pub cpu_repack: bool,
}

/// The text encoder, loaded or ready to be loaded.
#[derive(Debug)]
pub(crate) struct TextEncoderSlot {
    config: T5Config,
    weights: T5WeightsFile,
    load: T5LoadOptions,
    summary: WeightSummary,
    resident: Option<T5Encoder>,
}

impl TextEncoderSlot {
    /// Loads the encoder described by `model_dir/text_encoder/config.json` from the weights
    /// `options` name (checking every tensor), and keeps it unless the offload is sequential.
    pub(crate) fn load(
        model_dir: &Path,
        options: &TextEncoderOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, T5Error> {
        let folder = model_dir.join("text_encoder");
        let config = T5Config::load(&folder.join("config.json"))?;
        let weights = match &options.weights {
            Some(path) => T5WeightsFile::from_path(path),
            None => T5WeightsFile::Safetensors(folder),
        };
        let load =
            T5LoadOptions { dtype, device: device.clone(), quant: options.quant, cpu_repack: options.cpu_repack };
        let encoder = T5Encoder::load_weights(&config, &weights, &load)?;
        let summary = encoder.weight_summary().clone();
        let resident = (options.offload == Offload::None).then_some(encoder);
        Ok(Self { config, weights, load, summary, resident })
    }

    /// The encoder's config.
    pub(crate) fn config(&self) -> &T5Config {
        &self.config
    }

    /// How the weights are stored.
    pub(crate) fn summary(&self) -> &WeightSummary {
        &self.summary
    }

    /// Where the encoder runs.
    pub(crate) fn device(&self) -> &Device {
        &self.load.device
    }

    /// The resident encoder, or one loaded now (dropped by the caller when done).
    pub(crate) fn encoder(&self) -> Result<std::borrow::Cow<'_, T5Encoder>, T5Error> {
        match &self.resident {
            Some(encoder) => Ok(std::borrow::Cow::Borrowed(encoder)),
            None => T5Encoder::load_weights(&self.config, &self.weights, &self.load).map(std::borrow::Cow::Owned),
        }
    }
}
