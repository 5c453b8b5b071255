//! A stride-1 2-D convolution for the CPU in f32, as a candle `CustomOp3` (input, weight, bias):
//! NCHW in and out, computed in bands of output rows, each band one GEMM
//! `out[co, rows·W] = W[co, ci·kh·kw] · cols[ci·kh·kw, rows·W]`.
//!
//! The im2col rows of a band are built by copying contiguous input row segments (in NCHW the
//! pixels of one channel row are adjacent), the GEMM writes straight into the NCHW output (each
//! output channel's band is one contiguous run), the bias initialises the output, bands run in
//! parallel with one column buffer per thread kept between calls, and a 1×1 convolution without padding reads
//! the input as its own column matrix. candle's CPU conv2d instead transposes the whole input to
//! NHWC on one thread, gathers each im2col element separately and scatters every output element
//! (`cargo bench --bench model_parts` and `benches/cpu_vs_diffusers.py` measure the difference).
//! The GEMM accumulates in f32 over `ci·kh·kw` in the same way for every output pixel; results
//! equal candle's conv2d to f32 rounding (tested against it below).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use crate::fast_math::contiguous_f32;
use crate::gemm_cpu::{matmul, Operand};

/// The im2col buffer one band may use, in f32 elements (1 MiB): about an L2 cache.
const BAND_ELEMENTS: usize = 1 << 18;

/// The CPU convolution op: stride 1, no dilation, one group, `padding` on every side.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dRowsCpu {
    /// Zero padding on each side.
    pub padding: usize,
}

/// `*mut f32` that parallel tasks may share: each task writes a disjoint set of output elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: only used to write disjoint regions from different threads (see `run`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The start of `out`.
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// The start of `out`, a buffer its users write before reading.
    pub(crate) fn unwritten(out: &mut [std::mem::MaybeUninit<f32>]) -> Self {
        Self(out.as_mut_ptr().cast())
    }

    /// The pointer `n` elements further.
    pub(crate) fn offset(self, n: usize) -> Self {
        Self(self.0.wrapping_add(n))
    }

    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// Fills `cols` (`[k, rows·out_w]`) with the im2col matrix of output rows `y0..y0+rows`.
fn im2col_band(g: &Geometry, input: &[f32], y0: usize, rows: usize, cols: &mut [f32]) {
    let n = rows * g.out_w;
    for ci in 0..g.c_in {
        let plane = &input[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let k = (ci * g.kh + ky) * g.kw + kx;
                let dst_rows = &mut cols[k * n..(k + 1) * n];
                // Output column x reads input column x + kx − pad; the valid x range:
                let x_start = g.pad.saturating_sub(kx).min(g.out_w);
                let x_end = (g.w + g.pad).saturating_sub(kx).min(g.out_w).max(x_start);
                for (r, dst) in dst_rows.chunks_exact_mut(g.out_w).enumerate() {
                    let sy = (y0 + r + ky) as isize - g.pad as isize;
                    if sy < 0 || sy as usize >= g.h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src_row = &plane[sy as usize * g.w..(sy as usize + 1) * g.w];
                    dst[..x_start].fill(0.0);
                    let sx = x_start + kx - g.pad;
                    dst[x_start..x_end].copy_from_slice(&src_row[sx..sx + (x_end - x_start)]);
                    dst[x_end..].fill(0.0);
                }
            }
        }
    }
}

fn run(g: Geometry, input: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let k = g.k();
    let plane = g.out_h * g.out_w;
    let mut out = vec![0f32; g.batch * g.c_out * plane];
    if out.is_empty() {
        return out;
    }
    let direct = g.kh == 1 && g.kw == 1 && g.pad == 0; // the input is its own column matrix
    let rows_per_band = if direct { g.out_h } else { (BAND_ELEMENTS / (k * g.out_w).max(1)).clamp(1, g.out_h) };
    // Enough bands for every thread (and a little balance), but never below one row.
    let threads = rayon::current_num_threads().max(1);
    let rows_per_band = rows_per_band.min(g.out_h.div_ceil(2 * threads)).max(1);
    let bands: Vec<(usize, usize)> =
        (0..g.batch).flat_map(|b| (0..g.out_h).step_by(rows_per_band).map(move |y0| (b, y0))).collect();
    let out_ptr = OutPtr::new(&mut out);
    bands.par_iter().for_each(|&(b, y0)| {
        COLUMNS.with_borrow_mut(|cols| {
            let rows = rows_per_band.min(g.out_h - y0);
            let n = rows * g.out_w;
            let image = &input[b * g.c_in * g.h * g.w..(b + 1) * g.c_in * g.h * g.w];
            let rhs: &[f32] = if direct {
                &image[y0 * g.w..]
            } else {
                cols.resize(k * n, 0.0);
                im2col_band(&g, image, y0, rows, cols);
                cols
            };
            // The band of output channel co starts at out[b, co, y0, 0]; rows of the GEMM result
            // (output channels) are `plane` apart, columns (pixels) adjacent.
            let dst_offset = b * g.c_out * plane + y0 * g.out_w;
            // SAFETY: this band writes out[b, co, y0..y0+rows, ..] for every co: element ranges
            // [dst_offset + co·plane, dst_offset + co·plane + n), disjoint from every other band's
            // (other rows or another image) and inside `out` (y0 + rows ≤ out_h).
            unsafe {
                let dst = out_ptr.get().add(dst_offset);
                for (co, &b) in bias.iter().enumerate().take(g.c_out) {
                    std::slice::from_raw_parts_mut(dst.add(co * plane), n).fill(b);
                }
                let rhs = Operand::rows(rhs.as_ptr(), if direct { g.h * g.w } else { n });
                matmul((g.c_out, n, k), dst, plane, true, Operand::rows(weight.as_ptr(), k), rhs);
            }
        })
    });
    out
}

