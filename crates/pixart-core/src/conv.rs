//! A 2-D convolution usable in every dtype on every device.

use candle_core::{DType, Module, Tensor};
use candle_nn::Conv2d;

/// A convolution that also runs in bf16 on the CPU, where candle has no bf16 conv kernel: that
/// layer is computed in f32 and its output rounded back to bf16 (a GPU bf16 conv accumulates in
/// f32 too), so activations are stored in bf16 between layers as on a GPU.
#[derive(Debug, Clone)]
pub struct Conv(pub Conv2d);

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::BF16 && x.device().is_cpu() {
            let weight = self.0.weight().to_dtype(DType::F32)?;
            let bias = self.0.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
            let conv = Conv2d::new(weight, bias, *self.0.config());
            return conv.forward(&x.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
        }
        self.0.forward(x)
    }
}
