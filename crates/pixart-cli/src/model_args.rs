//! The flags every command that loads a model shares: which model, where it runs, in which
//! precision, and how the hub is reached. Each can also be set by its `PIXART_*` variable.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::builder::FalseyValueParser;
use clap::{Args, ValueEnum};
use pixart_core::fast_math::Simd;
use pixart_pipeline::{
    Bf16Kernel, CpuProducts, HubOptions, LoadOptions, Offload, Pipeline, PipelineError, QuantType, TextEncoderOptions,
    DEFAULT_MODEL, DEFAULT_SAFETY_CHECKER,
};

/// Where to run: `cpu`, `cuda` / `cuda:N` (GPU N, from 0) or `metal` / `metal:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// CUDA GPU N (build with `--features cuda`).
    Cuda(usize),
    /// Metal GPU N (build with `--features metal`).
    Metal(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let (kind, index) = match text.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("{text:?}: the GPU index after ':' must be a number from 0"))?;
                (kind, index)
            }
            None => (text, 0),
        };
        match kind {
            "cpu" if index == 0 && !text.contains(':') => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(index)),
            "metal" => Ok(Self::Metal(index)),
            _ => Err(format!("{text:?}: expected cpu, cuda, cuda:N, metal or metal:N")),
        }
    }
}

/// Compute precision.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats: the reference precision.
    F32,
    /// bfloat16.
    Bf16,
    /// float16 (the VAE runs in f32, T5's `wo` in f32).
    F16,
}

/// Which model to load and how: shared by `generate`, `bench` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a diffusers-layout folder or a Hugging Face repo id.
    #[arg(long, env = "PIXART_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Device to run on: cpu, cuda (GPU 0), cuda:N, metal or metal:N.
    #[arg(long, env = "PIXART_DEVICE", default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype (default: f32 on the CPU, bf16 on a GPU). On a CPU with AVX512-BF16, bf16
    /// multiplies the transformer's linear layers and the VAE's 3x3 convolutions in bf16 (sums in
    /// f32); on a CPU with AVX512-FP16, f16 multiplies the transformer's linear layers in f16
    /// (sums in f16 along short runs, in f32 across them); on other CPUs it computes in f32 and
    /// says so.
    #[arg(long, env = "PIXART_DTYPE", value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Never use the network: read the model from the hub cache only (like HF_HUB_OFFLINE=1).
    #[arg(long, env = "PIXART_OFFLINE", value_parser = FalseyValueParser::new())]
    pub offline: bool,
    /// The Hugging Face hub cache folder (default: HF_HUB_CACHE, else $HF_HOME/hub).
    #[arg(long, env = "PIXART_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Run T5 on the CPU and keep only the transformer and VAE on the device.
    #[arg(long, env = "PIXART_TEXT_ENCODER_ON_CPU", value_parser = FalseyValueParser::new())]
    pub text_encoder_on_cpu: bool,
    /// Text encoder weights instead of the model's text_encoder/ folder: a .gguf file (f32, f16,
    /// bf16, q8_0, q6k, q5k, q4k; Hugging Face or llama.cpp tensor names, e.g. city96's
    /// t5-v1_1-xxl-encoder-gguf) or a safetensors folder. Config and tokenizer stay the model's.
    #[arg(long, env = "PIXART_TEXT_ENCODER")]
    pub text_encoder: Option<PathBuf>,
    /// The transformer's weights from one file instead of the model's transformer/ folder: a
    /// .safetensors or PyTorch .pth/.pt/.bin in diffusers' layout or the original PixArt
    /// repository's (fine-tunes as shared); the rest of the model (T5, VAE…) from --model.
    #[arg(long, env = "PIXART_TRANSFORMER")]
    pub transformer: Option<PathBuf>,
    /// Quantize the text encoder's unquantized matrices on load: q8_0, q6k, q5k or q4k.
    #[arg(long, env = "PIXART_TEXT_ENCODER_QUANT")]
    pub text_encoder_quant: Option<QuantType>,
    /// none: keep T5 loaded; sequential: load it only while encoding prompts and release it
    /// before the transformer runs (less peak memory, T5 re-read for each uncached prompt).
    #[arg(long, env = "PIXART_OFFLOAD", default_value = "none")]
    pub offload: Offload,
    /// On the CPU, run a quantized T5 through candle's repacked kernels: several times faster
    /// encoding, but a second copy of the q8_0/q4k/q6k matrices stays in memory.
    #[arg(long, env = "PIXART_TEXT_ENCODER_REPACK", value_parser = FalseyValueParser::new())]
    pub text_encoder_repack: bool,
    /// The safety checker: a transformers image-classifier folder or hub repo id with an `nsfw`
    /// label, loaded at start (hub cache and --offline as for the model); if it cannot be loaded,
    /// nothing starts.
    #[arg(long, env = "PIXART_SAFETY_CHECKER", default_value = DEFAULT_SAFETY_CHECKER)]
    pub safety_checker: String,
    /// Run without a safety checker: requests are unchecked (has_nsfw_concepts all false), and a
    /// request asking for the check (`enable_safety_checker: true`) is refused.
    #[arg(long, env = "PIXART_NO_SAFETY_CHECKER", value_parser = FalseyValueParser::new(), conflicts_with = "safety_checker")]
    pub no_safety_checker: bool,
    /// Clean prompts as diffusers' `clean_caption=True` does (URLs, HTML, ids… removed); default
    /// is diffusers' `clean_caption=False` (lowercase and strip only).
    #[arg(long, env = "PIXART_CLEAN_CAPTION", value_parser = FalseyValueParser::new())]
    pub clean_caption: bool,
}

