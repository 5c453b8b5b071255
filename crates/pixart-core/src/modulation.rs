//! adaLN-single's modulation on the CPU in f32, one pass per row: LayerNorm over the last
//! dimension (no affine parameters) followed by `· (1 + scale) + shift`, and the gated residual
//! `x + y · gate`. The compositions (mean, centre, square, mean, add, sqrt, divide, multiply, add;
//! multiply, add) read and write the whole activation once per op and allocate as many
//! temporaries; these ops write it once. Off the CPU, or in another dtype, they answer `None` and
//! the caller composes.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_math::{contiguous_f32, gated_add_rows, modulated_layer_norm_rows};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// Which modulation the op computes; inputs `(x, a, b)`, `x` `[B, …, D]`, `a` and `b` `[R, D]`
/// with `R` 1 or `B`.
#[derive(Debug, Clone, Copy)]
enum Modulation {
    /// `layer_norm(x) · a + b` (`a` already `1 + scale`).
    LayerNorm { eps: f32 },
    /// `x + a · b` (`a` is `y`, shaped as `x`; `b` the gate).
    GatedResidual,
}

impl Modulation {
    /// `f(batch row, its x rows, its output rows)` over every batch row, in parallel, in tasks
    /// of [`ROWS_PER_TASK`] rows.
    fn each_batch_row(
        x: &[f32],
        (batch, dim): (usize, usize),
        out: &mut [MaybeUninit<f32>],
        f: impl Fn(usize, std::ops::Range<usize>, &mut [MaybeUninit<f32>]) + Sync,
    ) {
        let per_batch = (x.len() / dim / batch).max(1) * dim;
        let chunk = ROWS_PER_TASK.min(per_batch / dim) * dim;
        out.par_chunks_mut(per_batch).enumerate().for_each(|(b, dst)| {
            dst.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| {
                let start = b * per_batch + i * chunk;
                f(b, start..start + dst.len(), dst);
            });
        });
    }
}

impl CustomOp3 for Modulation {
    fn name(&self) -> &'static str {
        match self {
            Modulation::LayerNorm { .. } => "modulated-layer-norm-cpu",
            Modulation::GatedResidual => "gated-residual-cpu",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, a, b) = (contiguous_f32(s1, l1, name)?, contiguous_f32(s2, l2, name)?, contiguous_f32(s3, l3, name)?);
        let dims = l1.dims();
        let (batch, dim) = (dims.first().copied().unwrap_or(1).max(1), dims.last().copied().unwrap_or(1).max(1));
        let params = b.len() / dim;
        let a_fits = match self {
            Modulation::LayerNorm { .. } => a.len() == b.len(),
            Modulation::GatedResidual => a.len() == x.len(),
        };
        if !a_fits || b.len() % dim != 0 || !(params == 1 || params == batch) {
            candle_core::bail!("{name}: inputs {:?}, {:?}, {:?} do not fit", l1.shape(), l2.shape(), l3.shape())
        }
        fn row_of(p: &[f32], b: usize, dim: usize, params: usize) -> &[f32] {
            let b = if params == 1 { 0 } else { b };
            &p[b * dim..(b + 1) * dim]
        }
        let mut out = crate::buffers::unwritten(x.len());
        match *self {
            Modulation::LayerNorm { eps } => Self::each_batch_row(x, (batch, dim), &mut out, |i, rows, dst| {
                modulated_layer_norm_rows(&x[rows], dst, dim, row_of(a, i, dim, params), row_of(b, i, dim, params), eps)
            }),
            Modulation::GatedResidual => Self::each_batch_row(x, (batch, dim), &mut out, |i, rows, dst| {
                gated_add_rows(&x[rows.clone()], &a[rows], dst, dim, row_of(b, i, dim, params))
            }),
        }
        // SAFETY: the tasks cover every row of every batch row, and both row kernels write
        // every element of the rows they are given.
        let out = unsafe { crate::buffers::assume_written(out) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `[R, D]` f32 contiguous parameter rows from a tensor broadcastable from `[R, 1, D]`.
fn parameter_rows(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let rows = t.elem_count() / dim.max(1);
    t.to_dtype(DType::F32)?.reshape((rows, dim))?.contiguous()
}

/// Whether the CPU ops take `x`.
fn runs_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2
}

/// `layer_norm(x) · (1 + scale) + shift` on the CPU in f32, `x` `[B, …, D]`, `scale` and `shift`
/// broadcastable from `[R, 1, D]` (`R` 1 or `B`); `None` when `x` is not an f32 CPU tensor.
pub fn modulated_layer_norm_cpu(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !runs_on_cpu(x) {
        return Ok(None);
    }
    let dim = x.dim(candle_core::D::Minus1)?;
    let (scale, shift) = (parameter_rows(&(scale + 1.0)?, dim)?, parameter_rows(shift, dim)?);
    let op = Modulation::LayerNorm { eps: eps as f32 };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&scale, &shift, &op)?))
}

