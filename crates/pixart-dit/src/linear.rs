//! The transformer's linear layers: candle's `Linear` on a GPU; on the CPU in f32,
//! [`LinearF32Cpu`] (the bias folded into the product); on the CPU when the model is built with
//! [`CpuProducts::Bf16`] and the CPU has AVX512-BF16, products of bf16 operands summed in f32
//! through [`LinearBf16`], and with [`CpuProducts::F16`] on a CPU with AVX512-FP16, products of
//! f16 operands through [`LinearF16`]; everything around them stays f32. The weight is then
//! packed once (half its f32 size) beside the f32 tensor, which stays shared with the loaded
//! weights; layers of one input can run in one op ([`DitLinear::forward_side_by_side`]). In f32
//! on the CPU the weight is used column-major ([`column_major`]; the loaded weights already are,
//! so nothing is copied).

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use pixart_core::linear_bf16::{CpuProducts, LinearBf16};
use pixart_core::linear_f16::LinearF16;
use pixart_core::linear_f32::{column_major, LinearF32Cpu};

/// One linear layer `[…, in] → […, out]`.
#[derive(Debug, Clone)]
pub struct DitLinear {
    plain: Linear,
    packed: Option<Packed>,
    f32_cpu: Arc<LinearF32Cpu>,
}

/// A weight packed for products in half precision on the CPU.
#[derive(Debug, Clone)]
enum Packed {
    Bf16(Arc<LinearBf16>),
    F16(Arc<LinearF16>),
}

impl Packed {
    fn as_bf16(&self) -> Option<&LinearBf16> {
        match self {
            Packed::Bf16(layer) => Some(layer),
            Packed::F16(_) => None,
        }
    }

    fn as_f16(&self) -> Option<&LinearF16> {
        match self {
            Packed::F16(layer) => Some(layer),
            Packed::Bf16(_) => None,
        }
    }
}

impl DitLinear {
    /// `vb`'s `weight` `[out, in]` and, with `bias`, its `bias`.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        kind: CpuProducts,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let plain = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        Self::from_tensors(plain.weight(), plain.bias(), kind)
    }

    /// The layer of `weight` `[out, in]` and `bias` `[out]`.
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>, kind: CpuProducts) -> candle_core::Result<Self> {
        let packs = kind.packs_weights() && weight.device().is_cpu() && weight.dtype() == DType::F32;
        let (plain, packed) = match kind {
            _ if !packs => (Linear::new(column_major(weight)?, bias.cloned()), None),
            CpuProducts::F16 => {
                (Linear::new(weight.clone(), bias.cloned()), Some(Packed::F16(Arc::new(LinearF16::new(weight, bias)?))))
            }
            _ => (
                Linear::new(weight.clone(), bias.cloned()),
                Some(Packed::Bf16(Arc::new(LinearBf16::new(weight, bias)?))),
            ),
        };
        let f32_cpu = Arc::new(LinearF32Cpu::new(plain.bias())?);
        Ok(Self { plain, packed, f32_cpu })
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.plain.bias()
    }

    /// Whether the products run in bf16 ([`CpuProducts::Bf16`] on a CPU that has it).
    pub fn multiplies_in_bf16(&self) -> bool {
        matches!(self.packed, Some(Packed::Bf16(_)))
    }

    /// Whether the products run in f16 ([`CpuProducts::F16`] on a CPU that has it).
    pub fn multiplies_in_f16(&self) -> bool {
        matches!(self.packed, Some(Packed::F16(_)))
    }

    /// `x` `[…, in]` through each of `layers` → `[…, Σ out]` in one product, their outputs side
    /// by side, where the layers multiply in the same half precision on the CPU (the bf16 or
    /// f16 op runs them together, the input rounded once) and `x` is f32 on the CPU; `None`
    /// otherwise.
    pub fn forward_side_by_side(layers: &[&DitLinear], x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !(Self::multiply_side_by_side(layers) && x.device().is_cpu() && x.dtype() == DType::F32) {
            return Ok(None);
        }
        let bf16: Option<Vec<&LinearBf16>> = layers.iter().map(|l| l.packed.as_ref()?.as_bf16()).collect();
        if let Some(bf16) = bf16 {
            return LinearBf16::forward_side_by_side(&bf16, x).map(Some);
        }
        let f16: Option<Vec<&LinearF16>> = layers.iter().map(|l| l.packed.as_ref()?.as_f16()).collect();
        match f16 {
            Some(f16) => LinearF16::forward_side_by_side(&f16, x).map(Some),
            None => Ok(None),
        }
    }

    /// Whether [`Self::forward_side_by_side`] runs `layers` in one product (given an f32 input
    /// on the CPU): all of them multiply in bf16 with one kernel, or all in f16, with inputs
    /// of one width.
    pub fn multiply_side_by_side(layers: &[&DitLinear]) -> bool {
        let Some(first) = layers.first() else { return false };
        let width = first.plain.weight().dim(1).ok();
        layers.iter().all(|l| {
            let same_width = l.plain.weight().dim(1).ok() == width;
            let alike = match (&l.packed, &first.packed) {
                (Some(Packed::Bf16(a)), Some(Packed::Bf16(b))) => a.kernel() == b.kernel(),
                (Some(Packed::F16(_)), Some(Packed::F16(_))) => true,
                _ => false,
            };
            same_width && alike
        })
    }

    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let on_cpu_in_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        match &self.packed {
            Some(Packed::Bf16(packed)) if on_cpu_in_f32 => packed.forward(x),
            Some(Packed::F16(packed)) if on_cpu_in_f32 => packed.forward(x),
            _ if LinearF32Cpu::runs(x, self.plain.weight()) => self.f32_cpu.forward(x, self.plain.weight()),
            _ => self.plain.forward(x),
        }
    }
}
