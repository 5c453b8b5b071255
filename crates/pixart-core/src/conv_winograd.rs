//! A 3×3, stride-1 convolution for the CPU in f32 by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, 2015): each 2×2 block of outputs takes 16 multiplies per channel pair instead
//! of 36, so the GEMMs do 2.25× fewer FLOPs than im2col's. With `g` a 3×3 kernel and `d` a 4×4
//! input tile,
//!
//! ```text
//! Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A     Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]
//!                                      G  = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
//!                                      Aᵀ = [1 1 1 0; 0 1 −1 −1]
//! ```
//!
//! and summing over input channels turns the 16 elementwise products into 16 GEMMs
//! `M[ξ] (C_out × tiles) = U[ξ] (C_out × C_in) · V[ξ] (C_in × tiles)`. The output is computed in
//! bands of tile rows (the transformed input of one band is a few MiB), bands in parallel, each
//! thread keeping its buffers between calls. The transforms only add and subtract (the ½ are
//! exact), so the result differs from the direct sum by f32 rounding (tested against it below).
//! With [`CpuProducts::Bf16`] on a CPU that has AVX512-BF16, the GEMMs take `U` and `V` rounded
//! to bf16 and sum in f32 ([`crate::linear_bf16`]'s micro-kernel): the transforms stay f32.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use crate::conv_cpu::{ConvOperands, OutPtr};
use crate::fast_math::dispatch;
use crate::gemm_cpu::{matmul, Operand};
use crate::linear_bf16::{pack_columns, product, round_rows, Bf16Kernel, CpuProducts, Tile, PANEL};

/// The transformed input of one band may take this many f32 (4 MiB); its GEMM output as much.
const BAND_ELEMENTS: usize = 1 << 20;

/// The op: input `[B, C_in, H, W]`, weight `[C_out, C_in, 3, 3]`, bias `[C_out]`; zero padding
/// `padding` on every side.
#[derive(Debug, Clone, Copy)]
pub struct Conv3x3WinogradCpu {
    /// Zero padding on each side.
    pub padding: usize,
    /// How the 16 GEMMs multiply.
    pub products: CpuProducts,
    /// Which kernel computes bf16 products (with [`CpuProducts::Bf16`]).
    pub bf16_kernel: Bf16Kernel,
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    pad: usize,
    out_h: usize,
    out_w: usize,
    /// 2×2 output tiles per row and per column.
    tiles_w: usize,
    tiles_h: usize,
}

impl Geometry {
    /// Elements of a padded input row as the tiles read it: `2·tiles_w + 2`.
    fn padded_w(&self) -> usize {
        2 * self.tiles_w + 2
    }
}

/// `U[ξ][co][ci] = (G g Gᵀ)[ξ]` for every kernel `g = weight[co, ci]`.
fn transform_weights(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * c_out * c_in];
    let stride = c_out * c_in;
    let per_kernel: Vec<[f32; 16]> = weight
        .par_chunks_exact(9)
        .map(|g| {
            // Rows of G g, then (G g) Gᵀ on each.
            let row = |i: usize| [g[i], g[3 + i], g[6 + i]];
            let gg = |c: [f32; 3]| [c[0], 0.5 * (c[0] + c[1] + c[2]), 0.5 * (c[0] - c[1] + c[2]), c[2]];
            let cols = [gg(row(0)), gg(row(1)), gg(row(2))]; // (G g) by columns of g
            let mut t = [0f32; 16];
            for i in 0..4 {
                let r = gg([cols[0][i], cols[1][i], cols[2][i]]);
                t[4 * i..4 * i + 4].copy_from_slice(&r);
            }
            t
        })
        .collect();
    for (kernel, t) in per_kernel.iter().enumerate() {
        for (xi, &value) in t.iter().enumerate() {
            u[xi * stride + kernel] = value;
        }
    }
    u
}