/// `x + y · gate` on the CPU in f32, `x` and `y` `[B, …, D]`, `gate` broadcastable from
/// `[R, 1, D]` (`R` 1 or `B`); `None` when `x` is not an f32 CPU tensor or `y` differs in shape.
pub fn gated_residual_cpu(x: &Tensor, y: &Tensor, gate: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !runs_on_cpu(x) || y.dims() != x.dims() || y.dtype() != DType::F32 {
        return Ok(None);
    }
    let gate = parameter_rows(gate, x.dim(candle_core::D::Minus1)?)?;
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &gate, &Modulation::GatedResidual)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::canary::{nans, values};
    use crate::fast_math::{gated_add_rows_at, modulated_layer_norm_rows_at, Simd};
    use candle_core::{Device, D};

    fn composed(x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        normed.broadcast_mul(&(scale + 1.0).unwrap()).unwrap().broadcast_add(shift).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// One parameter row for the batch and one per batch row; off-centre inputs; a strided
    /// input; a width with a remainder for every vector size.
    #[test]
    fn equals_the_composition() {
        let dev = Device::Cpu;
        for (b, n, d, r) in [(2, 70, 384, 2), (2, 5, 37, 1), (1, 1, 8, 1), (3, 40, 72, 3)] {
            let x = (Tensor::randn(0f32, 2.0, (b, n, d), &dev).unwrap() + 5.0).unwrap();
            let scale = Tensor::randn(0f32, 0.5, (r, 1, d), &dev).unwrap();
            let shift = Tensor::randn(0f32, 0.5, (r, 1, d), &dev).unwrap();
            let ours = modulated_layer_norm_cpu(&x, &scale, &shift, 1e-6).unwrap().unwrap();
            let want = composed(&x, &scale, &shift, 1e-6);
            assert!(max_diff(&ours, &want) < 2e-5, "{b} {n} {d} {r}: {}", max_diff(&ours, &want));
        }
        let x = Tensor::randn(0f32, 1.0, (2, 16, 6), &dev).unwrap().transpose(1, 2).unwrap();
        let (scale, shift) =
            (Tensor::ones((1, 1, 16), DType::F32, &dev).unwrap(), Tensor::zeros((1, 1, 16), DType::F32, &dev).unwrap());
        let ours = modulated_layer_norm_cpu(&x, &scale, &shift, 1e-6).unwrap().unwrap();
        assert!(max_diff(&ours, &composed(&x, &scale, &shift, 1e-6)) < 2e-5);
        assert!(modulated_layer_norm_cpu(&x.to_dtype(DType::BF16).unwrap(), &scale, &shift, 1e-6).unwrap().is_none());
    }

    #[test]
    fn the_gated_residual_equals_the_composition() {
        let dev = Device::Cpu;
        for (b, n, d, r) in [(2, 70, 384, 2), (2, 5, 37, 1), (3, 40, 72, 3)] {
            let x = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let gate = Tensor::randn(0f32, 1.0, (r, 1, d), &dev).unwrap();
            let ours = gated_residual_cpu(&x, &y, &gate).unwrap().unwrap();
            let want = (&x + y.broadcast_mul(&gate).unwrap()).unwrap();
            assert!(max_diff(&ours, &want) < 1e-6, "{b} {n} {d} {r}");
        }
        let x = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let other = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap();
        assert!(gated_residual_cpu(&x, &other, &Tensor::zeros((1, 1, 4), DType::F32, &dev).unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn every_simd_level_normalises_alike() {
        let dim = 45;
        let src: Vec<f32> = (0..3 * dim).map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.3 + 7.0).collect();
        let scale: Vec<f32> = (0..dim).map(|i| 1.0 + i as f32 * 0.01).collect();
        let shift: Vec<f32> = (0..dim).map(|i| i as f32 * -0.02).collect();
        for level in Simd::supported() {
            let mut out = nans(src.len());
            modulated_layer_norm_rows_at(level, &src, &mut out, dim, &scale, &shift, 1e-6);
            let dst = values(&out);
            for (row, out) in src.chunks(dim).zip(dst.chunks(dim)) {
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
                let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / dim as f64;
                for (j, (&v, &o)) in row.iter().zip(out).enumerate() {
                    let want = (f64::from(v) - mean) / (var + 1e-6).sqrt() * f64::from(scale[j]) + f64::from(shift[j]);
                    assert!((f64::from(o) - want).abs() < 1e-5, "{level:?} [{j}]: {o} vs {want}");
                }
            }
            let mut out = nans(src.len());
            gated_add_rows_at(level, &src, &src, &mut out, dim, &scale);
            let dst = values(&out);
            for (i, (&v, &o)) in src.iter().zip(&dst).enumerate() {
                assert_eq!(o, v + v * scale[i % dim], "{level:?} gated add [{i}]");
            }
        }
    }
}
