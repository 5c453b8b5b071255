//! The transformer's linear layers: candle's `Linear`, or on the CPU (when the model is built
//! with [`CpuLinears::Bf16`] and the CPU has AVX512-BF16) products of bf16 operands summed in
//! f32 through [`pixart_core::linear_bf16::LinearBf16`], everything around them staying f32.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use pixart_core::linear_bf16::LinearBf16;

/// How the linear layers multiply on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuLinears {
    /// In the model's dtype (candle's matmul).
    #[default]
    Plain,
    /// f32 inputs and weights rounded to bf16, products summed in f32 (`vdpbf16ps`), where
    /// [`LinearBf16::available`]; elsewhere as [`CpuLinears::Plain`]. The weight is packed once
    /// (half its f32 size) beside the f32 tensor, which stays shared with the loaded weights.
    Bf16,
}

/// One linear layer `[…, in] → […, out]`.
#[derive(Debug, Clone)]
pub struct DitLinear {
    plain: Linear,
    bf16: Option<Arc<LinearBf16>>,
}

impl DitLinear {
    /// `vb`'s `weight` `[out, in]` and, with `bias`, its `bias`.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        kind: CpuLinears,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let plain = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        let weight = plain.weight();
        let packs = kind == CpuLinears::Bf16
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && LinearBf16::available();
        let bf16 = if packs { Some(Arc::new(LinearBf16::new(weight, plain.bias())?)) } else { None };
        Ok(Self { plain, bf16 })
    }

    /// Whether the products run in bf16 ([`CpuLinears::Bf16`] on a CPU that has it).
    pub fn multiplies_in_bf16(&self) -> bool {
        self.bf16.is_some()
    }

    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bf16 {
            Some(packed) if x.device().is_cpu() && x.dtype() == DType::F32 => packed.forward(x),
            _ => self.plain.forward(x),
        }
    }
}
