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

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::conv_cpu::OutPtr;

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
    /// Whether this CPU has the instructions (AVX-512 F, BW and FP16), checked at run time.
    pub fn available() -> bool {
        crate::packed_linear::has_avx512_with(crate::packed_linear::Avx512Extension::Fp16)
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
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `dst[m × n] = round_f16(x)[m × k] · round_f16(W)ᵀ + b`.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        // The rows rounded to f16, padded with zero rows to whole blocks (written once: no
        // clearing pass first).
        let padded_rows = m.div_ceil(ROWS) * ROWS;
        let mut a = crate::buffers::unwritten::<u16>(padded_rows * k);
        if k > 0 {
            a.par_chunks_mut(k * ROWS).zip(x.par_chunks(k * ROWS)).for_each(|(out, rows)| {
                let (values, padding) = out.split_at_mut(rows.len());
                padding.iter_mut().for_each(|v| {
                    v.write(0);
                });
                // SAFETY: `available()` holds (checked by the op); `values` holds `rows.len()`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::round_rows(rows, values)
                }
            });
        }
        // SAFETY: each block's rows are written by `round_rows` and its padding rows above (the
        // zipped chunks cover every block: the last chunk of `x` is the last block's rows).
        let a = unsafe { crate::buffers::assume_written(a) };
        let mut dst = crate::buffers::unwritten(m * n);
        let out = OutPtr::unwritten(&mut dst);
        let panels = n.div_ceil(PANEL);
        let tasks: Vec<(usize, usize)> = (0..panels)
            .step_by(PANELS_PER_TASK)
            .flat_map(|p| (0..m).step_by(ROWS_PER_TASK).map(move |r| (p, r)))
            .collect();
        tasks.par_iter().for_each(|&(first, rows_from)| {
            let rows = ROWS_PER_TASK.min(m - rows_from);
            for p in first..(first + PANELS_PER_TASK).min(panels) {
                let cols = PANEL.min(n - p * PANEL);
                let tile = Tile {
                    a: &a[rows_from * k..(rows_from + rows.div_ceil(ROWS) * ROWS) * k],
                    k,
                    panel: &self.packed[p * k * PANEL..(p + 1) * k * PANEL],
                    bias: if self.bias.is_empty() { None } else { Some(&self.bias[p * PANEL..p * PANEL + cols]) },
                    rows,
                    cols,
                };
                // SAFETY: `available()` was checked by the op; the destination addresses `rows`
                // rows of `cols` columns (stride `n`) that only this task writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::tile(&tile, out.offset(rows_from * n + p * PANEL).get(), n)
                }
            }
        });
        // SAFETY: the tasks cover every row and every panel, and `tile` stores every column of its
        // panel in every row of its task.
        unsafe { crate::buffers::assume_written(dst) }
    }
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

impl CustomOp1 for LinearF16 {
    fn name(&self) -> &'static str {
        "linear-f16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if !Self::available() {
            candle_core::bail!("linear-f16: this CPU has no AVX512-FP16")
        }
        let features = (self.in_features, self.out_features);
        let (x, m, shape) = crate::packed_linear::input_rows(storage, layout, features, "linear-f16")?;
        Ok((CpuStorage::F32(self.matmul(x, m)), shape))
    }
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
        macro_rules! twelve {
            ($op:literal, $rounds:expr) => {
                asm!(
                    "vxorps zmm0, zmm0, zmm0", "vxorps zmm1, zmm1, zmm1", "vxorps zmm2, zmm2, zmm2",
                    "vxorps zmm3, zmm3, zmm3", "vxorps zmm4, zmm4, zmm4", "vxorps zmm5, zmm5, zmm5",
                    "vxorps zmm6, zmm6, zmm6", "vxorps zmm7, zmm7, zmm7", "vxorps zmm8, zmm8, zmm8",
                    "vxorps zmm9, zmm9, zmm9", "vxorps zmm10, zmm10, zmm10", "vxorps zmm11, zmm11, zmm11",
                    "vxorps zmm30, zmm30, zmm30", "vxorps zmm31, zmm31, zmm31",
                    "2:",
                    concat!($op, " zmm0, zmm30, zmm31"), concat!($op, " zmm1, zmm30, zmm31"),
                    concat!($op, " zmm2, zmm30, zmm31"), concat!($op, " zmm3, zmm30, zmm31"),
                    concat!($op, " zmm4, zmm30, zmm31"), concat!($op, " zmm5, zmm30, zmm31"),
                    concat!($op, " zmm6, zmm30, zmm31"), concat!($op, " zmm7, zmm30, zmm31"),
                    concat!($op, " zmm8, zmm30, zmm31"), concat!($op, " zmm9, zmm30, zmm31"),
                    concat!($op, " zmm10, zmm30, zmm31"), concat!($op, " zmm11, zmm30, zmm31"),
                    "dec {left}",
                    "jnz 2b",
                    left = inout(reg) $rounds => _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                    out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
                    out("zmm10") _, out("zmm11") _, out("zmm30") _, out("zmm31") _,
                    options(nomem, nostack),
                )
            };
        }
        const ROUNDS: u64 = 2_000_000;
        let best = |f: &dyn Fn()| {
            (0..3)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        // SAFETY: registers only; AVX-512 F and FP16 as the caller promises.
        let f16 = best(&|| unsafe { twelve!("vfmadd231ph", ROUNDS) });
        // SAFETY: as above.
        let f32 = best(&|| unsafe { twelve!("vfmadd231ps", ROUNDS) });
        let products = (ROUNDS * 12) as f64 / 1e9;
        (products * 32.0 / f16, products * 16.0 / f32)
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