dispatch!(
    /// `V[ξ][ci][t]` (`[16, C_in, tiles]` for tiles `ty0..ty0+rows` by rows) from one image
    /// (`[C_in, H, W]`); `rows_buf` holds 8 padded rows.
    input_transform, input_transform_at(
        g: &Geometry,
        image: &[f32],
        ty0: usize,
        rows: usize,
        v: &mut [f32],
        rows_buf: &mut Vec<f32>
    ) {
        let (pw, tw) = (g.padded_w(), g.tiles_w);
        let tiles = rows * tw;
        rows_buf.resize(8 * pw, 0.0);
        let (padded, combined) = rows_buf.split_at_mut(4 * pw);
        for ci in 0..g.c_in {
            let plane = &image[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for r in 0..rows {
                // The 4 input rows of tile row ty0 + r, zero-padded.
                for (i, dst) in padded.chunks_exact_mut(pw).enumerate() {
                    let y = (2 * (ty0 + r) + i) as isize - g.pad as isize;
                    dst.fill(0.0);
                    if y >= 0 && (y as usize) < g.h {
                        let src = &plane[y as usize * g.w..(y as usize + 1) * g.w];
                        let n = g.w.min(pw - g.pad);
                        dst[g.pad..g.pad + n].copy_from_slice(&src[..n]);
                    }
                }
                // Bᵀ d: combine the rows.
                let (d0, rest) = padded.split_at(pw);
                let (d1, rest) = rest.split_at(pw);
                let (d2, d3) = rest.split_at(pw);
                let (c0, rest) = combined.split_at_mut(pw);
                let (c1, rest) = rest.split_at_mut(pw);
                let (c2, c3) = rest.split_at_mut(pw);
                for x in 0..pw {
                    c0[x] = d0[x] - d2[x];
                    c1[x] = d1[x] + d2[x];
                    c2[x] = d2[x] - d1[x];
                    c3[x] = d1[x] - d3[x];
                }
                // (Bᵀ d) B: combine the columns of each tile.
                for (i, c) in [&*c0, &*c1, &*c2, &*c3].into_iter().enumerate() {
                    let at = |j: usize| (4 * i + j) * g.c_in * tiles + ci * tiles + r * tw;
                    let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                    for tx in 0..tw {
                        let x = 2 * tx;
                        v[o0 + tx] = c[x] - c[x + 2];
                        v[o1 + tx] = c[x + 1] + c[x + 2];
                        v[o2 + tx] = c[x + 2] - c[x + 1];
                        v[o3 + tx] = c[x + 1] - c[x + 3];
                    }
                }
            }
        }
    }
);

dispatch!(
    /// `out[co, y, x] = bias[co] + (Aᵀ M A)` for the tiles of the band (tile rows
    /// `band.0..band.0 + band.1`) from `M` (`[16, C_out,
    /// tiles]`); `row_buf` holds the row sums and an output row. `out` is the image's output,
    /// written only in the band's rows.
    output_transform, output_transform_at(
        g: &Geometry,
        m: &[f32],
        bias: &[f32],
        band: (usize, usize),
        out: OutPtr,
        row_buf: &mut Vec<f32>
    ) {
        let (ty0, rows) = band;
        let tw = g.tiles_w;
        let tiles = rows * tw;
        row_buf.resize(10 * tw, 0.0);
        let (sums, out_rows) = row_buf.split_at_mut(8 * tw);
        for (co, &b) in bias.iter().enumerate().take(g.c_out) {
            for r in 0..rows {
                let p = |xi: usize| &m[xi * g.c_out * tiles + co * tiles + r * tw..][..tw];
                // Aᵀ M: rows s0 = m0 + m1 + m2 and s1 = m1 − m2 − m3, column by column.
                let (s0, s1) = sums.split_at_mut(4 * tw);
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (p(j), p(4 + j), p(8 + j), p(12 + j));
                    let dst0 = &mut s0[j * tw..(j + 1) * tw];
                    for (((o, &a), &b), &c) in dst0.iter_mut().zip(m0).zip(m1).zip(m2) {
                        *o = a + b + c;
                    }
                    let dst1 = &mut s1[j * tw..(j + 1) * tw];
                    for (((o, &b), &c), &d) in dst1.iter_mut().zip(m1).zip(m2).zip(m3) {
                        *o = b - c - d;
                    }
                }
                // (Aᵀ M) A, two output pixels per tile, plus the bias.
                for (i, s) in [&*s0, &*s1].into_iter().enumerate() {
                    let row = &mut out_rows[..2 * tw];
                    let (c0, c1, c2, c3) = (&s[..tw], &s[tw..2 * tw], &s[2 * tw..3 * tw], &s[3 * tw..4 * tw]);
                    let pairs = row.chunks_exact_mut(2).zip(c0).zip(c1).zip(c2).zip(c3);
                    for ((((pair, &x0), &x1), &x2), &x3) in pairs {
                        pair[0] = b + x0 + x1 + x2;
                        pair[1] = b + x1 - x2 - x3;
                    }
                    let y = 2 * (ty0 + r) + i;
                    if y < g.out_h {
                        // SAFETY: out[co, y, ..out_w] is inside the image's output and only this
                        // band writes row y (bands cover disjoint tile rows).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.get().add((co * g.out_h + y) * g.out_w), g.out_w)
                        };
                        dst.copy_from_slice(&row[..g.out_w]);
                    }
                }
            }
        }
    }
);

/// Each thread's transformed input, GEMM output and row buffers.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
    /// One `V[ξ]` as bf16 panels (bf16 products only).
    panels: Vec<u16>,
}

