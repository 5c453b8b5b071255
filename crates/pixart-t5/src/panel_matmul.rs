//! `x · Wᵀ` for a block-quantized `W` on the CPU with integer dot products, keeping no
//! repacked copy of the weight: each task decodes [`PANEL_ROWS`] weight rows at a time into a
//! small per-thread panel that puts the rows in the vector lanes, then runs every token against
//! it.
//!
//! In the panel, four consecutive weights of each of the 8 rows form one 32-bit lane, so one
//! `vpdpbusd` (AVX-512 VNNI; on AVX2 `vpmaddubsw` + `vpmaddwd`) multiplies a broadcast group of
//! four activation bytes with 8 rows at once. Activations are quantized like ggml's (q8_0 for
//! q8_0 weights, q8_K for the k-quants) and offset by 128 to be unsigned; the offset's
//! contribution (`128 · Σ w` per unit) starts each unit's integer sum negated. q8_0 on AVX2 is
//! the exception: its full 8-bit weights would saturate `vpmaddubsw`'s 16-bit pair sums against
//! unsigned activations, so there the activations stay signed and each product is taken as
//! `|x| · (w · sign x)` (ggml's trick; pairs stay within 2 · 127²). Each unit's sum is scaled by
//! `scale_w · d_x` (and the k-quants' minimums subtract `min_w · d_x · Σ q_x`) in f32.
//!
//! The panel (8 rows × `k` bytes plus per-unit scales) is the only extra memory: 80 KiB per
//! thread for T5 XXL's widest matrix.

use rayon::prelude::*;

use crate::ggml_blocks::{quantize_activations, BlockFormat};

/// Weight rows per panel (the lanes of a 256-bit vector of i32).
pub(crate) const PANEL_ROWS: usize = 8;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 4;

/// The instruction sets the panel kernel has a build for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX2 + FMA + F16C: `vpmaddubsw` (`u8 × i8` pairs, saturating to i16) then `vpmaddwd`:
    /// offset activations for the k-quants (`|w| ≤ 64`, `2 · 255 · 64 < 2¹⁵`), signed ones with
    /// the sign moved onto the weights for q8_0.
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (+ AVX-512 VL/BW): `vpdpbusd`, exact for every format.
    Vnni,
}

impl Kernel {
    /// The best kernel this CPU runs for `format`, if any, within the level `PIXART_SIMD` allows
    /// ([`Simd::detected`]: `avx2` measures the AVX2 kernel on a VNNI CPU).
    pub(crate) fn detected(format: BlockFormat) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use pixart_core::fast_math::Simd;
            let level = Simd::detected();
            let avx2 = level >= Simd::Avx2
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let vnni = level == Simd::Avx512
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512f");
            if avx2 && vnni {
                return Some(Self::Vnni);
            }
            if avx2 {
                return Some(Self::Avx2);
            }
        }
        let _ = format;
        None
    }

    /// Tokens computed together against one panel (registers: two accumulators per token).
    fn tokens(self) -> usize {
        match self {
            Kernel::Avx2 => 4,
            Kernel::Vnni => 8,
        }
    }
}

