//! `y = x · Wᵀ + b` on the CPU with the weight in bf16 and the input rounded to bf16, products
//! summed in f32, through AVX512-BF16's `vdpbf16ps` (two bf16 products per f32 lane, twice the
//! f32 FMA's work per instruction): what a bf16 model computes in its matrix products, with
//! everything around them left in f32.
//!
//! The weight `[n, k]` is packed once into panels of 32 output columns, `[k / 2][32][2]` bf16
//! per panel, so that one 64-byte load holds one pair of `k` for 32 columns. Each call rounds
//! the input rows to bf16 pairs (`u32`), then every task takes a few panels and runs 8 rows at a
//! time against them: per pair of `k`, each row's pair is broadcast and multiplied with two
//! vectors of the panel into 16 f32 accumulators, which start at the bias.
//!
//! Where `vdpbf16ps` is not faster than f32 FMAs (a Sapphire Rapids-class Xeon issues one every
//! other cycle: half the products per second of its two f32 FMA pipes), the same products run as
//! [`Bf16Kernel::WidenedFma`]: the rows are rounded to bf16 and kept as f32, the panel's bf16
//! pairs widened to f32 in registers (a shift and a mask, exact), summed by f32 FMAs. Products of
//! bf16 values are exact in f32 either way; only the rounding of the sums differs.

use candle_core::{DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::conv_cpu::OutPtr;
use crate::packed_linear::{forward_side_by_side, output_columns, tasks, Avx512Extension, PackedLayer};

/// How matrix products run on the CPU: in f32, or with bf16 operands summed in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuProducts {
    /// In f32 (or the layer's dtype).
    #[default]
    F32,
    /// Operands rounded to bf16, products summed in f32 (`vdpbf16ps`), where
    /// [`LinearBf16::available`]; elsewhere as [`CpuProducts::F32`].
    Bf16,
    /// The transformer's linear layers with operands rounded to f16, products summed in f16
    /// along short runs and in f32 across them (AVX512-FP16, [`crate::linear_f16`]), where
    /// [`crate::linear_f16::LinearF16::available`]; elsewhere, and for the VAE (which a model
    /// in f16 runs in f32), as [`CpuProducts::F32`].
    F16,
}

impl CpuProducts {
    /// Whether products run in bf16 on this CPU.
    pub fn in_bf16(self) -> bool {
        self == CpuProducts::Bf16 && LinearBf16::available()
    }

    /// Whether the transformer's linear layers multiply in f16 on this CPU.
    pub fn in_f16(self) -> bool {
        self == CpuProducts::F16 && crate::linear_f16::LinearF16::available()
    }

    /// Whether linear layers pack their own copy of the weight (bf16 or f16 products): the
    /// loaded f32 weights are then best left row-major.
    pub fn packs_weights(self) -> bool {
        self.in_bf16() || self.in_f16()
    }
}

/// How [`LinearBf16`] (and the bf16 Winograd GEMMs) compute their products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps`: two bf16 products per f32 lane in one instruction.
    DotProduct,
    /// The bf16 operands widened to f32 and summed by f32 FMAs.
    WidenedFma,
}

impl Bf16Kernel {
    /// The kernel of this process: `PIXART_BF16_KERNEL` (`dot` or `fma`, read once) or else the
    /// faster one here, from a throughput probe of the two instructions on registers (under a
    /// millisecond, run once): `vdpbf16ps` where it does at least 1.3× the f32 FMA's products
    /// per second.
    pub fn chosen() -> Self {
        static KERNEL: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| match std::env::var("PIXART_BF16_KERNEL").ok().as_deref().map(str::trim) {
            Some("dot") => Self::DotProduct,
            Some("fma") => Self::WidenedFma,
            _ => Self::probe(),
        })
    }

    /// `dot` or `fma`, as `PIXART_BF16_KERNEL` names them.
    pub fn name(self) -> &'static str {
        match self {
            Self::DotProduct => "dot",
            Self::WidenedFma => "fma",
        }
    }

    /// The faster kernel by [`x86::products_per_ns`]; `DotProduct` where the probe cannot run.
    fn probe() -> Self {
        #[cfg(target_arch = "x86_64")]
        if LinearBf16::available() {
            // SAFETY: `available()` checked AVX-512 F, BW and BF16.
            let (dot, fma) = unsafe { x86::products_per_ns() };
            return if dot >= 1.3 * fma { Self::DotProduct } else { Self::WidenedFma };
        }
        Self::DotProduct
    }

    /// `u32` words per pair of a row's bf16 values: one pair (`DotProduct`) or two f32.
    fn words_per_pair(self) -> usize {
        match self {
            Self::DotProduct => 1,
            Self::WidenedFma => 2,
        }
    }

    /// `u32` words of one `k`-long row as [`round_rows`] writes it for this kernel.
    pub(crate) fn row_words(self, k: usize) -> usize {
        k.div_ceil(2) * self.words_per_pair()
    }
}

