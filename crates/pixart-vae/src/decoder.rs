//! The decoder half of `AutoencoderKL`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use pixart_core::conv::Conv;
use pixart_core::group_norm::GroupNorm;
use pixart_core::linear_bf16::CpuProducts;
use pixart_core::WeightsError;

use crate::blocks::{conv1x1, conv3x3, MidBlock, ResnetBlock, EPS};
use crate::config::VaeConfig;
use crate::VaeError;

/// One decoder level: ResNets, then nearest 2× upsampling and a conv (all but the last level).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv>,
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = x.dims4()?;
            x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
        }
        Ok(x)
    }
}

/// The SDXL VAE decoder.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    dtype: DType,
}

impl VaeDecoder {
    /// Loads `vae/` (`config.json` + `diffusion_pytorch_model.safetensors`); only the decoder's
    /// weights are read, in [`VaeConfig::compute_dtype`] of `dtype` (f16 becomes f32 under
    /// `force_upcast`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, VaeError> {
        Self::load_with(dir, dtype, CpuProducts::F32, device)
    }

    /// As [`Self::load`], the 3×3 convolutions' products on the CPU following `products`
    /// ([`VaeConfig::cpu_products`]).
    pub fn load_with(dir: &Path, dtype: DType, products: CpuProducts, device: &Device) -> Result<Self, VaeError> {
        let mut config: VaeConfig =
            pixart_core::load_checked_config::<_, VaeError>(&dir.join("config.json"), VaeConfig::validate)?;
        config.cpu_products = products;
        let vb = pixart_core::var_builder(dir, "diffusion_pytorch_model", config.compute_dtype(dtype), device)?;
        Self::new(&config, vb).map_err(|e| match e {
            VaeError::Candle(source) => WeightsError::tensor(dir, source).into(),
            other => other,
        })
    }

    /// Builds the decoder from its config and weights (`post_quant_conv.*`, `decoder.*`).
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self, VaeError> {
        config.validate()?;
        let g = config.norm_num_groups;
        let latent = config.latent_channels;
        let products = config.cpu_products;
        let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let dec = vb.pp("decoder");
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &out) in channels.iter().enumerate() {
            let ub = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let width = (if j == 0 { prev } else { out }, out);
                    ResnetBlock::new(width, g, products, ub.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < channels.len() {
                Some(conv3x3(out, out, products, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let bottom = config.block_out_channels[0];
        Ok(Self {
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv1x1(latent, latent, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            conv_in: conv3x3(latent, top, products, dec.pp("conv_in"))?,
            mid: MidBlock::new(top, g, config.mid_block_add_attention, products, dec.pp("mid_block"))?,
            up_blocks,
            norm_out: GroupNorm::new(g, bottom, EPS, dec.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, config.out_channels, products, dec.pp("conv_out"))?,
            dtype: vb.dtype(),
            config: config.clone(),
        })
    }

    /// The VAE's config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes denoised latents as the pipeline holds them: divides by `scaling_factor` (and adds
    /// `shift_factor`), then [`Self::decode`].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor, VaeError> {
        let mut z = (latents.to_dtype(DType::F32)? / self.config.scaling_factor)?;
        if let Some(shift) = self.config.shift_factor {
            z = (z + shift)?;
        }
        self.decode(&z)
    }

    /// `AutoencoderKL.decode(z)`: `[B, latent, h, w]` → `[B, out_channels, 8h, 8w]` in the
    /// weights' dtype, nominally in [−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        let (_, c, h, w) =
            z.dims4().map_err(|_| VaeError::Input(format!("latents must be [B, C, h, w], got {:?}", z.dims())))?;
        if c != self.config.latent_channels || h == 0 || w == 0 {
            return Err(VaeError::Input(format!(
                "latents must have {} channels and a non-empty size, got {:?}",
                self.config.latent_channels,
                z.dims()
            )));
        }
        let mut x = z.to_dtype(self.dtype)?;
        if let Some(conv) = &self.post_quant_conv {
            x = conv.forward(&x)?;
        }
        x = self.mid.forward(&self.conv_in.forward(&x)?)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        Ok(self.conv_out.forward(&self.norm_out.forward_silu(&x)?)?)
    }
}