/// The transformed weights: `U` in f32, or its rows rounded to bf16 for a bf16 kernel.
enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u32>, Bf16Kernel),
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// One band: tile rows `ty0..ty0 + rows` of one image.
fn band(
    g: &Geometry,
    u: &Weights,
    image: &[f32],
    bias: &[f32],
    (ty0, rows): (usize, usize),
    out: OutPtr,
    s: &mut Scratch,
) {
    let tiles = rows * g.tiles_w;
    s.v.resize(16 * g.c_in * tiles, 0.0);
    s.m.resize(16 * g.c_out * tiles, 0.0);
    input_transform(g, image, ty0, rows, &mut s.v, &mut s.rows);
    for xi in 0..16 {
        let v = &s.v[xi * g.c_in * tiles..(xi + 1) * g.c_in * tiles];
        let dst = &mut s.m[xi * g.c_out * tiles..(xi + 1) * g.c_out * tiles];
        match u {
            Weights::F32(u) => {
                let lhs = &u[xi * g.c_out * g.c_in..(xi + 1) * g.c_out * g.c_in];
                let (lhs, rhs) = (Operand::rows(lhs.as_ptr(), g.c_in), Operand::rows(v.as_ptr(), tiles));
                // SAFETY: lhs is c_out × c_in, rhs c_in × tiles, dst c_out × tiles, all row-major.
                unsafe { matmul((g.c_out, tiles, g.c_in), dst.as_mut_ptr(), tiles, false, lhs, rhs) };
            }
            &Weights::Bf16(ref u, kernel) => {
                let (pairs, words) = (g.c_in.div_ceil(2), kernel.row_words(g.c_in));
                let a = &u[xi * g.c_out * words..(xi + 1) * g.c_out * words];
                // SAFETY: `Weights::Bf16` is only built where `LinearBf16::available()`; `v` is
                // c_in × tiles; `dst` c_out × tiles, written one panel of columns at a time.
                unsafe {
                    pack_columns(v, (g.c_in, tiles, tiles), &mut s.panels);
                    for (p, panel) in s.panels.chunks_exact(pairs * PANEL * 2).enumerate() {
                        let cols = PANEL.min(tiles - p * PANEL);
                        let tile = Tile { a, pairs, panel, bias: None, cols, kernel };
                        product(&tile, dst.as_mut_ptr().add(p * PANEL), tiles);
                    }
                }
            }
        }
    }
    output_transform(g, &s.m, bias, (ty0, rows), out, &mut s.rows);
}

fn run(g: Geometry, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], op: Conv3x3WinogradCpu) -> Vec<f32> {
    let plane_out = g.out_h * g.out_w;
    let mut out = vec![0f32; batch * g.c_out * plane_out];
    if out.is_empty() {
        return out;
    }
    let u = transform_weights(weight, g.c_out, g.c_in);
    let u = if op.products.in_bf16() {
        let kernel = op.bf16_kernel;
        let mut rows = vec![0u32; 16 * g.c_out * kernel.row_words(g.c_in)];
        // SAFETY: `in_bf16()` checked the CPU; `u` is 16·c_out rows of c_in.
        unsafe { round_rows(&u, g.c_in, &mut rows, kernel) };
        Weights::Bf16(rows, kernel)
    } else {
        Weights::F32(u)
    };
    let per_row = 16 * g.c_in.max(g.c_out) * g.tiles_w;
    let threads = rayon::current_num_threads().max(1);
    let rows_per_band =
        (BAND_ELEMENTS / per_row.max(1)).clamp(1, g.tiles_h).min(g.tiles_h.div_ceil(2 * threads)).max(1);
    let bands: Vec<(usize, usize)> =
        (0..batch).flat_map(|b| (0..g.tiles_h).step_by(rows_per_band).map(move |ty0| (b, ty0))).collect();
    let out_ptr = OutPtr::new(&mut out);
    bands.par_iter().for_each(|&(b, ty0)| {
        let image = &input[b * g.c_in * g.h * g.w..(b + 1) * g.c_in * g.h * g.w];
        let rows = rows_per_band.min(g.tiles_h - ty0);
        // The image's output starts b·c_out·plane_out elements in.
        let image_out = out_ptr.offset(b * g.c_out * plane_out);
        SCRATCH.with_borrow_mut(|s| band(&g, &u, image, bias, (ty0, rows), image_out, s));
    });
    out
}