/// Output columns per panel (two vectors of 16 f32).
pub(crate) const PANEL: usize = 32;
/// Input rows per micro-kernel call ([`Bf16Kernel::DotProduct`]: 16 accumulators).
const ROWS: usize = 8;
/// Input rows per micro-kernel call of [`Bf16Kernel::WidenedFma`] (24 accumulators and four
/// widened weight vectors: the two extra ALU operations per pair spread over more FMAs).
const WIDENED_ROWS: usize = 12;
/// Panels per parallel task (their bf16 weights stay in a core's L2 while the rows stream).
const PANELS_PER_TASK: usize = 4;
/// Input rows per parallel task.
const ROWS_PER_TASK: usize = 128;

/// A linear layer's weight (and bias) packed for [`LinearBf16::forward`].
#[derive(Debug, Clone)]
pub struct LinearBf16 {
    out_features: usize,
    in_features: usize,
    /// `[panel][k / 2][PANEL][2]` bf16 bits, `k` padded to even, columns padded to the panel.
    packed: Vec<u16>,
    /// `out_features` values, or empty.
    bias: Vec<f32>,
    kernel: Bf16Kernel,
}

impl LinearBf16 {
    /// Whether this CPU has the instructions (AVX-512 F, BW and BF16), checked at run time,
    /// and `PIXART_SIMD` leaves AVX-512 on (with `avx2` a newer CPU runs what an AVX2-only one
    /// does).
    pub fn available() -> bool {
        crate::packed_linear::offered(Avx512Extension::Bf16)
    }

    /// Packs `weight` `[out, in]` (any float dtype; rounded to bf16 to nearest even) and
    /// `bias` `[out]` (kept in f32), for [`Bf16Kernel::chosen`].
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        Self::with_kernel(weight, bias, Bf16Kernel::chosen())
    }

    /// As [`LinearBf16::new`], computing with `kernel`.
    pub fn with_kernel(weight: &Tensor, bias: Option<&Tensor>, kernel: Bf16Kernel) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()?;
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![0u16; panels * pairs * PANEL * 2];
        packed.par_chunks_mut(pairs * PANEL * 2).enumerate().for_each(|(p, panel)| {
            for (pair, lanes) in panel.chunks_exact_mut(PANEL * 2).enumerate() {
                for (c, lane) in lanes.chunks_exact_mut(2).enumerate() {
                    let row = p * PANEL + c;
                    if row < n {
                        for (i, v) in lane.iter_mut().enumerate() {
                            let col = 2 * pair + i;
                            *v = if col < k { w[row * k + col].to_bits() } else { 0 };
                        }
                    }
                }
            }
        });
        let bias = crate::packed_linear::bias_values(bias, n, "linear-bf16")?;
        Ok(Self { out_features: n, in_features: k, packed, bias, kernel })
    }

    /// How it computes its products.
    pub fn kernel(&self) -> Bf16Kernel {
        self.kernel
    }

    /// `x` `[…, in]` f32 on the CPU → `[…, out]` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        forward_side_by_side(&[self], x)
    }

    /// `x` `[…, in]` f32 on the CPU through each of `layers` (all `in` wide, one kernel) →
    /// `[…, Σ out]`, their outputs side by side in `layers`' order: one op, the input rounded
    /// once (a self-attention's Q, K and V in one product).
    pub fn forward_side_by_side(layers: &[&LinearBf16], x: &Tensor) -> candle_core::Result<Tensor> {
        forward_side_by_side(layers, x)
    }
}

