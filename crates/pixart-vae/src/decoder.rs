//! The decoder half of `AutoencoderKL`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, GroupNorm, Linear, VarBuilder};
use pixart_core::activation::silu;
use pixart_core::attention::scaled_dot_product_attention;
use pixart_core::conv::Conv;
use pixart_core::WeightsError;

use crate::config::VaeConfig;
use crate::VaeError;

const EPS: f64 = 1e-6;

fn conv3x3(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    Ok(Conv(candle_nn::conv2d(i, o, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)?))
}

fn conv1x1(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    Ok(Conv(candle_nn::conv2d(i, o, 1, Default::default(), vb)?))
}

/// `GroupNorm → SiLU → conv → GroupNorm → SiLU → conv`, plus a 1×1 shortcut when widths differ.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(i: usize, o: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: candle_nn::group_norm(groups, i, EPS, vb.pp("norm1"))?,
            conv1: conv3x3(i, o, vb.pp("conv1"))?,
            norm2: candle_nn::group_norm(groups, o, EPS, vb.pp("norm2"))?,
            conv2: conv3x3(o, o, vb.pp("conv2"))?,
            shortcut: if i != o { Some(conv1x1(i, o, vb.pp("conv_shortcut"))?) } else { None },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head spatial self-attention with a residual.
#[derive(Debug, Clone)]
struct SpatialAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: candle_nn::group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(c, c, vb.pp("to_q"))?,
            to_k: candle_nn::linear(c, c, vb.pp("to_k"))?,
            to_v: candle_nn::linear(c, c, vb.pp("to_v"))?,
            to_out: candle_nn::linear(c, c, vb.pp("to_out").pp("0"))?,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?; // [B, HW, C]
        let heads = |t: Tensor| t.unsqueeze(1); // one head: [B, 1, HW, C]
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        let out = scaled_dot_product_attention(&q, &k, &v, None, 1.0 / (c as f64).sqrt())?.squeeze(1)?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

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
    mid_resnet_1: ResnetBlock,
    mid_attention: Option<SpatialAttention>,
    mid_resnet_2: ResnetBlock,
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
        let config: VaeConfig =
            pixart_core::load_checked_config::<_, VaeError>(&dir.join("config.json"), VaeConfig::validate)?;
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
        let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let dec = vb.pp("decoder");
        let mid = dec.pp("mid_block");
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &out) in channels.iter().enumerate() {
            let ub = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| ResnetBlock::new(if j == 0 { prev } else { out }, out, g, ub.pp(format!("resnets.{j}"))))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample =
                if i + 1 < channels.len() { Some(conv3x3(out, out, ub.pp("upsamplers.0.conv"))?) } else { None };
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
            conv_in: conv3x3(latent, top, dec.pp("conv_in"))?,
            mid_resnet_1: ResnetBlock::new(top, top, g, mid.pp("resnets.0"))?,
            mid_attention: if config.mid_block_add_attention {
                Some(SpatialAttention::new(top, g, mid.pp("attentions.0"))?)
            } else {
                None
            },
            mid_resnet_2: ResnetBlock::new(top, top, g, mid.pp("resnets.1"))?,
            up_blocks,
            norm_out: candle_nn::group_norm(g, bottom, EPS, dec.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, config.out_channels, dec.pp("conv_out"))?,
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
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnet_1.forward(&x)?;
        if let Some(attention) = &self.mid_attention {
            x = attention.forward(&x)?;
        }
        x = self.mid_resnet_2.forward(&x)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        Ok(self.conv_out.forward(&silu(&self.norm_out.forward(&x)?)?)?)
    }
}