/// The checked shapes and data of a convolution op's input `[B, C_in, H, W]`, weight
/// `[C_out, C_in, kh, kw]` and bias `[C_out]` (f32, contiguous).
pub(crate) struct ConvOperands<'a> {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub input: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
}

impl<'a> ConvOperands<'a> {
    /// Checks that the three fit each other and that the kernel fits the input padded by `pad`.
    pub fn new(
        op: &str,
        pad: usize,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
    ) -> candle_core::Result<Self> {
        let (batch, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, c_in_w, kh, kw) = l2.shape().dims4()?;
        if c_in_w != c_in || l3.shape().dims1()? != c_out {
            candle_core::bail!(
                "{op}: input {:?}, weight {:?}, bias {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!("{op}: a {kh}x{kw} kernel does not fit a padded {h}x{w} input")
        }
        let (input, weight, bias) =
            (contiguous_f32(s1, l1, op)?, contiguous_f32(s2, l2, op)?, contiguous_f32(s3, l3, op)?);
        Ok(Self { batch, c_in, h, w, c_out, kh, kw, input, weight, bias })
    }
}

thread_local! {
    /// Each thread's im2col buffer, kept between calls: a fresh one per band would be
    /// page-faulted in again every time.
    static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp3 for Conv2dRowsCpu {
    fn name(&self) -> &'static str {
        "conv2d-rows-cpu"
    }

    /// `s1`: input `[B, C_in, H, W]`; `s2`: weight `[C_out, C_in, kh, kw]`; `s3`: bias `[C_out]`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ops = ConvOperands::new(self.name(), self.padding, (s1, l1), (s2, l2), (s3, l3))?;
        let (batch, c_in, h, w, c_out, kh, kw, pad) =
            (ops.batch, ops.c_in, ops.h, ops.w, ops.c_out, ops.kh, ops.kw, self.padding);
        let g = Geometry {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            pad,
            out_h: h + 2 * pad + 1 - kh,
            out_w: w + 2 * pad + 1 - kw,
        };
        let (input, weight, bias) = (ops.input, ops.weight, ops.bias);
        let out = run(g, input, weight, bias);
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, g.out_h, g.out_w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Tensor {
        let out = x.conv2d(w, padding, 1, 1, 1).unwrap();
        out.broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap()).unwrap()
    }

    #[test]
    fn equals_candles_convolution() {
        let dev = Device::Cpu;
        // (batch, c_in, h, w, c_out, kernel, padding): 3×3 same, 1×1 direct, odd sizes, a
        // kernel larger than the padding, a single row, more channels than pixels.
        for &(b, ci, h, w, co, k, p) in &[
            (2, 5, 11, 7, 6, 3, 1),
            (1, 3, 9, 13, 4, 1, 0),
            (1, 4, 6, 5, 3, 3, 0),
            (2, 2, 1, 9, 3, 3, 1),
            (1, 7, 8, 8, 2, 5, 2),
            (1, 64, 3, 4, 16, 3, 1),
            (1, 2, 4, 4, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let ours = x.apply_op3_no_bwd(&wt, &bias, &Conv2dRowsCpu { padding: p }).unwrap();
            let want = reference(&x, &wt, &bias, p);
            assert_eq!(ours.dims(), want.dims(), "{b} {ci} {h} {w} {co} {k} {p}");
            let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{b} {ci} {h} {w} {co} {k} {p}: {diff}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_compute() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((1, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap();
        assert!(x.apply_op3_no_bwd(&w, &b, &Conv2dRowsCpu { padding: 1 }).is_err()); // channels
        let w = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(x.apply_op3_no_bwd(&w, &b, &Conv2dRowsCpu { padding: 1 }).is_err()); // too small
        let x16 = x.to_dtype(candle_core::DType::BF16).unwrap();
        let w = Tensor::zeros((1, 2, 3, 3), candle_core::DType::BF16, &dev).unwrap();
        assert!(x16
            .apply_op3_no_bwd(&w, &b.to_dtype(candle_core::DType::BF16).unwrap(), &Conv2dRowsCpu { padding: 1 })
            .is_err());
    }
}