impl PackedLayer for LinearBf16 {
    const NAME: &'static str = "linear-bf16";
    const EXTENSION: Avx512Extension = Avx512Extension::Bf16;

    fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    fn reads_rows_like(&self, other: &Self) -> bool {
        self.kernel == other.kernel
    }

    /// `dst[m × Σn] = round_bf16(x)[m × k] · round_bf16(W_l)ᵀ + b_l` for each layer `l`.
    unsafe fn side_by_side(layers: &[&Self], x: &[f32], m: usize) -> Vec<f32> {
        let Some(first) = layers.first() else { return Vec::new() };
        let (k, kernel) = (first.in_features, first.kernel);
        let (pairs, words) = (k.div_ceil(2), kernel.row_words(k));
        // The rows rounded to bf16, as the kernel reads them.
        let mut a = vec![0u32; m * words];
        a.par_chunks_mut(words * ROWS).zip(x.par_chunks(k * ROWS)).for_each(|(out, rows)| {
            // SAFETY: the CPU has AVX512-BF16, as the caller promises; `out` has `row_words(k)`
            // per row.
            unsafe { round_rows(rows, k, out, kernel) }
        });
        let (starts, n) = output_columns(layers.iter().map(|l| l.out_features));
        let mut dst = crate::buffers::unwritten(m * n);
        let out = OutPtr::unwritten(&mut dst);
        let panels: Vec<usize> = layers.iter().map(|l| l.out_features.div_ceil(PANEL)).collect();
        tasks(&panels, m, (PANELS_PER_TASK, ROWS_PER_TASK)).par_iter().for_each(|task| {
            let layer = layers[task.layer];
            for p in task.panels.clone() {
                let cols = PANEL.min(layer.out_features - p * PANEL);
                let panel = &layer.packed[p * pairs * PANEL * 2..(p + 1) * pairs * PANEL * 2];
                let bias = if layer.bias.is_empty() { None } else { Some(&layer.bias[p * PANEL..p * PANEL + cols]) };
                let a = &a[task.rows.start * words..task.rows.end * words];
                let tile = Tile { a, pairs, panel, bias, cols, kernel };
                let dst = out.offset(task.rows.start * n + starts[task.layer] + p * PANEL);
                // SAFETY: the CPU has AVX512-BF16, as the caller promises; `tile` holds the
                // task's rows and a whole panel; the destination addresses those rows' `cols`
                // columns (stride `n`), which only this task writes.
                unsafe { product(&tile, dst.get(), n) }
            }
        });
        // SAFETY: the tasks cover every row and every panel of every layer, whose columns tile
        // each row, and `product` stores every column of its panel in every row of its tile.
        unsafe { crate::buffers::assume_written(dst) }
    }
}

/// Rounds each `k`-long row of `x` to bf16 (to nearest even) into `out` as `kernel` reads it,
/// [`Bf16Kernel::row_words`] per row: for [`Bf16Kernel::DotProduct`] as pairs, the low half the
/// even column; for [`Bf16Kernel::WidenedFma`] as f32 bits. An odd `k` is padded with a zero.
///
/// # Safety
/// The CPU has what [`LinearBf16::available`] checks.
pub(crate) unsafe fn round_rows(x: &[f32], k: usize, out: &mut [u32], kernel: Bf16Kernel) {
    #[cfg(target_arch = "x86_64")]
    for (row, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(kernel.row_words(k))) {
        // SAFETY: as the caller promises.
        unsafe {
            match kernel {
                Bf16Kernel::DotProduct => x86::round_row(row, out),
                Bf16Kernel::WidenedFma => x86::round_row_widened(row, out),
            }
        }
    }
}

