//! `y = x · Wᵀ + b` on the CPU in f32 with the bias folded into the matrix product: the output
//! rows start as the bias (written by the cores that then compute them) and the GEMM (the `gemm`
//! crate on every core) accumulates onto them. candle's `Linear` writes the product, then reads
//! it back to add the bias into a second buffer: one more pass over the output and one more
//! allocation, a few percent of a transformer step.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_math::contiguous_f32;

/// Output rows per parallel task that writes the bias.
const ROWS_PER_TASK: usize = 64;

/// The op, holding the bias (`[out]`, or empty); inputs `x` `[…, in]` and the weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct LinearF32Cpu {
    bias: Vec<f32>,
}

impl LinearF32Cpu {
    /// The op for a layer with `bias` `[out]` (None: no bias).
    pub fn new(bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        Ok(Self { bias })
    }

    /// Whether [`Self::forward`] takes `x` and `weight`: f32 tensors on the CPU.
    pub fn runs(x: &Tensor, weight: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 && weight.device().is_cpu()
    }

    /// `x · weightᵀ + bias`, `x` `[…, in]`, `weight` `[out, in]` (see [`Self::runs`]).
    pub fn forward(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, self)
    }
}

impl CustomOp2 for LinearF32Cpu {
    fn name(&self) -> &'static str {
        "linear-f32-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(s1, l1, "linear-f32-cpu")?, contiguous_f32(s2, l2, "linear-f32-cpu")?);
        let (n, k) = l2.shape().dims2()?;
        let dims = l1.dims();
        if dims.last() != Some(&k) || (!self.bias.is_empty() && self.bias.len() != n) {
            candle_core::bail!(
                "linear-f32-cpu: x {:?}, weight {:?}, bias of {}",
                l1.shape(),
                l2.shape(),
                self.bias.len()
            )
        }
        let m = x.len() / k.max(1);
        let mut out = crate::buffers::unwritten(m * n);
        if !self.bias.is_empty() {
            out.par_chunks_mut((ROWS_PER_TASK * n).max(1)).for_each(|rows| {
                for row in rows.chunks_exact_mut(n) {
                    row.iter_mut().zip(&self.bias).for_each(|(o, &b)| {
                        o.write(b);
                    });
                }
            });
        } else if k == 0 {
            out.iter_mut().for_each(|o| {
                o.write(0.0);
            });
        }
        if m > 0 && n > 0 && k > 0 {
            // SAFETY: `out` is m × n row-major, `x` m × k row-major, `w` n × k row-major read as
            // its transpose (element (kk, j) at j·k + kk); all inside their slices.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr().cast::<f32>(),
                    1,
                    n as isize,
                    !self.bias.is_empty(),
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        }
        // SAFETY: with a bias, every row was set to it; without one, zeros were written (k = 0)
        // or the GEMM, told not to read `out`, wrote every element.
        let out = unsafe { crate::buffers::assume_written(out) };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};

    use super::*;

    /// Against candle's `Linear` (matmul, then the bias), with and without a bias, for row
    /// counts off the task size and a batch dimension.
    #[test]
    fn equals_candles_linear() {
        let dev = Device::Cpu;
        for (shape, k, n) in [(vec![2, 130, 48], 48, 70), (vec![5, 33], 33, 16), (vec![1, 1, 7], 7, 3)] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            for bias in [Some(&b), None] {
                let want = candle_nn::Linear::new(w.clone(), bias.cloned()).forward(&x).unwrap();
                let ours = LinearF32Cpu::new(bias).unwrap().forward(&x, &w).unwrap();
                assert_eq!(ours.dims(), want.dims());
                let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{shape:?} bias {}: {diff}", bias.is_some());
            }
        }
        let bad = LinearF32Cpu::new(Some(&Tensor::zeros(3, DType::F32, &dev).unwrap())).unwrap();
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(bad.forward(&x, &Tensor::zeros((5, 4), DType::F32, &dev).unwrap()).is_err());
    }
}
