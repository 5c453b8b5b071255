//! The blocks both halves of `AutoencoderKL` are made of: ResNets, the mid block's spatial
//! self-attention, and the convolutions they use.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use pixart_core::attention::scaled_dot_product_attention;
use pixart_core::conv::Conv;
use pixart_core::group_norm::GroupNorm;
use pixart_core::linear_bf16::CpuProducts;

/// GroupNorm epsilon of every VAE norm.
pub(crate) const EPS: f64 = 1e-6;

pub(crate) fn conv3x3(i: usize, o: usize, products: CpuProducts, vb: VarBuilder) -> candle_core::Result<Conv> {
    Ok(Conv(candle_nn::conv2d(i, o, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)?, products))
}

pub(crate) fn conv1x1(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    Ok(Conv::new(candle_nn::conv2d(i, o, 1, Default::default(), vb)?))
}

/// `GroupNorm → SiLU → conv → GroupNorm → SiLU → conv`, plus a 1×1 shortcut when widths differ.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    pub(crate) fn new(
        (i, o): (usize, usize),
        groups: usize,
        products: CpuProducts,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, i, EPS, vb.pp("norm1"))?,
            conv1: conv3x3(i, o, products, vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, o, EPS, vb.pp("norm2"))?,
            conv2: conv3x3(o, o, products, vb.pp("conv2"))?,
            shortcut: if i != o { Some(conv1x1(i, o, vb.pp("conv_shortcut"))?) } else { None },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Each intermediate is dropped as soon as the next exists: at 2048² each is 2 GiB.
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let normed = self.norm2.forward_silu(&h)?;
        drop(h);
        let h = self.conv2.forward(&normed)?;
        drop(normed);
        match &self.shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head spatial self-attention with a residual.
#[derive(Debug, Clone)]
pub(crate) struct SpatialAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    pub(crate) fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, c, EPS, vb.pp("group_norm"))?,
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

/// The mid block: ResNet, spatial self-attention (unless the config leaves it out), ResNet.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnet_1: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet_2: ResnetBlock,
}

impl MidBlock {
    /// `{encoder,decoder}.mid_block.*` of width `c`.
    pub(crate) fn new(
        c: usize,
        groups: usize,
        attention: bool,
        products: CpuProducts,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            resnet_1: ResnetBlock::new((c, c), groups, products, vb.pp("resnets.0"))?,
            attention: if attention { Some(SpatialAttention::new(c, groups, vb.pp("attentions.0"))?) } else { None },
            resnet_2: ResnetBlock::new((c, c), groups, products, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.resnet_1.forward(x)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(&x)?;
        }
        self.resnet_2.forward(&x)
    }
}
