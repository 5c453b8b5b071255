//! `y = x · Wᵀ + b` on the CPU with AVX512-FP16: the weight in f16, the input rounded to f16
//! (to nearest even, as a model in f16 holds them), products summed by f16 FMAs
//! (`vfmadd231ph`: 32 lanes, twice the f32 FMA's products per instruction) along runs of
//! [`RUN`] values of the reduced dimension, each run's sums then added in f32. Everything around
//! the products stays f32.
//!
//! A GPU computing in f16 sums the products in f32; here each run of [`RUN`] sums rounds to f16
//! at every step (a relative error of about 2⁻¹¹ per addition, in a sum of [`RUN`] products), and
//! the runs add up in f32, so the error does not grow with the layer's width.
//!
//! The weight `[n, k]` is packed once into panels of 64 output columns, `[k][64]` f16 per panel
//! (one panel row is two 64-byte vectors). Each call rounds the input rows to f16 (row-major,
//! padded to whole blocks of 8 rows), then every task takes a few panels and a few blocks of 8
//! rows, and walks the panel in slices of 128 of its rows (16 KiB, read from the L1 cache by
//! every block after the first): per value of `k`, each row's value is broadcast from memory into
//! two FMAs (16 f16 accumulators), and after every run the accumulators are widened into f32
//! sums that started at the bias.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::conv_cpu::OutPtr;
use crate::packed_linear::{forward_side_by_side, output_columns, tasks, Avx512Extension, PackedLayer};

/// Output columns per panel (two vectors of 32 f16).
const PANEL: usize = 64;
/// Input rows per micro-kernel block.
const ROWS: usize = 8;
/// Values of the reduced dimension whose products are summed in f16 before they join the f32
/// sums.
pub const RUN: usize = 32;
/// Panel rows (values of the reduced dimension) every block of a task runs before the next
/// ones: 16 KiB of the panel, read from the L1 cache by all but the first block.
const SLICE: usize = 128;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 2;
/// Input rows per parallel task (a multiple of [`ROWS`]).
const ROWS_PER_TASK: usize = 128;

/// A linear layer's weight (and bias) packed for [`LinearF16::forward`].
#[derive(Debug, Clone)]
pub struct LinearF16 {
    out_features: usize,
    in_features: usize,
    /// `[panel][k][PANEL]` f16 bits, columns padded to the panel with zeros.
    packed: Vec<u16>,
    /// `out_features` values, or empty.
    bias: Vec<f32>,
}

impl LinearF16 {
    /// Whether this CPU has the instructions (AVX-512 F, BW and FP16), checked at run time,
    /// and `PIXART_SIMD` leaves AVX-512 on (with `avx2` a newer CPU runs what an AVX2-only one
    /// does).
    pub fn available() -> bool {
        crate::packed_linear::offered(Avx512Extension::Fp16)
    }

    /// Packs `weight` `[out, in]` (any float dtype; rounded to f16 to nearest even) and `bias`
    /// `[out]` (kept in f32).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<half::f16>()?;
        let mut packed = vec![0u16; n.div_ceil(PANEL) * k * PANEL];
        packed.par_chunks_mut((k * PANEL).max(1)).enumerate().for_each(|(p, panel)| {
            for (kk, lanes) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (c, v) in lanes.iter_mut().enumerate().take(n.saturating_sub(p * PANEL)) {
                    *v = w[(p * PANEL + c) * k + kk].to_bits();
                }
            }
        });
        let bias = crate::packed_linear::bias_values(bias, n, "linear-f16")?;
        Ok(Self { out_features: n, in_features: k, packed, bias })
    }

    /// `x` `[…, in]` f32 on the CPU → `[…, out]` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        forward_side_by_side(&[self], x)
    }

    /// `x` `[…, in]` f32 on the CPU through each of `layers` (all `in` wide) → `[…, Σ out]`,
    /// their outputs side by side in `layers`' order: one op, the input rounded once (a
    /// self-attention's Q, K and V in one product).
    pub fn forward_side_by_side(layers: &[&LinearF16], x: &Tensor) -> candle_core::Result<Tensor> {
        forward_side_by_side(layers, x)
    }
}

