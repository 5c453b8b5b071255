//! The encoder half of `AutoencoderKL` (diffusers' `Encoder` + `quant_conv`): an image in
//! [−1, 1] to the moments of the latent posterior.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use pixart_core::conv::Conv;
use pixart_core::group_norm::GroupNorm;
use pixart_core::WeightsError;

use crate::blocks::{conv1x1, conv3x3, MidBlock, ResnetBlock, EPS};
use crate::config::VaeConfig;
use crate::posterior::DiagonalGaussian;
use crate::VaeError;

/// diffusers' `Downsample2D` with `padding=0`: zero-pad one row and column at the bottom and
/// right, then a 3×3 convolution of stride 2.
#[derive(Debug, Clone)]
struct Downsample(Conv);

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
    }
}

/// One encoder level: ResNets, then the downsampler (all but the last level).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.downsample {
            Some(downsample) => downsample.forward(&x),
            None => Ok(x),
        }
    }
}

/// The SDXL VAE encoder.
///
/// ```text
/// conv_in → down blocks (layers_per_block ResNets each, pad + 3×3/2 conv on all but the last)
///   → mid (ResNet, 1-head attention, ResNet) → GroupNorm → SiLU → conv_out (2·latent)
///   → quant_conv 1×1                                       moments [B, 2·latent, H/8, W/8]
/// ```
///
/// Convolutions run banded on large inputs (`pixart_core::conv`), so a 2048² image encodes
/// without unfolding whole layers.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv,
    down_blocks: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
    dtype: DType,
}

impl VaeEncoder {
    /// Loads the encoder of `vae/` (`config.json` + `diffusion_pytorch_model.safetensors`) in
    /// [`VaeConfig::compute_dtype`] of `dtype`; `None` when the weights hold no encoder (a
    /// decoder-only VAE).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Option<Self>, VaeError> {
        let config: VaeConfig =
            pixart_core::load_checked_config::<_, VaeError>(&dir.join("config.json"), VaeConfig::validate)?;
        let vb = pixart_core::var_builder(dir, "diffusion_pytorch_model", config.compute_dtype(dtype), device)?;
        if !vb.contains_tensor("encoder.conv_in.weight") {
            return Ok(None);
        }
        Self::new(&config, vb).map(Some).map_err(|e| match e {
            VaeError::Candle(source) => WeightsError::tensor(dir, source).into(),
            other => other,
        })
    }

    /// Builds the encoder from its config and weights (`encoder.*`, `quant_conv.*`).
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self, VaeError> {
        config.validate()?;
        let g = config.norm_num_groups;
        let products = config.cpu_products;
        let channels = &config.block_out_channels;
        let enc = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut prev = channels[0];
        for (i, &out) in channels.iter().enumerate() {
            let db = enc.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let width = (if j == 0 { prev } else { out }, out);
                    ResnetBlock::new(width, g, products, db.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() {
                let stride_two = Conv2dConfig { stride: 2, ..Default::default() };
                Some(Downsample(Conv::new(candle_nn::conv2d(out, out, 3, stride_two, db.pp("downsamplers.0.conv"))?)))
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, downsample });
            prev = out;
        }
        let top = prev;
        let moments = 2 * config.latent_channels;
        Ok(Self {
            conv_in: conv3x3(config.in_channels, channels[0], products, enc.pp("conv_in"))?,
            down_blocks,
            mid: MidBlock::new(top, g, config.mid_block_add_attention, products, enc.pp("mid_block"))?,
            norm_out: GroupNorm::new(g, top, EPS, enc.pp("conv_norm_out"))?,
            conv_out: conv3x3(top, moments, products, enc.pp("conv_out"))?,
            quant_conv: if config.use_quant_conv {
                Some(conv1x1(moments, moments, vb.pp("quant_conv"))?)
            } else {
                None
            },
            dtype: vb.dtype(),
            config: config.clone(),
        })
    }

    /// The VAE's config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `AutoencoderKL.encode(image).latent_dist`: `[B, in_channels, H, W]` in [−1, 1] to the
    /// posterior over `[B, latent, ⌈H/8⌉, ⌈W/8⌉]` latents (before `scaling_factor`), in f32.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian, VaeError> {
        let (_, c, h, w) = image
            .dims4()
            .map_err(|_| VaeError::Input(format!("images must be [B, C, H, W], got {:?}", image.dims())))?;
        if c != self.config.in_channels || h == 0 || w == 0 {
            return Err(VaeError::Input(format!(
                "images must have {} channels and a non-empty size, got {:?}",
                self.config.in_channels,
                image.dims()
            )));
        }
        let mut x = self.conv_in.forward(&image.to_dtype(self.dtype)?)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        x = self.mid.forward(&x)?;
        let mut moments = self.conv_out.forward(&self.norm_out.forward_silu(&x)?)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments.to_dtype(DType::F32)?)
    }

    /// Latents as the pipeline holds them from a posterior sample `z`: `z · scaling_factor`
    /// (`(z − shift_factor) · scaling_factor` when the config has a shift), the inverse of
    /// [`crate::VaeDecoder::decode_latents`]'s scaling.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        let z = z.to_dtype(DType::F32)?;
        let z = match self.config.shift_factor {
            Some(shift) => (z - shift)?,
            None => z,
        };
        Ok((z * self.config.scaling_factor)?)
    }
}
