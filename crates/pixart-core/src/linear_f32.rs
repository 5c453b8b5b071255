//! `y = x · Wᵀ + b` on the CPU in f32 with the bias folded into the matrix product (candle's
//! `Linear` writes the product, then reads it back to add the bias into a second buffer: one more
//! pass over the output and one more allocation, a few percent of a transformer step).
//!
//! The product runs through the `gemm` crate on every core, accumulating onto output rows first
//! set to the bias. The weight is best stored column-major ([`column_major`]: `[out, in]` whose
//! storage is its transpose): the `gemm` crate then reads it without first repacking it on the
//! calling thread alone (up to 9% of a 1536→384 layer on a 2-core AVX-512 Xeon).

use std::mem::MaybeUninit;

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

    /// `x · weightᵀ + bias`, `x` `[…, in]`, `weight` `[out, in]` (see [`Self::runs`]), row- or
    /// column-major (other layouts are copied first).
    pub fn forward(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        let weight =
            if weight.is_contiguous() || is_column_major(weight) { weight.clone() } else { weight.contiguous()? };
        x.contiguous()?.apply_op2_no_bwd(&weight, self)
    }
}

/// `weight` `[out, in]` stored column-major (its storage holds the transpose, `[in, out]`
/// row-major; the tensor reads the same): how [`LinearF32Cpu`] multiplies fastest. Anything
/// but a 2-D f32 tensor on the CPU, or one already stored so, is returned as it is (shared).
pub fn column_major(weight: &Tensor) -> candle_core::Result<Tensor> {
    if !weight.device().is_cpu() || weight.dtype() != DType::F32 || weight.rank() != 2 || is_column_major(weight) {
        return Ok(weight.clone());
    }
    let (rows, cols) = weight.dims2()?;
    let weight = weight.contiguous()?;
    let flipped = {
        let (storage, layout) = weight.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else { candle_core::bail!("column_major: not on the CPU") };
        transposed(contiguous_f32(storage, layout, "column_major")?, rows, cols)
    };
    Tensor::from_vec(flipped, (cols, rows), weight.device())?.t()
}

/// Square tiles of [`transposed`] (64 × 64 f32: two 16 KiB tiles stay in the L1 cache).
const TRANSPOSE_TILE: usize = 64;

/// `src` (`rows × cols`, row-major) transposed (`cols × rows`), in cache-sized tiles on every
/// core: candle's strided copy takes ~8 ns an element, seconds for a 600M-parameter model's
/// linear weights at load.
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = crate::buffers::unwritten(rows * cols);
    if rows > 0 {
        // Each task writes TRANSPOSE_TILE output rows (source columns), all source rows.
        out.par_chunks_mut(TRANSPOSE_TILE * rows).enumerate().for_each(|(task, dst)| {
            let first_col = task * TRANSPOSE_TILE;
            let width = dst.len() / rows;
            for row0 in (0..rows).step_by(TRANSPOSE_TILE) {
                for row in row0..(row0 + TRANSPOSE_TILE).min(rows) {
                    let line = &src[row * cols + first_col..row * cols + first_col + width];
                    for (c, &v) in line.iter().enumerate() {
                        dst[c * rows + row].write(v);
                    }
                }
            }
        });
    }
    // SAFETY: every output element (c, r) was written by the task of its column block.
    unsafe { crate::buffers::assume_written(out) }
}

/// Whether a 2-D `weight` is stored column-major (strides `[1, s]`, `s` ≥ its rows: each column
/// contiguous), as [`column_major`] leaves it and as the rows of [`stacked_column_major`]'s
/// weight are.
pub fn is_column_major(weight: &Tensor) -> bool {
    match (weight.dims(), weight.stride()) {
        (&[rows, _], &[1, column_stride]) => column_stride >= rows.max(1),
        _ => false,
    }
}

/// `parts` (2-D weights `[out_i, in]` with the same `in`, f32 on the CPU) stacked into one
/// column-major `[Σ out_i, in]` weight, returned with each part as a view of it (rows of the
/// stack, column-major with the stack's column stride): one product by the stack computes every
/// part's output (a self-attention's Q, K and V) and the parts share its memory.
pub fn stacked_column_major(parts: &[&Tensor]) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
    let stacked = column_major(&Tensor::cat(parts, 0)?)?;
    if !is_column_major(&stacked) {
        candle_core::bail!("stacked_column_major: f32 weights on the CPU only, got {:?}", stacked.dtype())
    }
    let mut views = Vec::with_capacity(parts.len());
    let mut first_row = 0;
    for part in parts {
        let rows = part.dim(0)?;
        views.push(stacked.narrow(0, first_row, rows)?);
        first_row += rows;
    }
    Ok((stacked, views))
}