impl PackedLayer for LinearF16 {
    const NAME: &'static str = "linear-f16";
    const EXTENSION: Avx512Extension = Avx512Extension::Fp16;

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn reads_rows_like(&self, _: &Self) -> bool {
        true
    }

    /// `dst[m × Σn] = round_f16(x)[m × k] · round_f16(W_l)ᵀ + b_l` for each layer `l`.
    unsafe fn side_by_side(layers: &[&Self], x: &[f32], m: usize) -> Vec<f32> {
        let k = layers.first().map_or(0, |l| l.in_features);
        // SAFETY: the CPU has AVX-512 FP16 (and F), as the caller promises.
        let a = unsafe { rounded_rows(x, m, k) };
        let (starts, n) = output_columns(layers.iter().map(|l| l.out_features));
        let mut dst = crate::buffers::unwritten(m * n);
        let out = OutPtr::unwritten(&mut dst);
        let panels: Vec<usize> = layers.iter().map(|l| l.out_features.div_ceil(PANEL)).collect();
        tasks(&panels, m, (PANELS_PER_TASK, ROWS_PER_TASK)).par_iter().for_each(|task| {
            let (layer, rows) = (layers[task.layer], task.rows.len());
            for p in task.panels.clone() {
                let cols = PANEL.min(layer.out_features - p * PANEL);
                let tile = Tile {
                    a: &a[task.rows.start * k..(task.rows.start + rows.div_ceil(ROWS) * ROWS) * k],
                    k,
                    panel: &layer.packed[p * k * PANEL..(p + 1) * k * PANEL],
                    bias: if layer.bias.is_empty() { None } else { Some(&layer.bias[p * PANEL..p * PANEL + cols]) },
                    rows,
                    cols,
                };
                let dst = out.offset(task.rows.start * n + starts[task.layer] + p * PANEL);
                // SAFETY: the CPU has AVX-512 FP16, as the caller promises; the destination
                // addresses `rows` rows of `cols` columns (stride `n`) that only this task writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::tile(&tile, dst.get(), n)
                }
            }
        });
        // SAFETY: the tasks cover every row and every panel of every layer, whose columns tile
        // each row, and `tile` stores every column of its panel in every row of its task.
        unsafe { crate::buffers::assume_written(dst) }
    }
}

/// The `m` rows `x` (`k` each) rounded to f16, padded with zero rows to whole blocks of
/// [`ROWS`] (written once: no clearing pass first).
///
/// # Safety
/// The CPU has AVX-512 F.
unsafe fn rounded_rows(x: &[f32], m: usize, k: usize) -> Vec<u16> {
    let mut a = crate::buffers::unwritten::<u16>(m.div_ceil(ROWS) * ROWS * k);
    if k > 0 {
        a.par_chunks_mut(k * ROWS).zip(x.par_chunks(k * ROWS)).for_each(|(out, rows)| {
            let (values, padding) = out.split_at_mut(rows.len());
            padding.iter_mut().for_each(|v| {
                v.write(0);
            });
            // SAFETY: AVX-512 F as the caller promises; `values` holds `rows.len()`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::round_rows(rows, values)
            }
        });
    }
    // SAFETY: each block's rows are written by `round_rows` and its padding rows above (the
    // zipped chunks cover every block: the last chunk of `x` is the last block's rows).
    unsafe { crate::buffers::assume_written(a) }
}

