//! A 2-D convolution usable in every dtype on every device, with bounded working memory.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};

use crate::conv_cpu::Conv2dRowsCpu;
use crate::conv_winograd::Conv3x3WinogradCpu;
use crate::linear_bf16::{Bf16Kernel, CpuProducts};

/// The largest unfolded input (im2col buffer) one convolution call may build, in bytes. Larger
/// inputs are convolved in bands of output rows; each band reads its rows plus the kernel's halo
/// from the once-padded input, so the result is the same convolution, not an approximation.
/// This keeps the SDXL VAE's 3×3 convolutions at 1024² and 2048² within a bounded footprint
/// (the whole unfolded input would take gigabytes).
pub const IM2COL_BUDGET_BYTES: usize = 256 << 20;

/// A convolution that runs stride-1 layers on the CPU with [`Conv3x3WinogradCpu`] (3×3
/// kernels, whose products follow the [`CpuProducts`]) or [`Conv2dRowsCpu`] (others) in f32 (a
/// bf16 or f16 layer is computed in f32 and rounded back, as a GPU conv accumulates in f32
/// too), and elsewhere with candle's conv2d, splitting large inputs into row bands there (see
/// [`IM2COL_BUDGET_BYTES`]).
#[derive(Debug, Clone)]
pub struct Conv(pub Conv2d, pub CpuProducts);

impl Conv {
    /// `conv` with its products in f32.
    pub fn new(conv: Conv2d) -> Self {
        Self(conv, CpuProducts::F32)
    }
}

impl Conv {
    /// Whether [`Conv2dRowsCpu`] computes this layer for `x`.
    fn runs_rows_cpu(&self, x: &Tensor) -> bool {
        let config = self.0.config();
        x.device().is_cpu() && config.stride == 1 && config.dilation == 1 && config.groups == 1
    }

    /// The layer on the CPU in f32, the result in `x`'s dtype.
    fn forward_rows_cpu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.0.weight().to_dtype(DType::F32)?;
        let bias = match self.0.bias() {
            Some(bias) => bias.to_dtype(DType::F32)?,
            None => Tensor::zeros(weight.dim(0)?, DType::F32, x.device())?,
        };
        let dtype = x.dtype();
        let (x, weight) = (x.to_dtype(DType::F32)?.contiguous()?, weight.contiguous()?);
        let padding = self.0.config().padding;
        let out = if weight.dims()[2..] == [3, 3] {
            x.apply_op3_no_bwd(
                &weight,
                &bias,
                &Conv3x3WinogradCpu { padding, products: self.1, bf16_kernel: Bf16Kernel::chosen() },
            )?
        } else {
            x.apply_op3_no_bwd(&weight, &bias, &Conv2dRowsCpu { padding })?
        };
        out.to_dtype(dtype)
    }

    /// One convolution call through candle, with the CPU-bf16 fallback (candle has no bf16
    /// conv kernel on the CPU).
    fn convolve(conv: &Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let weight = conv.weight().to_dtype(DType::F32)?;
            let bias = conv.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
            let conv = Conv2d::new(weight, bias, *conv.config());
            return conv.forward(&x.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
        }
        conv.forward(x)
    }

    /// The convolution computed `rows` output rows at a time (no dilation or groups; any
    /// stride): each band reads the padded input rows its output rows cover.
    pub fn forward_banded(&self, x: &Tensor, rows: usize) -> candle_core::Result<Tensor> {
        let config = *self.0.config();
        let (p, s) = (config.padding, config.stride.max(1));
        let kernel_h = self.0.weight().dim(2)?;
        let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let padded_h = padded.dim(2)?;
        if padded_h < kernel_h {
            return Self::convolve(&self.0, x);
        }
        let out_h = (padded_h - kernel_h) / s + 1;
        let unpadded =
            Conv2d::new(self.0.weight().clone(), self.0.bias().cloned(), Conv2dConfig { padding: 0, ..config });
        let rows = rows.max(1);
        let mut bands = Vec::with_capacity(out_h.div_ceil(rows));
        for start in (0..out_h).step_by(rows) {
            let len = rows.min(out_h - start);
            // Output rows start..start+len read input rows s·start .. s·(start+len−1) + kernel_h.
            let input = padded.narrow(2, start * s, (len - 1) * s + kernel_h)?;
            bands.push(Self::convolve(&unpadded, &input)?);
        }
        Tensor::cat(&bands, 2)
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.runs_rows_cpu(x) {
            return self.forward_rows_cpu(x);
        }
        let config = self.0.config();
        let (b, c, h, w) = x.dims4()?;
        let (kh, kw) = (self.0.weight().dim(2)?, self.0.weight().dim(3)?);
        let s = config.stride.max(1);
        // One output row unfolds to out_w · c · kh · kw values per image.
        let out_len = |len: usize, k: usize| (len + 2 * config.padding).saturating_sub(k) / s + 1;
        let (out_h, out_w) = (out_len(h, kh), out_len(w, kw));
        let row_bytes = b * out_w * c * kh * kw * x.dtype().size_in_bytes().max(4);
        let bandable = config.dilation == 1 && config.groups == 1 && kh > 1;
        if !bandable || row_bytes * out_h <= IM2COL_BUDGET_BYTES {
            return Self::convolve(&self.0, x);
        }
        self.forward_banded(x, (IM2COL_BUDGET_BYTES / row_bytes).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn banded_convolution_equals_the_whole_one() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let conv = Conv::new(Conv2d::new(weight, Some(bias), Conv2dConfig { padding: 1, ..Default::default() }));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 11, 7), &dev).unwrap();
        let whole = conv.forward(&x).unwrap();
        for rows in [1, 2, 4, 11, 50] {
            let banded = conv.forward_banded(&x, rows).unwrap();
            assert_eq!(banded.dims(), whole.dims());
            let diff = (&banded - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn banded_strided_convolution_equals_the_whole_one() {
        // The VAE encoder's downsampler: 3×3, stride 2, no padding, on odd and even sizes.
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let config = Conv2dConfig { stride: 2, ..Default::default() };
        let conv = Conv::new(Conv2d::new(weight, Some(bias), config));
        for (h, w) in [(12, 9), (13, 8), (3, 5)] {
            let x = Tensor::randn(0f32, 1.0, (1, 3, h, w), &dev).unwrap();
            let whole = conv.0.forward(&x).unwrap();
            for rows in [1, 2, 3, 7] {
                let banded = conv.forward_banded(&x, rows).unwrap();
                assert_eq!(banded.dims(), whole.dims(), "{h}x{w}, {rows} rows");
                let diff = (&banded - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "{h}x{w}, {rows} rows: {diff}");
            }
        }
    }
}