/// A `[n, k]` weight's elements and how it is read as the `k × n` right operand:
/// `(data, column stride, row stride)`.
fn weight_operand<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<(&'a [f32], isize, isize)> {
    let (n, k) = layout.shape().dims2()?;
    match layout.stride() {
        &[1, column_stride] if column_stride >= n.max(1) => {
            let CpuStorage::F32(data) = storage else { candle_core::bail!("linear-f32-cpu: f32 weights only") };
            let start = layout.start_offset();
            let len = if k == 0 { 0 } else { (k - 1) * column_stride + n };
            match data.get(start..start + len) {
                Some(data) => Ok((data, 1, column_stride as isize)),
                None => candle_core::bail!("linear-f32-cpu: weight outside its storage"),
            }
        }
        _ => Ok((contiguous_f32(storage, layout, "linear-f32-cpu")?, k as isize, 1)),
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
        let x = contiguous_f32(s1, l1, "linear-f32-cpu")?;
        let (w, w_cs, w_rs) = weight_operand(s2, l2)?;
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
        gemm_with_bias_rows(x, (w, w_cs, w_rs), &self.bias, (m, n, k), &mut out);
        // SAFETY: `gemm_with_bias_rows` wrote every element.
        let out = unsafe { crate::buffers::assume_written(out) };
        Ok((CpuStorage::F32(out), output_shape(dims, n)))
    }
}

/// `x`'s shape `[…, in]` with the last dimension `n`.
fn output_shape(dims: &[usize], n: usize) -> Shape {
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Shape::from(shape)
}

/// `out = x · w + bias` through the `gemm` crate on every core, every element written: the output
/// rows set to the bias first (by the cores that then compute them), the product accumulated onto
/// them. `x` is `m × k` row-major, `w` `k × n` at its (column, row) strides.
fn gemm_with_bias_rows(
    x: &[f32],
    (w, w_cs, w_rs): (&[f32], isize, isize),
    bias: &[f32],
    (m, n, k): (usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
) {
    if !bias.is_empty() {
        out.par_chunks_mut((ROWS_PER_TASK * n).max(1)).for_each(|rows| {
            for row in rows.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(o, &b)| {
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
        // SAFETY: `out` is m × n row-major, `x` m × k row-major, `w` an n × k weight read
        // as its transpose through its strides, every element it reaches inside its slice
        // (`weight_operand`); all inside their slices. With a bias every
        // element was set above; without one the GEMM, told not to read `out`, writes them all.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                !bias.is_empty(),
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                w_cs,
                w_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
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
        for (shape, k, n) in
            [(vec![2, 130, 48], 48, 70), (vec![5, 33], 33, 16), (vec![1, 1, 7], 7, 3), (vec![3, 130], 130, 200)]
        {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let stored_transposed = column_major(&w).unwrap();
            assert!(is_column_major(&stored_transposed) && !is_column_major(&w));
            assert_eq!(stored_transposed.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
            for bias in [Some(&b), None] {
                let want = candle_nn::Linear::new(w.clone(), bias.cloned()).forward(&x).unwrap();
                for weight in [&w, &stored_transposed] {
                    let ours = LinearF32Cpu::new(bias).unwrap().forward(&x, weight).unwrap();
                    assert_eq!(ours.dims(), want.dims());
                    let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-4, "{shape:?} bias {} {:?}: {diff}", bias.is_some(), weight.stride());
                }
            }
        }
        let bad = LinearF32Cpu::new(Some(&Tensor::zeros(3, DType::F32, &dev).unwrap())).unwrap();
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(bad.forward(&x, &Tensor::zeros((5, 4), DType::F32, &dev).unwrap()).is_err());
    }

    /// A stack of three weights multiplies like the three separately (one product, each part's
    /// output in its columns), and each part, a view of the stack, like candle's `Linear` on it.
    #[test]
    fn stacked_weights_and_their_views_equal_candles_linear() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 70, 48), &dev).unwrap();
        let parts: Vec<Tensor> =
            [40, 40, 24].iter().map(|&n| Tensor::randn(0f32, 1.0, (n, 48), &dev).unwrap()).collect();
        let biases: Vec<Tensor> =
            parts.iter().map(|p| Tensor::randn(0f32, 1.0, p.dim(0).unwrap(), &dev).unwrap()).collect();
        let (stacked, views) = stacked_column_major(&parts.iter().collect::<Vec<_>>()).unwrap();
        assert!(is_column_major(&stacked) && views.iter().all(is_column_major));
        assert_eq!(stacked.dims(), &[104, 48]);
        let max_diff = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims());
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let stacked_bias = Tensor::cat(&biases, 0).unwrap();
        let all = LinearF32Cpu::new(Some(&stacked_bias)).unwrap().forward(&x, &stacked).unwrap();
        let mut column = 0;
        for ((part, view), bias) in parts.iter().zip(&views).zip(&biases) {
            assert_eq!(view.to_vec2::<f32>().unwrap(), part.to_vec2::<f32>().unwrap());
            let want = candle_nn::Linear::new(part.clone(), Some(bias.clone())).forward(&x).unwrap();
            let ours = LinearF32Cpu::new(Some(bias)).unwrap().forward(&x, view).unwrap();
            assert!(max_diff(&ours, &want) < 1e-4);
            let n = part.dim(0).unwrap();
            assert!(max_diff(&all.narrow(2, column, n).unwrap(), &want) < 1e-4);
            column += n;
        }
    }
}