/// `dst[r][c] = bias[c] + Σ_p a[r][p] · panel[p][c]` for every row of `tile.a` and the
/// panel's `tile.cols` columns, rows `dst_stride` apart, by `tile.kernel` ([`ROWS`] or
/// [`WIDENED_ROWS`] rows per micro-kernel call, then fewer).
///
/// # Safety
/// The CPU has what [`LinearBf16::available`] checks; `tile.a` was written by [`round_rows`]
/// for `tile.kernel`; `dst` addresses its rows' `tile.cols` columns, which no one else writes
/// during the call.
pub(crate) unsafe fn product(tile: &Tile, dst: *mut f32, dst_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let words = tile.pairs * tile.kernel.words_per_pair();
        let rows = tile.a.len() / words.max(1);
        let widened = tile.kernel == Bf16Kernel::WidenedFma;
        let mut done = 0;
        while done < rows {
            let left = rows - done;
            let dst = dst.wrapping_add(done * dst_stride);
            let strip = |n: usize| Tile { a: &tile.a[done * words..(done + n) * words], ..*tile };
            // SAFETY: as the caller promises; each call covers the next rows, as many as it returns.
            let n = unsafe {
                if widened && left >= WIDENED_ROWS {
                    x86::tile::<WIDENED_ROWS>(&strip(WIDENED_ROWS), dst, dst_stride)
                } else if left >= ROWS {
                    x86::tile::<ROWS>(&strip(ROWS), dst, dst_stride)
                } else if left >= 4 {
                    x86::tile::<4>(&strip(4), dst, dst_stride)
                } else {
                    x86::tile::<1>(&strip(1), dst, dst_stride)
                }
            };
            done += n;
        }
    }
}