/// Activations ready for the kernel: values offset to `u8` (or left as `i8` bits for
/// [`signed_activations`]), one scale per activation block ([`BlockFormat::activation_block`]),
/// and (k-quants with minimums) `Σ q_x` per weight unit.
struct Activations {
    k: usize,
    units: usize,
    blocks: usize,
    values: Vec<u8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Activations {
    fn new(format: BlockFormat, x: &[f32], k: usize, signed: bool) -> Self {
        let quantized = quantize_activations(format, x);
        let unit = format.unit();
        let sums = if format.has_mins() {
            let units = quantized.values.par_chunks_exact(unit).with_min_len(256);
            units.map(|q| q.iter().map(|&v| v as i32).sum::<i32>() as f32).collect()
        } else {
            Vec::new()
        };
        let offset = if signed { 0 } else { 0x80 };
        let values = quantized.values.par_iter().with_min_len(8192).map(|&v| (v as u8) ^ offset).collect();
        let blocks = k / format.activation_block();
        Self { k, units: k / unit, blocks, values, scales: quantized.scales, sums }
    }
}

/// Whether `kernel` takes `format`'s activations signed (q8_0 on AVX2), not offset to `u8`.
fn signed_activations(kernel: Kernel, format: BlockFormat) -> bool {
    kernel == Kernel::Avx2 && format == BlockFormat::Q8_0
}

/// One panel: [`PANEL_ROWS`] weight rows decoded and interleaved, with their per-unit data as
/// `[unit][row]`.
struct Panel {
    /// `[k / 4][row][4]` bytes.
    values: Vec<i8>,
    /// `−128 · Σ w` over each unit, `[unit][row]`.
    offsets: Vec<i32>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Panel {
    fn new(k: usize, units: usize) -> Self {
        Self {
            values: vec![0; PANEL_ROWS * k],
            offsets: vec![0; PANEL_ROWS * units],
            scales: vec![0.0; PANEL_ROWS * units],
            mins: vec![0.0; PANEL_ROWS * units],
        }
    }

    /// Decodes `weights` (up to [`PANEL_ROWS`] rows of `row_bytes`); missing rows are zero.
    fn fill(&mut self, format: BlockFormat, weights: &[u8], row_bytes: usize, k: usize) {
        let present = weights.len() / row_bytes;
        if present < PANEL_ROWS {
            self.scales.fill(0.0);
            self.mins.fill(0.0);
        }
        let mut rows = [std::ptr::null(); PANEL_ROWS];
        for (r, row) in weights.chunks_exact(row_bytes).enumerate() {
            rows[r] = row.as_ptr();
            if format != BlockFormat::Q8_0 {
                let (scales, mins) = (&mut self.scales, &mut self.mins);
                format.row_scales(row, |u, scale, min| {
                    scales[u * PANEL_ROWS + r] = scale;
                    mins[u * PANEL_ROWS + r] = min;
                });
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only reached through a `Kernel` (AVX2 present); the first `present` pointers
        // are rows of `k` weights in `format`; `values` and `offsets` are sized for `k`
        // weights of 8 rows.
        unsafe {
            let (values, offsets) = (self.values.as_mut_ptr(), self.offsets.as_mut_ptr());
            let runs = k / 32;
            match format {
                BlockFormat::Q8_0 => {
                    // One f16 scale per run: converted 8 rows at a time (F16C).
                    x86::q8_0_scales(&rows, present, runs, self.scales.as_mut_ptr());
                    x86::interleave::<x86::Q8_0>(&rows, present, runs, values, offsets)
                }
                BlockFormat::Q4K => x86::interleave::<x86::Q4K>(&rows, present, runs, values, offsets),
                BlockFormat::Q5K => x86::interleave::<x86::Q5K>(&rows, present, runs, values, offsets),
                BlockFormat::Q6K => x86::interleave::<x86::Q6K>(&rows, present, runs, values, offsets),
            }
        }
    }
}

/// `dst[m × n] = x[m × k] · Wᵀ`, `w` the `n` rows of `format` blocks as bytes; `k` a multiple
/// of the format's block.
pub(crate) fn matmul(
    kernel: Kernel,
    format: BlockFormat,
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    w: &[u8],
    dst: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    let row_bytes = k / format.block_weights() * format.block_bytes();
    let activations = Activations::new(format, x, k, signed_activations(kernel, format));
    let panels = n.div_ceil(PANEL_ROWS);
    // `[panel][token][row]`, so that tasks write disjoint runs; scattered into `dst` at the end.
    let mut by_panel = vec![0f32; panels * m * PANEL_ROWS];
    let task_len = PANELS_PER_TASK * m * PANEL_ROWS;
    by_panel.par_chunks_mut(task_len).enumerate().for_each_init(
        || Panel::new(k, activations.units),
        |panel, (task, out)| {
            for (i, out) in out.chunks_exact_mut(m * PANEL_ROWS).enumerate() {
                let first_row = (task * PANELS_PER_TASK + i) * PANEL_ROWS;
                let last_row = (first_row + PANEL_ROWS).min(n);
                panel.fill(format, &w[first_row * row_bytes..last_row * row_bytes], row_bytes, k);
                // The next panel's blocks, fetched into the cache while this one computes.
                let ahead = &w[last_row * row_bytes..(last_row + PANEL_ROWS).min(n) * row_bytes];
                run_tokens(kernel, format, panel, &activations, ahead, out);
            }
        },
    );
    dst[..m * n].par_chunks_exact_mut(n).enumerate().for_each(|(t, dst)| {
        for (p, dst) in dst.chunks_mut(PANEL_ROWS).enumerate() {
            let at = (p * m + t) * PANEL_ROWS;
            dst.copy_from_slice(&by_panel[at..at + dst.len()]);
        }
    });
}

/// Every token against one panel, [`Kernel::tokens`] at a time, the tail one by one; `ahead`
/// (the next panel's blocks) is prefetched in even shares across the calls.
fn run_tokens(kernel: Kernel, format: BlockFormat, panel: &Panel, x: &Activations, ahead: &[u8], out: &mut [f32]) {
    let m = out.len() / PANEL_ROWS;
    let tile = kernel.tokens();
    let calls = m / tile + m % tile;
    let share = ahead.len().div_ceil(calls.max(1)).next_multiple_of(64);
    let mut first = 0;
    let mut ahead = ahead.chunks(share.max(64));
    while first < m {
        let tokens = if m - first >= tile { tile } else { 1 };
        let out = &mut out[first * PANEL_ROWS..(first + tokens) * PANEL_ROWS];
        let next = ahead.next().unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::detected` only returns a kernel whose features the CPU has; the
        // panel and the activations hold `x.units` units of `format`, `out` `tokens` rows.
        unsafe {
            // Per format: groups of 4 weights per unit, units per activation scale, minimums.
            macro_rules! by_format {
                ($kernel:ident, $tokens:literal) => {
                    match format {
                        BlockFormat::Q8_0 => x86::$kernel::<$tokens, 8, 1, false>(panel, x, first, next, out),
                        BlockFormat::Q4K | BlockFormat::Q5K => {
                            x86::$kernel::<$tokens, 8, 8, true>(panel, x, first, next, out)
                        }
                        BlockFormat::Q6K => x86::$kernel::<$tokens, 4, 16, false>(panel, x, first, next, out),
                    }
                };
            }
            match (kernel, tokens == tile) {
                _ if signed_activations(kernel, format) && tokens == tile => {
                    x86::panel_avx2_signed::<4, 8, 1, false>(panel, x, first, next, out)
                }
                _ if signed_activations(kernel, format) => {
                    x86::panel_avx2_signed::<1, 8, 1, false>(panel, x, first, next, out)
                }
                (Kernel::Vnni, true) => by_format!(panel_vnni, 8),
                (Kernel::Vnni, false) => by_format!(panel_vnni, 1),
                (Kernel::Avx2, true) => by_format!(panel_avx2, 4),
                (Kernel::Avx2, false) => by_format!(panel_avx2, 1),
            }
        }
        first += tokens;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Activations, Panel, PANEL_ROWS};

    /// q8_0's block scales of the 8 rows (`rows[r]` for `r < present`, zero after) as
    /// `[block][row]` f32.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q8_0_scales(rows: &[*const u8; PANEL_ROWS], present: usize, blocks: usize, scales: *mut f32) {
        for b in 0..blocks {
            let mut halves = [0u16; PANEL_ROWS];
            for (h, &row) in halves.iter_mut().zip(rows).take(present) {
                *h = row.add(b * 34).cast::<u16>().read_unaligned();
            }
            let converted = _mm256_cvtph_ps(_mm_loadu_si128(halves.as_ptr().cast()));
            _mm256_storeu_ps(scales.add(b * PANEL_ROWS), converted);
        }
    }

    /// A block format's integers, 32 consecutive weights ("run") of a row at a time.
    pub(super) trait Runs {
        /// Weights per unit (one scale).
        const UNIT: usize;
        /// Run `c` of the row starting at `row`, as 32 `i8`.
        unsafe fn run(row: *const u8, c: usize) -> __m256i;
    }

    /// Shifts each 16-bit lane right by `bits`.
    #[inline(always)]
    unsafe fn shift_right(v: __m256i, bits: usize) -> __m256i {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(bits as i32))
    }

    /// q8_0: the block's 32 `i8` after its f16 scale.
    pub(super) struct Q8_0;
    impl Runs for Q8_0 {
        const UNIT: usize = 32;
        #[inline(always)]
        unsafe fn run(row: *const u8, c: usize) -> __m256i {
            _mm256_loadu_si256(row.add(c * 34 + 2).cast())
        }
    }

    /// q4_K: unit `j` of a super-block is the low (even `j`) or high nibbles of `qs[32·(j/2)..]`.
    pub(super) struct Q4K;
    impl Runs for Q4K {
        const UNIT: usize = 32;
        #[inline(always)]
        unsafe fn run(row: *const u8, c: usize) -> __m256i {
            let (block, j) = (c / 8, c % 8);
            let packed = _mm256_loadu_si256(row.add(block * 144 + 16 + 32 * (j / 2)).cast());
            _mm256_and_si256(shift_right(packed, 4 * (j % 2)), _mm256_set1_epi8(0x0F))
        }
    }

    /// q5_K: q4_K's nibbles plus bit `j` of `qh` as 16.
    pub(super) struct Q5K;
    impl Runs for Q5K {
        const UNIT: usize = 32;
        #[inline(always)]
        unsafe fn run(row: *const u8, c: usize) -> __m256i {
            let (block, j) = (c / 8, c % 8);
            let base = row.add(block * 176);
            let packed = _mm256_loadu_si256(base.add(48 + 32 * (j / 2)).cast());
            let low = _mm256_and_si256(shift_right(packed, 4 * (j % 2)), _mm256_set1_epi8(0x0F));
            let bit = _mm256_set1_epi8((1u8 << j) as i8);
            let high = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256(base.add(16).cast()), bit), bit);
            _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(16)))
        }
    }

    /// q6_K: in each half of 128, run `p` takes nibbles of `ql[32·(p%2)..]` (high ones for
    /// `p ≥ 2`) and bits `2p, 2p+1` of `qh`, minus 32.
    pub(super) struct Q6K;
    impl Runs for Q6K {
        const UNIT: usize = 16;
        #[inline(always)]
        unsafe fn run(row: *const u8, c: usize) -> __m256i {
            let (block, j) = (c / 8, c % 8);
            let (half, p) = (j / 4, j % 4);
            let base = row.add(block * 210);
            let ql = _mm256_loadu_si256(base.add(64 * half + 32 * (p % 2)).cast());
            let low = _mm256_and_si256(shift_right(ql, 4 * (p / 2)), _mm256_set1_epi8(0x0F));
            let qh = _mm256_loadu_si256(base.add(128 + 32 * half).cast());
            let high = _mm256_slli_epi16::<4>(_mm256_and_si256(shift_right(qh, 2 * p), _mm256_set1_epi8(3)));
            _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32))
        }
    }

    /// `[row][k]` → `[k / 4][row][4]` for the 8 rows (`rows[r]` for `r < present`, zero after),
    /// one run of 32 weights at a time, and `−128 · Σ w` per unit.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave<R: Runs>(
        rows: &[*const u8; PANEL_ROWS],
        present: usize,
        runs: usize,
        values: *mut i8,
        offsets: *mut i32,
    ) {
        let (ones, ones16, zero) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1), _mm256_setzero_si256());
        let half_units = R::UNIT == 16;
        for c in 0..runs {
            let mut r = [zero; PANEL_ROWS];
            for (r, &row) in r.iter_mut().zip(rows).take(present) {
                *r = R::run(row, c);
            }
            // 8 × 8 transpose of 32-bit lanes: `g[i]` = group `i` of the 8 rows.
            let t = [
                _mm256_unpacklo_epi32(r[0], r[1]),
                _mm256_unpackhi_epi32(r[0], r[1]),
                _mm256_unpacklo_epi32(r[2], r[3]),
                _mm256_unpackhi_epi32(r[2], r[3]),
                _mm256_unpacklo_epi32(r[4], r[5]),
                _mm256_unpackhi_epi32(r[4], r[5]),
                _mm256_unpacklo_epi32(r[6], r[7]),
                _mm256_unpackhi_epi32(r[6], r[7]),
            ];
            let u = [
                _mm256_unpacklo_epi64(t[0], t[2]),
                _mm256_unpackhi_epi64(t[0], t[2]),
                _mm256_unpacklo_epi64(t[1], t[3]),
                _mm256_unpackhi_epi64(t[1], t[3]),
                _mm256_unpacklo_epi64(t[4], t[6]),
                _mm256_unpackhi_epi64(t[4], t[6]),
                _mm256_unpacklo_epi64(t[5], t[7]),
                _mm256_unpackhi_epi64(t[5], t[7]),
            ];
            let g = [
                _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
                _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
                _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
                _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
                _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
                _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
                _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
                _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
            ];
            let mut sums = [zero; 2];
            for (i, &g) in g.iter().enumerate() {
                _mm256_storeu_si256(values.add((c * PANEL_ROWS + i) * 32).cast(), g);
                let sum = &mut sums[i / 4];
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones, g), ones16));
            }
            let negated = |s: __m256i| _mm256_sub_epi32(zero, _mm256_slli_epi32::<7>(s));
            if half_units {
                _mm256_storeu_si256(offsets.add(2 * c * PANEL_ROWS).cast(), negated(sums[0]));
                _mm256_storeu_si256(offsets.add((2 * c + 1) * PANEL_ROWS).cast(), negated(sums[1]));
            } else {
                let sum = _mm256_add_epi32(sums[0], sums[1]);
                _mm256_storeu_si256(offsets.add(c * PANEL_ROWS).cast(), negated(sum));
            }
        }
    }

    /// `T` tokens from `first` against the panel; units of `GROUPS` groups of 4 weights,
    /// `UNITS` units per activation scale;
    /// `MINS`: subtract the minimums' term; `ahead` is prefetched a few lines per unit.
    /// `out`: `T × 8` values, token major. `$offset`: whether the activations are offset to
    /// `u8` (each unit's sum then starts at the panel's `−128 · Σ w`), else signed.
    macro_rules! panel_kernel {
        ($name:ident, $features:literal, $offset:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const T: usize, const GROUPS: usize, const UNITS: usize, const MINS: bool>(
                panel: &Panel,
                x: &Activations,
                first: usize,
                ahead: &[u8],
                out: &mut [f32],
            ) {
                let (k, units) = (x.k, x.units);
                let lines_per_unit = ahead.len().div_ceil(64).div_ceil(units);
                let weights = panel.values.as_ptr();
                let mut acc = [_mm256_setzero_ps(); T];
                for block in 0..x.blocks {
                    // Σ over the block's units of scale_w · Σ q_w q_x (− min_w · Σ q_x), then · d_x.
                    let mut part = [_mm256_setzero_ps(); T];
                    for u in block * UNITS..(block + 1) * UNITS {
                        for line in u * lines_per_unit..(u + 1) * lines_per_unit {
                            if line * 64 < ahead.len() {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(line * 64).cast());
                            }
                        }
                        let offset = if $offset {
                            _mm256_loadu_si256(panel.offsets.as_ptr().add(u * PANEL_ROWS).cast())
                        } else {
                            _mm256_setzero_si256()
                        };
                        let mut sums = [offset; T];
                        for g in 0..GROUPS {
                            let group = u * GROUPS + g;
                            let w = _mm256_loadu_si256(weights.add(group * 4 * PANEL_ROWS).cast());
                            for t in 0..T {
                                let at = x.values.as_ptr().add((first + t) * k + group * 4);
                                let xs = _mm256_set1_epi32(at.cast::<i32>().read_unaligned());
                                sums[t] = $dot(sums[t], xs, w);
                            }
                        }
                        let scale = _mm256_loadu_ps(panel.scales.as_ptr().add(u * PANEL_ROWS));
                        for t in 0..T {
                            part[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), scale, part[t]);
                        }
                        if MINS {
                            let min = _mm256_loadu_ps(panel.mins.as_ptr().add(u * PANEL_ROWS));
                            for t in 0..T {
                                let s = _mm256_broadcast_ss(&*x.sums.as_ptr().add((first + t) * units + u));
                                part[t] = _mm256_fnmadd_ps(min, s, part[t]);
                            }
                        }
                    }
                    for t in 0..T {
                        let d = _mm256_broadcast_ss(&*x.scales.as_ptr().add((first + t) * x.blocks + block));
                        acc[t] = _mm256_fmadd_ps(part[t], d, acc[t]);
                    }
                }
                for t in 0..T {
                    _mm256_storeu_ps(out.as_mut_ptr().add(t * PANEL_ROWS), acc[t]);
                }
            }
        };
    }

    panel_kernel!(panel_avx2, "avx2,fma", true, |acc: __m256i, x: __m256i, w: __m256i| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1))
    ));
    panel_kernel!(panel_avx2_signed, "avx2,fma", false, |acc: __m256i, x: __m256i, w: __m256i| {
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });
    panel_kernel!(
        panel_vnni,
        "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni",
        true,
        |acc: __m256i, x: __m256i, w: __m256i| _mm256_dpbusd_epi32(acc, x, w)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Against candle's quantized matmul (ggml's dot products on the same blocks and the same
    /// activation rounding), for every format, every kernel this CPU runs, a ragged last panel
    /// and token counts that leave a tail.
    #[test]
    fn equals_candles_quantized_matmul() {
        let (n, k) = (37, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for (format, ggml) in [
            (BlockFormat::Q8_0, GgmlDType::Q8_0),
            (BlockFormat::Q4K, GgmlDType::Q4K),
            (BlockFormat::Q5K, GgmlDType::Q5K),
            (BlockFormat::Q6K, GgmlDType::Q6K),
        ] {
            let q = QTensor::quantize(&w, ggml).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let candle = QMatMul::from_qtensor(q).unwrap();
            let kernels: Vec<Kernel> = match Kernel::detected(format) {
                Some(Kernel::Vnni) => vec![Kernel::Avx2, Kernel::Vnni],
                Some(kernel) => vec![kernel],
                None => vec![],
            };
            for m in [1, 3, 8, 13] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let want = candle.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for &kernel in &kernels {
                    let mut ours = vec![0f32; m * n];
                    matmul(kernel, format, (m, k, n), &x, &bytes, &mut ours);
                    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= 1e-4 * scale, "{format:?} {kernel:?} m={m} [{i}]: {a} vs {b}");
                    }
                }
            }
        }
    }
}
