//! GELU (tanh) and SiLU that run on the CPU in f32 with the vectorised kernels of
//! [`crate::fast_math`] (as candle `CustomOp1`s), and as candle's own ops everywhere else.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::fast_math::contiguous_f32;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// An elementwise f32 kernel as a candle op.
#[derive(Clone, Copy)]
struct Elementwise {
    name: &'static str,
    kernel: fn(&[f32], &mut [std::mem::MaybeUninit<f32>]),
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name)?;
        // SAFETY: the elementwise kernels write every element of `dst`.
        let dst = unsafe {
            crate::buffers::par_written(src.len(), CHUNK, |i, dst| {
                (self.kernel)(&src[i * CHUNK..i * CHUNK + dst.len()], dst);
            })
        };
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn apply(
    x: &Tensor,
    op: Elementwise,
    fallback: fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    fallback(x)
}

/// GELU with the tanh approximation (torch's `gelu(approximate="tanh")`, candle's `gelu`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    apply(x, Elementwise { name: "gelu-tanh-cpu", kernel: crate::fast_math::gelu_tanh_slice }, Tensor::gelu)
}

/// SiLU, `x · sigmoid(x)`.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    apply(x, Elementwise { name: "silu-cpu", kernel: crate::fast_math::silu_slice }, Tensor::silu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn equal_candles_ops() {
        let x = Tensor::randn(0f32, 3.0, (3, 5, 4099), &Device::Cpu).unwrap();
        assert!(max_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap()) < 5e-6);
        assert!(max_diff(&silu(&x).unwrap(), &x.silu().unwrap()) < 5e-6);
        // Non-contiguous input and other dtypes take the same results / candle's path.
        let t = x.transpose(1, 2).unwrap();
        assert!(max_diff(&gelu_tanh(&t).unwrap(), &t.gelu().unwrap()) < 5e-6);
        let h = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(gelu_tanh(&h).unwrap().dtype(), DType::BF16);
    }
}