impl CustomOp3 for Conv3x3WinogradCpu {
    fn name(&self) -> &'static str {
        "conv3x3-winograd-cpu"
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
        let ops = ConvOperands::new(self.name(), self.padding, (s1, l1), (s2, l2), (s3, l3))?;
        if (ops.kh, ops.kw) != (3, 3) {
            candle_core::bail!("conv3x3-winograd-cpu: a {}x{} kernel", ops.kh, ops.kw)
        }
        let (batch, c_in, h, w, c_out, pad) = (ops.batch, ops.c_in, ops.h, ops.w, ops.c_out, self.padding);
        let (out_h, out_w) = (h + 2 * pad - 2, w + 2 * pad - 2);
        let g =
            Geometry { c_in, h, w, c_out, pad, out_h, out_w, tiles_w: out_w.div_ceil(2), tiles_h: out_h.div_ceil(2) };
        let (input, weight, bias) = (ops.input, ops.weight, ops.bias);
        let out = run(g, batch, input, weight, bias, *self);
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, out_h, out_w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv_cpu::Conv2dRowsCpu;
    use crate::fast_math::Simd;
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_the_direct_convolution() {
        let dev = Device::Cpu;
        // (batch, c_in, h, w, c_out, padding): even and odd sizes, one row, no padding, more
        // channels than pixels, padding wider than the kernel's reach.
        for &(b, ci, h, w, co, p) in &[
            (2, 5, 11, 7, 6, 1),
            (1, 3, 8, 8, 4, 1),
            (1, 4, 6, 5, 3, 0),
            (2, 2, 1, 9, 3, 1),
            (1, 64, 3, 4, 16, 1),
            (1, 3, 4, 3, 2, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let want = x.apply_op3_no_bwd(&wt, &bias, &Conv2dRowsCpu { padding: p }).unwrap();
            let op = Conv3x3WinogradCpu { padding: p, products: CpuProducts::F32, bf16_kernel: Bf16Kernel::chosen() };
            let ours = x.apply_op3_no_bwd(&wt, &bias, &op).unwrap();
            assert_eq!(ours.dims(), want.dims(), "{b} {ci} {h} {w} {co} {p}");
            let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{b} {ci} {h} {w} {co} {p}: {diff}");
        }
    }

    /// With bf16 products (where the CPU has them), against the direct f32 convolution: `U` and
    /// `V` keep 8 significant bits (relative rounding ≤ 2⁻⁹ each), so the output moves by about
    /// 2⁻⁸·√(9·c_in) of a typical term; bounded at 1% of the output's largest value (0.35–0.42%
    /// measured), and it must move more than f32 rounding does (the bf16 path ran). Both kernels.
    #[test]
    fn bf16_products_stay_within_bf16_rounding_of_the_direct_convolution() {
        if !CpuProducts::Bf16.in_bf16() {
            return;
        }
        let dev = Device::Cpu;
        let shapes = [(2, 5, 11, 7, 6, 1), (1, 64, 9, 13, 40, 1), (1, 33, 6, 5, 3, 0)];
        for (&(b, ci, h, w, co, p), kernel) in
            shapes.iter().flat_map(|s| [(s, Bf16Kernel::DotProduct), (s, Bf16Kernel::WidenedFma)])
        {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let want = x.apply_op3_no_bwd(&wt, &bias, &Conv2dRowsCpu { padding: p }).unwrap();
            let op = Conv3x3WinogradCpu { padding: p, products: CpuProducts::Bf16, bf16_kernel: kernel };
            let ours = x.apply_op3_no_bwd(&wt, &bias, &op).unwrap();
            let diff = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{kernel:?} {b} {ci} {h} {w} {co} {p}: {diff} of {scale}");
            assert!(
                diff <= 0.01 * scale && diff > 1e-5 * scale,
                "{kernel:?} {b} {ci} {h} {w} {co} {p}: {diff} of {scale}"
            );
        }
    }

    /// The transforms at every SIMD level this CPU runs give the same bits (they only add and
    /// subtract, in the same order).
    #[test]
    fn every_simd_level_transforms_alike() {
        let (c_in, h, w) = (3, 7, 9);
        let g = Geometry { c_in, h, w, c_out: 2, pad: 1, out_h: h, out_w: w, tiles_w: 5, tiles_h: 4 };
        let image: Vec<f32> = (0..c_in * h * w).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1).collect();
        let m: Vec<f32> = (0..16 * 2 * 2 * 5).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.2).collect();
        let run_at = |level: Simd| {
            let (mut v, mut rows) = (vec![0f32; 16 * c_in * 2 * 5], Vec::new());
            input_transform_at(level, &g, &image, 1, 2, &mut v, &mut rows);
            let mut out = vec![0f32; 2 * h * w];
            output_transform_at(level, &g, &m, &[0.5, -0.5], (1, 2), OutPtr::new(&mut out), &mut rows);
            (v, out)
        };
        let baseline = run_at(Simd::Baseline);
        for level in Simd::supported() {
            assert_eq!(run_at(level), baseline, "{level:?}");
        }
    }

    #[test]
    fn refuses_other_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap();
        let op = Conv3x3WinogradCpu { padding: 1, products: CpuProducts::F32, bf16_kernel: Bf16Kernel::chosen() };
        assert!(x.apply_op3_no_bwd(&w, &b, &op).is_err());
    }
}