/// Packs the `rows × cols` f32 matrix `src` (rows `stride` apart) as panels of its columns with
/// pairs of its rows, `[cols / 32][rows / 2][32][2]` bf16 bits (zero-padded), into `out`: the
/// right-hand operand of [`product`] when the reduction runs along `src`'s rows.
///
/// # Safety
/// The CPU has what [`LinearBf16::available`] checks; `src` holds the rows and columns.
pub(crate) unsafe fn pack_columns(src: &[f32], (rows, cols, stride): (usize, usize, usize), out: &mut Vec<u16>) {
    let pairs = rows.div_ceil(2);
    out.clear();
    out.resize(cols.div_ceil(PANEL) * pairs * PANEL * 2, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller promises.
    unsafe {
        x86::pack_columns(src, (rows, cols, stride), out)
    }
}

/// The operands of [`product`].
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    /// Rows from [`round_rows`] for `kernel`, [`Bf16Kernel::row_words`] each.
    pub a: &'a [u32],
    /// Pairs of the reduced dimension.
    pub pairs: usize,
    /// `[pairs][PANEL][2]` bf16 bits.
    pub panel: &'a [u16],
    /// The panel's `cols` biases, if any.
    pub bias: Option<&'a [f32]>,
    /// Valid columns of the panel (the last panel may be partial).
    pub cols: usize,
    /// How the products are computed.
    pub kernel: Bf16Kernel,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Bf16Kernel, Tile, PANEL};

    /// `row` rounded to bf16 (to nearest even, as `half::bf16::from_f32` for normal numbers),
    /// as pairs; an odd last column is paired with zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], out: &mut [u32]) {
        let mut chunks = row.chunks_exact(32);
        let mut at = 0;
        for chunk in &mut chunks {
            let lo = _mm512_loadu_ps(chunk.as_ptr());
            let hi = _mm512_loadu_ps(chunk.as_ptr().add(16));
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), pairs);
            at += 16;
        }
        let rest = chunks.remainder();
        for (i, pair) in out[at..].iter_mut().enumerate() {
            let lo = half::bf16::from_f32(rest[2 * i]).to_bits() as u32;
            let hi = rest.get(2 * i + 1).map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
            *pair = lo | (hi << 16);
        }
    }

    /// See [`super::pack_columns`]; `out` is sized and zeroed.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_columns(src: &[f32], (rows, cols, stride): (usize, usize, usize), out: &mut [u16]) {
        let pairs = rows.div_ceil(2);
        // Words 0..16 of the converted vector are the even row, 16..32 the odd one: interleave.
        let order: [i16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as i16);
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for panel in 0..cols.div_ceil(PANEL) {
            for half in 0..2 {
                let first = panel * PANEL + 16 * half;
                let valid = cols.saturating_sub(first).min(16);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                for pair in 0..pairs {
                    let even = _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add(2 * pair * stride + first));
                    let odd = if 2 * pair + 1 < rows {
                        _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add((2 * pair + 1) * stride + first))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
                    let at = ((panel * pairs + pair) * PANEL + 16 * half) * 2;
                    _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), _mm512_permutexvar_epi16(order, words));
                }
            }
        }
    }

    /// `row` rounded to bf16 as [`round_row`] does, each value kept as f32 (exactly), padded with
    /// a zero to an even length.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row_widened(row: &[f32], out: &mut [u32]) {
        let mut chunks = row.chunks_exact(16);
        let mut at = 0;
        for chunk in &mut chunks {
            let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(chunk.as_ptr())));
            let widened = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits));
            _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), widened);
            at += 16;
        }
        for (i, v) in out[at..].iter_mut().enumerate() {
            *v = chunks.remainder().get(i).map_or(0, |&x| half::bf16::from_f32(x).to_f32().to_bits());
        }
    }

    /// Products per nanosecond of `vdpbf16ps` and of `vfmadd231ps` on 512-bit registers, twelve
    /// independent accumulators each, the best of five alternating timings of each. Every lane
    /// of both multiplicands is `0x3F80_3F80`: a pair of bf16 ones, and a normal f32 (≈1.004),
    /// so no sum overflows and no operand is denormal (which would slow the FMA down, not
    /// `vdpbf16ps`, which flushes them).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn products_per_ns() -> (f64, f64) {
        use crate::packed_linear::twelve_chains;
        let ones = _mm512_castsi512_ps(_mm512_set1_epi32(0x3F80_3F80));
        // SAFETY (both loops): registers only; the caller checked the instructions.
        let dot = |rounds: u64| unsafe { twelve_chains!("vdpbf16ps", rounds, ones) };
        let fma = |rounds: u64| unsafe { twelve_chains!("vfmadd231ps", rounds, ones) };
        let [dot, fma] = crate::packed_linear::products_per_ns(10_000, [(&dot, 32.0), (&fma, 16.0)]);
        (dot, fma)
    }

    /// `R` rows of `tile` into `dst` (row stride `dst_stride`), starting from the bias; returns `R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize>(tile: &Tile, dst: *mut f32, dst_stride: usize) -> usize {
        let mask = |from: usize| -> __mmask16 {
            let valid = tile.cols.saturating_sub(from).min(16);
            ((1u32 << valid) - 1) as __mmask16
        };
        let (low, high) = (mask(0), mask(16));
        let start = match tile.bias {
            Some(b) => {
                [_mm512_maskz_loadu_ps(low, b.as_ptr()), _mm512_maskz_loadu_ps(high, b.as_ptr().wrapping_add(16))]
            }
            None => [_mm512_setzero_ps(); 2],
        };
        let acc = match tile.kernel {
            Bf16Kernel::DotProduct => dot_products::<R>(tile, [start; R]),
            Bf16Kernel::WidenedFma => widened_fma::<R>(tile, [start; R]),
        };
        for (r, acc) in acc.iter().enumerate() {
            let row = dst.add(r * dst_stride);
            _mm512_mask_storeu_ps(row, low, acc[0]);
            _mm512_mask_storeu_ps(row.add(16), high, acc[1]);
        }
        R
    }

    /// `acc[r] += Σ_p a[r][p] · panel[p]` by `vdpbf16ps`, `a` as pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn dot_products<const R: usize>(tile: &Tile, mut acc: [[__m512; 2]; R]) -> [[__m512; 2]; R] {
        let panel = tile.panel.as_ptr();
        for p in 0..tile.pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * PANEL * 2).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * PANEL * 2 + 32).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = *tile.a.get_unchecked(r * tile.pairs + p);
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
            }
        }
        acc
    }

    /// `acc[r] += Σ_p a[r][p] · panel[p]` by f32 FMAs, `a` as f32 bits, each of the panel's
    /// pairs widened to its even (shifted up) and odd (masked) f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn widened_fma<const R: usize>(tile: &Tile, mut acc: [[__m512; 2]; R]) -> [[__m512; 2]; R] {
        let panel = tile.panel.as_ptr();
        let a = tile.a.as_ptr().cast::<f32>();
        let words = 2 * tile.pairs;
        let odd_mask = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        for p in 0..tile.pairs {
            let w0 = _mm512_loadu_si512(panel.add(p * PANEL * 2).cast());
            let w1 = _mm512_loadu_si512(panel.add(p * PANEL * 2 + 32).cast());
            let even =
                [_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w0)), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w1))];
            let odd = [
                _mm512_castsi512_ps(_mm512_and_si512(w0, odd_mask)),
                _mm512_castsi512_ps(_mm512_and_si512(w1, odd_mask)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x_even = _mm512_set1_ps(*a.add(r * words + 2 * p));
                let x_odd = _mm512_set1_ps(*a.add(r * words + 2 * p + 1));
                acc[0] = _mm512_fmadd_ps(x_even, even[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(x_even, even[1], acc[1]);
                acc[0] = _mm512_fmadd_ps(x_odd, odd[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(x_odd, odd[1], acc[1]);
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// The probe runs both instruction loops to completion and times something (a probe that
    /// measured nothing would leave the choice to chance).
    #[test]
    fn the_probe_measures_both_instructions() {
        if !LinearBf16::available() {
            return;
        }
        // SAFETY: `available()` checked AVX-512 F, BW and BF16.
        let (dot, fma) = unsafe { x86::products_per_ns() };
        eprintln!("products per ns: vdpbf16ps {dot:.1}, f32 FMA {fma:.1}");
        assert!(dot.is_finite() && fma.is_finite() && dot > 0.1 && fma > 0.1, "{dot} {fma}");
    }

    /// Against candle's f32 linear on the same bf16-rounded weight and input (what either kernel
    /// multiplies; products are exact in f32, only the order of the sums differs), with ragged
    /// rows, columns and an odd `k`, for both kernels.
    #[test]
    fn equals_a_linear_on_bf16_rounded_operands() {
        if !LinearBf16::available() {
            return;
        }
        let dev = Device::Cpu;
        let shapes = [(19, 77, 45, true), (16, 64, 64, false), (3, 384, 100, true)];
        let cases = shapes.iter().flat_map(|&s| [(s, Bf16Kernel::DotProduct), (s, Bf16Kernel::WidenedFma)]);
        for ((m, k, n, with_bias), kernel) in cases {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev).unwrap();
            let bias = with_bias.then_some(&b);
            let ours = LinearBf16::with_kernel(&w, bias, kernel).unwrap().forward(&x).unwrap();
            let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            let want = candle_nn::Linear::new(round(&w), bias.cloned()).forward(&round(&x)).unwrap();
            assert_eq!(ours.dims(), [2, m, n]);
            let err = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= 2e-6 * scale * (k as f32).sqrt(), "{kernel:?} {m}×{k}×{n}: {err} vs {scale}");
        }
    }

    /// Layers run side by side give each layer's own outputs, in order, bit for bit (the same
    /// sums in the same order), for both kernels and ragged widths; layers of different inputs
    /// or kernels are refused.
    #[test]
    fn layers_side_by_side_equal_each_alone() {
        if !LinearBf16::available() {
            return;
        }
        let dev = Device::Cpu;
        let layer = |n: usize, k: usize, bias: bool, kernel: Bf16Kernel| {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            LinearBf16::with_kernel(&w, bias.then_some(&b), kernel).unwrap()
        };
        let x = Tensor::randn(0f32, 1.0, (2, 21, 77), &dev).unwrap();
        for kernel in [Bf16Kernel::DotProduct, Bf16Kernel::WidenedFma] {
            let layers = [layer(32, 77, true, kernel), layer(45, 77, false, kernel), layer(130, 77, true, kernel)];
            let refs: Vec<&LinearBf16> = layers.iter().collect();
            let together = LinearBf16::forward_side_by_side(&refs, &x).unwrap();
            let alone: Vec<Tensor> = layers.iter().map(|l| l.forward(&x).unwrap()).collect();
            let alone = Tensor::cat(&alone, 2).unwrap();
            assert_eq!(together.dims(), [2, 21, 32 + 45 + 130]);
            let diff = (&together - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{kernel:?}");
            assert!(LinearBf16::forward_side_by_side(&[&layers[0], &layer(8, 76, true, kernel)], &x).is_err());
        }
        let (dot, fma) = (layer(8, 77, true, Bf16Kernel::DotProduct), layer(8, 77, true, Bf16Kernel::WidenedFma));
        assert!(LinearBf16::forward_side_by_side(&[&dot, &fma], &x).is_err());
    }
}
