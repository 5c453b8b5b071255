//! How a model is loaded: device, precision, hub access, the text encoder's form and the safety
//! checker.

use candle_core::{DType, Device};
use pixart_core::linear_bf16::CpuProducts;

use crate::model_source::HubOptions;
use crate::text_encoder::TextEncoderOptions;

/// How to load a model.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Where to run.
    pub device: Device,
    /// Compute dtype: f32, bf16 or f16. In f16 the VAE runs in f32 when its config sets
    /// `force_upcast` (the SDXL VAE's does: it overflows in f16; diffusers' PixArt pipeline
    /// ignores the flag, see `pixart_vae::VaeConfig::force_upcast`) and T5 keeps its `wo` in f32.
    pub dtype: DType,
    /// Hub resolution for repo ids.
    pub hub: HubOptions,
    /// Clean prompts as diffusers does with `clean_caption=True` ([`crate::caption`]) instead of
    /// only lowercasing and stripping them (`clean_caption=False`, the default here).
    pub clean_caption: bool,
    /// Where T5 runs (`None`: on `device`). `Some(Device::Cpu)` keeps its ~9.5 GB (bf16) off the
    /// GPU; only the prompt states travel to the device.
    pub text_encoder_device: Option<Device>,
    /// The text encoder's weights (GGUF or another folder), quantization and residency.
    pub text_encoder: TextEncoderOptions,
    /// The transformer's weights from one file instead of the model's `transformer/` folder: a
    /// `.safetensors` or a PyTorch checkpoint (`.pth`, `.pt`, `.bin`) in diffusers' layout or the
    /// original PixArt repository's (fine-tunes as they are shared). Depth, width and channels
    /// come from the file, the rest of the config from the model's; T5, tokenizer, VAE and
    /// scheduler from the model.
    pub transformer: Option<std::path::PathBuf>,
    /// How many recent prompts' T5 states to keep (0 disables the cache).
    pub prompt_cache_size: usize,
    /// The safety checker: a transformers image-classifier folder or hub repo id with an `nsfw`
    /// label (fal's is [`pixart_safety::DEFAULT_SAFETY_CHECKER`]). It is loaded with the model
    /// and a failure to load it fails [`crate::Pipeline::load`]. `None` (the default here): no
    /// checker; requests then run unchecked unless they ask for the check explicitly, which is
    /// refused.
    pub safety_checker: Option<String>,
    /// How matrix products run on the CPU: with [`CpuProducts::Bf16`] and f32 as
    /// [`Self::dtype`], the transformer blocks' linear layers and the VAE decoder's 3×3
    /// convolutions round their operands to bf16 and sum in f32 (AVX512-BF16), everything else
    /// stays f32; on a CPU without AVX512-BF16, or on a GPU, this changes nothing. What
    /// `pixart --dtype bf16` asks for on such a CPU. With [`CpuProducts::F16`], the transformer
    /// blocks' linear layers multiply f16 operands (AVX512-FP16; `pixart --dtype f16`).
    pub cpu_products: CpuProducts,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            hub: HubOptions::from_env(),
            clean_caption: false,
            text_encoder_device: None,
            text_encoder: TextEncoderOptions::default(),
            transformer: None,
            prompt_cache_size: 16,
            safety_checker: None,
            cpu_products: CpuProducts::F32,
        }
    }
}

impl LoadOptions {
    /// On `device` in `dtype`, everything else at its default.
    pub fn on(device: Device, dtype: DType) -> Self {
        Self { device, dtype, ..Self::default() }
    }
}