impl ModelArgs {
    /// The candle device for `--device`.
    pub fn device(&self) -> Result<Device> {
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!("--device cuda:{n}: cannot use CUDA GPU {n} (this build needs `--features cuda`, an NVIDIA driver and that GPU)")
            }),
            DeviceArg::Metal(n) => Device::new_metal(n).with_context(|| {
                format!("--device metal:{n}: cannot use Metal GPU {n} (this build needs `--features metal` on macOS)")
            }),
        }
    }

    /// The dtype asked for, else f32 on the CPU and bf16 on a GPU, and how matrix products run
    /// on the CPU. There everything computes in f32 (with a note): `--dtype bf16` on a CPU with
    /// AVX512-BF16 multiplies the transformer blocks' linear layers and the VAE decoder's 3×3
    /// convolutions in bf16 (sums in f32), `--dtype f16` on a CPU with AVX512-FP16 the linear
    /// layers in f16; otherwise bf16 and f16 have no CPU kernels here, and
    /// converting to f32 and back at every op was about twice as slow per step.
    pub fn precision_for(&self, device: &Device) -> (DType, CpuProducts) {
        let asked = match self.dtype {
            Some(DtypeArg::F32) => DType::F32,
            Some(DtypeArg::Bf16) => DType::BF16,
            Some(DtypeArg::F16) => DType::F16,
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
        };
        if !device.is_cpu() || asked == DType::F32 {
            return (asked, CpuProducts::F32);
        }
        let name = dtype_name(asked);
        if asked == DType::BF16 && CpuProducts::Bf16.in_bf16() {
            let how = match Bf16Kernel::chosen() {
                Bf16Kernel::DotProduct => "AVX512-BF16's vdpbf16ps",
                Bf16Kernel::WidenedFma => {
                    "f32 FMAs on the bf16 operands: vdpbf16ps is slower here, or PIXART_BF16_KERNEL=fma; \
                     --dtype f32 is as fast or faster on such a CPU"
                }
            };
            warn(&format!(
                "--dtype bf16 on this CPU: the transformer's linear layers and the VAE decoder's 3x3 convolutions \
                 multiply in bf16 ({how}; sums in f32); everything else computes in f32"
            ));
            return (DType::F32, CpuProducts::Bf16);
        }
        if asked == DType::F16 && CpuProducts::F16.in_f16() {
            warn(&format!(
                "--dtype f16 on this CPU: the transformer's linear layers multiply in f16 (AVX512-FP16's vfmadd231ph; \
                 sums in f16 along runs of {RUN}, in f32 across them); everything else, the VAE included (as diffusers \
                 runs it in f16), computes in f32",
                RUN = pixart_core::linear_f16::RUN
            ));
            return (DType::F32, CpuProducts::F16);
        }
        let why = if Simd::detected() < Simd::best_supported() {
            "PIXART_SIMD keeps this CPU's AVX-512 kernels off".to_string()
        } else {
            format!("this build has no {name} kernels for this CPU")
        };
        warn(&format!(
            "--dtype {name}: computing in f32 on the CPU instead ({why}: every op would convert to f32 and back, \
             about 2x slower per step); the weights take twice the memory of {name}"
        ));
        (DType::F32, CpuProducts::F32)
    }

    /// Hub options from the environment, with the command line's overrides.
    pub fn hub(&self) -> HubOptions {
        let mut hub = HubOptions::from_env();
        hub.offline |= self.offline;
        if self.cache_dir.is_some() {
            hub.cache_dir.clone_from(&self.cache_dir);
        }
        hub
    }

    /// Loads the model with `options`; when the safety checker is what failed, the message says
    /// how to provide it or to run without it.
    pub fn load_pipeline(&self, options: &LoadOptions) -> Result<Pipeline> {
        Pipeline::load(&self.model, options).map_err(|e| {
            let hint = matches!(e, PipelineError::SafetyCheckerUnavailable { .. });
            let err = anyhow::Error::new(e);
            if hint {
                err.context(
                    "no safety checker: let it download once, point --safety-checker at a local folder or a cached \
                     repo, or pass --no-safety-checker to run without one",
                )
            } else {
                err
            }
        })
    }

    /// The library's load options for these flags (the prompt cache at its default).
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = self.device()?;
        let (dtype, cpu_products) = self.precision_for(&device);
        let mut options = LoadOptions::on(device.clone(), dtype);
        options.cpu_products = cpu_products;
        options.text_encoder_device = self.text_encoder_on_cpu.then_some(Device::Cpu);
        options.text_encoder = TextEncoderOptions {
            weights: self.text_encoder.clone(),
            quant: self.text_encoder_quant,
            offload: self.offload,
            cpu_repack: self.text_encoder_repack,
        };
        options.hub = self.hub();
        options.transformer.clone_from(&self.transformer);
        options.clean_caption = self.clean_caption;
        options.safety_checker = (!self.no_safety_checker).then(|| self.safety_checker.clone());
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceArg;

    #[test]
    fn devices_are_named_with_an_optional_gpu_index() {
        let parse = |text: &str| text.parse::<DeviceArg>();
        assert_eq!(parse("cpu"), Ok(DeviceArg::Cpu));
        assert_eq!(parse("cuda"), Ok(DeviceArg::Cuda(0)));
        assert_eq!(parse("cuda:3"), Ok(DeviceArg::Cuda(3)));
        assert_eq!(parse("metal:1"), Ok(DeviceArg::Metal(1)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "CUDA"] {
            let error = parse(bad).expect_err(bad);
            assert!(error.contains(bad), "{error}");
        }
    }
}

/// The `--dtype` spelling of a dtype.
fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// A warning on the log when one is set up (`pixart serve`, `pixart worker`), else on stderr.
fn warn(message: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{message}");
    } else {
        eprintln!("warning: {message}");
    }
}