/// The operands of one task's rows against one panel.
struct Tile<'a> {
    /// Whole blocks of [`ROWS`] rows of `k` f16 values (rows past `rows` are zero padding).
    a: &'a [u16],
    k: usize,
    /// `[k][PANEL]` f16 bits.
    panel: &'a [u16],
    /// The panel's `cols` biases, if any.
    bias: Option<&'a [f32]>,
    /// Rows to store.
    rows: usize,
    /// Columns to store (the last panel may be partial).
    cols: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Tile, PANEL, ROWS, RUN, SLICE};

    /// Rounds the values of `x` (rows of `k`) to f16 bits (to nearest even) into `out`, one for
    /// one: every element of `out` is written.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `out` is as long as `x`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_rows(x: &[f32], out: &mut [MaybeUninit<u16>]) {
        debug_assert_eq!(x.len(), out.len());
        let full = x.len() / 16 * 16;
        for (src, dst) in x[..full].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            // SAFETY: 16 values each; AVX-512 F as the caller promises.
            unsafe {
                let half =
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(src.as_ptr()));
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), half);
            }
        }
        for (src, dst) in x[full..].iter().zip(&mut out[full..]) {
            dst.write(half::f16::from_f32(*src).to_bits());
        }
    }

    /// The products of one run: `acc[2r + h] += Σ_{j < len} a_r[j] · w[j][32h..32h + 32]` in f16,
    /// for the 8 rows `a_r` (at `a`, `a + lda`, …, f16), `w` a panel's rows (`PANEL` f16 each).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and FP16; the rows hold `len` values from `a`, the panel `len`
    /// rows from `w`.
    #[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
    unsafe fn run(acc: &mut [__m512i; 16], a: *const u16, lda: usize, w: *const u16, len: usize) {
        let [mut c0, mut c1, mut c2, mut c3, mut c4, mut c5, mut c6, mut c7, mut c8, mut c9, mut c10, mut c11, mut c12, mut c13, mut c14, mut c15] =
            *acc;
        // SAFETY: reads `len` values of each row and `len` panel rows, as the caller promises.
        unsafe {
            asm!(
                "test {n}, {n}",
                "jz 3f",
                "2:",
                "vmovdqu16 zmm16, [{w}]",
                "vmovdqu16 zmm17, [{w} + 64]",
                "vfmadd231ph zmm0, zmm16, word ptr [{a0}]{{1to32}}",
                "vfmadd231ph zmm1, zmm17, word ptr [{a0}]{{1to32}}",
                "vfmadd231ph zmm2, zmm16, word ptr [{a0} + {lda}]{{1to32}}",
                "vfmadd231ph zmm3, zmm17, word ptr [{a0} + {lda}]{{1to32}}",
                "vfmadd231ph zmm4, zmm16, word ptr [{a0} + {lda} * 2]{{1to32}}",
                "vfmadd231ph zmm5, zmm17, word ptr [{a0} + {lda} * 2]{{1to32}}",
                "vfmadd231ph zmm6, zmm16, word ptr [{a3}]{{1to32}}",
                "vfmadd231ph zmm7, zmm17, word ptr [{a3}]{{1to32}}",
                "vfmadd231ph zmm8, zmm16, word ptr [{a3} + {lda}]{{1to32}}",
                "vfmadd231ph zmm9, zmm17, word ptr [{a3} + {lda}]{{1to32}}",
                "vfmadd231ph zmm10, zmm16, word ptr [{a3} + {lda} * 2]{{1to32}}",
                "vfmadd231ph zmm11, zmm17, word ptr [{a3} + {lda} * 2]{{1to32}}",
                "vfmadd231ph zmm12, zmm16, word ptr [{a6}]{{1to32}}",
                "vfmadd231ph zmm13, zmm17, word ptr [{a6}]{{1to32}}",
                "vfmadd231ph zmm14, zmm16, word ptr [{a6} + {lda}]{{1to32}}",
                "vfmadd231ph zmm15, zmm17, word ptr [{a6} + {lda}]{{1to32}}",
                "add {w}, 128",
                "add {a0}, 2",
                "add {a3}, 2",
                "add {a6}, 2",
                "dec {n}",
                "jnz 2b",
                "3:",
                inout("zmm0") c0, inout("zmm1") c1, inout("zmm2") c2, inout("zmm3") c3,
                inout("zmm4") c4, inout("zmm5") c5, inout("zmm6") c6, inout("zmm7") c7,
                inout("zmm8") c8, inout("zmm9") c9, inout("zmm10") c10, inout("zmm11") c11,
                inout("zmm12") c12, inout("zmm13") c13, inout("zmm14") c14, inout("zmm15") c15,
                out("zmm16") _,
                out("zmm17") _,
                w = inout(reg) w => _,
                a0 = inout(reg) a => _,
                a3 = inout(reg) a.wrapping_add(3 * lda) => _,
                a6 = inout(reg) a.wrapping_add(6 * lda) => _,
                lda = in(reg) 2 * lda,
                n = inout(reg) len => _,
                options(nostack, readonly),
            );
        }
        *acc = [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15];
    }

    /// Products per nanosecond on one core of `vfmadd231ph` (32 f16 lanes) and `vfmadd231ps`
    /// (16 f32 lanes), each in twelve independent chains on registers: what the f16 kernel can
    /// gain over f32 FMAs on this CPU.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and FP16.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512fp16")]
    pub(super) unsafe fn products_per_ns() -> (f64, f64) {
        use crate::packed_linear::twelve_chains;
        let zeros = _mm512_setzero_ps();
        // SAFETY (both loops): registers only; AVX-512 F and FP16 as the caller promises.
        let f16 = |rounds: u64| unsafe { twelve_chains!("vfmadd231ph", rounds, zeros) };
        let f32 = |rounds: u64| unsafe { twelve_chains!("vfmadd231ps", rounds, zeros) };
        let [f16, f32] = crate::packed_linear::products_per_ns(200_000, [(&f16, 32.0), (&f32, 16.0)]);
        (f16, f32)
    }

    /// Adds the 32 f16 sums of `acc` to the f32 sums at `sums`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen_into(acc: __m512i, sums: &mut [f32]) {
        debug_assert!(sums.len() >= 32);
        let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(acc));
        let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(acc));
        // SAFETY: 32 values at `sums`.
        unsafe {
            let p = sums.as_mut_ptr();
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), lo));
            _mm512_storeu_ps(p.add(16), _mm512_add_ps(_mm512_loadu_ps(p.add(16)), hi));
        }
    }

    /// `dst[r][c] = bias[c] + Σ_j a[r][j] · panel[j][c]` for the tile's rows and columns, rows
    /// `dst_stride` apart: its blocks of [`ROWS`] rows walk the panel in slices of [`SLICE`]
    /// rows, each slice read from the L1 cache by every block.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and FP16; `tile.a` holds whole blocks of [`ROWS`] rows of
    /// `tile.k` values and `tile.panel` `tile.k` rows; `dst` addresses `tile.rows` rows of
    /// `tile.cols` columns that no one else writes during the call.
    #[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
    pub(super) unsafe fn tile(tile: &Tile, dst: *mut f32, dst_stride: usize) {
        let k = tile.k;
        let blocks = if k == 0 { tile.rows.div_ceil(ROWS) } else { tile.a.len() / (ROWS * k) };
        SUMS.with_borrow_mut(|sums| {
            sums.clear();
            sums.resize(blocks, [[0f32; PANEL]; ROWS]);
            // SAFETY: as the caller promises.
            unsafe { tile_into(tile, sums, dst, dst_stride) }
        })
    }

    thread_local! {
        /// Each thread's f32 sums of a tile's rows against one panel (32 KiB for a whole task).
        static SUMS: std::cell::RefCell<Vec<[[f32; PANEL]; ROWS]>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// [`tile`] with its sums in `sums` (one zeroed entry per block).
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
    unsafe fn tile_into(tile: &Tile, sums: &mut [[[f32; PANEL]; ROWS]], dst: *mut f32, dst_stride: usize) {
        let k = tile.k;
        if let Some(bias) = tile.bias {
            for row in sums.iter_mut().flatten() {
                row[..bias.len()].copy_from_slice(bias);
            }
        }
        for slice in (0..k).step_by(SLICE) {
            for (b, block) in sums.iter_mut().enumerate() {
                let a = tile.a[b * ROWS * k..].as_ptr();
                for from in (slice..(slice + SLICE).min(k)).step_by(RUN) {
                    let len = RUN.min(k - from);
                    let mut acc = [_mm512_setzero_si512(); 16];
                    // SAFETY: each row of the block holds `k` values from `from`, the panel `k` rows.
                    unsafe { run(&mut acc, a.add(from), k, tile.panel.as_ptr().add(from * PANEL), len) };
                    for (r, row) in block.iter_mut().enumerate() {
                        // SAFETY: AVX-512 F as the caller promises; 32 values in each half.
                        unsafe {
                            widen_into(acc[2 * r], &mut row[..32]);
                            widen_into(acc[2 * r + 1], &mut row[32..]);
                        }
                    }
                }
            }
        }
        for (r, row) in sums.iter().flatten().enumerate().take(tile.rows) {
            // SAFETY: row `r` of the destination holds `cols` columns only this call writes.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * dst_stride), tile.cols) };
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};

    use super::*;

    /// Against candle's f32 linear on the same f16-rounded weight and input (products exact in
    /// f32, as a GPU sums them): the f16 sums of each run err by a few f16 roundings of the run's
    /// sum, bounded here by the products' magnitudes; ragged rows, columns and runs, with and
    /// without a bias.
    #[test]
    fn equals_a_linear_on_f16_rounded_operands_within_f16_sums() {
        if !LinearF16::available() {
            return;
        }
        let dev = Device::Cpu;
        for (m, k, n, with_bias) in [(19, 77, 45, true), (16, 64, 64, false), (3, 384, 130, true), (9, 1, 70, true)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev).unwrap();
            let bias = with_bias.then_some(&b);
            let ours = LinearF16::new(&w, bias).unwrap().forward(&x).unwrap();
            let round = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
            let (w16, x16) = (round(&w), round(&x));
            let want = candle_nn::Linear::new(w16.clone(), bias.cloned()).forward(&x16).unwrap();
            assert_eq!(ours.dims(), [2, m, n]);
            let err = (&ours - &want).unwrap().abs().unwrap();
            // Σ_j |x_j · w_j| per output: each f16 addition errs by at most 2⁻¹¹ of a partial sum.
            let magnitude = x16.abs().unwrap().broadcast_matmul(&w16.abs().unwrap().t().unwrap()).unwrap();
            let bound = (&magnitude * (RUN as f64 * 2f64.powi(-11))).unwrap();
            let over = (err.clone() - bound).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(over <= 1e-6, "{m}×{k}×{n}: error past the bound by {over}");
            // And far below it in practice: the typical error is that of a few roundings.
            let mean_err = err.mean_all().unwrap().to_scalar::<f32>().unwrap();
            let mean_magnitude = magnitude.mean_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(mean_err <= 2f32.powi(-11) * mean_magnitude, "{m}×{k}×{n}: mean error {mean_err}");
        }
    }

    /// Prints what `vfmadd231ph` does against `vfmadd231ps` on one core (products per ns):
    /// `cargo test --release -p pixart-core the_f16_probe -- --nocapture`.
    #[test]
    fn the_f16_probe_measures_both_instructions() {
        if !LinearF16::available() {
            return;
        }
        // SAFETY: `available()` checked AVX-512 F and FP16.
        let (f16, f32) = unsafe { x86::products_per_ns() };
        eprintln!("products per ns: vfmadd231ph {f16:.1}, vfmadd231ps {f32:.1}");
        assert!(f16.is_finite() && f32.is_finite() && f16 > 0.1 && f32 > 0.1, "{f16} {f32}");
    }

    /// Layers run side by side give each layer's own outputs, in order, bit for bit (the same
    /// sums in the same order), ragged widths included; layers of different inputs are refused.
    #[test]
    fn layers_side_by_side_equal_each_alone() {
        if !LinearF16::available() {
            return;
        }
        let dev = Device::Cpu;
        let layer = |n: usize, k: usize, bias: bool| {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            LinearF16::new(&w, bias.then_some(&b)).unwrap()
        };
        let layers = [layer(64, 96, true), layer(45, 96, false), layer(130, 96, true)];
        let x = Tensor::randn(0f32, 1.0, (2, 21, 96), &dev).unwrap();
        let refs: Vec<&LinearF16> = layers.iter().collect();
        let together = LinearF16::forward_side_by_side(&refs, &x).unwrap();
        let alone: Vec<Tensor> = layers.iter().map(|l| l.forward(&x).unwrap()).collect();
        let alone = Tensor::cat(&alone, 2).unwrap();
        assert_eq!(together.dims(), [2, 21, 64 + 45 + 130]);
        let diff = (&together - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        let narrower = layer(8, 95, true);
        assert!(LinearF16::forward_side_by_side(&[&layers[0], &narrower], &x).is_err());
        assert!(LinearF16::forward_side_by_side(&[], &x).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        if !LinearF16::available() {
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        assert!(LinearF16::new(&w, Some(&Tensor::zeros(3, DType::F32, &dev).unwrap())).is_err());
        let layer = LinearF16::new(&w, None).unwrap();
        assert!(layer.forward(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).is_err());
    }
}
