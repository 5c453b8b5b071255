//! Elementwise f32 kernels for the CPU that the compiler can vectorise: `exp` by range
//! reduction and a polynomial (Cephes' `expf`, within 2 ulp), and GELU (tanh), SiLU and a scaled,
//! biased softmax (whole rows, or key blocks of an online softmax) built on it. Each kernel is
//! compiled three times, for AVX-512, for AVX2 + FMA and for the baseline target, and the best
//! one the CPU runs is chosen at run time ([`Simd`]). glibc's scalar `expf`/`tanhf` were 25% of
//! a transformer step.
//!
//! The candle ops using these kernels are in [`crate::activation`] and [`crate::attention`]; each
//! is tested against the plain candle composition it replaces. Kernels that write a whole output
//! take it as `&mut [MaybeUninit<f32>]` and write every element: the ops hand them fresh,
//! unwritten buffers.

use std::mem::MaybeUninit;

/// The f32 data of a contiguous CPU tensor, for custom ops; `op` names the op in errors.
pub fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only, got {:?}", candle_core::backend::BackendStorage::dtype(storage))
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: contiguous input only"),
    }
}

/// `exp(x)` in f32, within 2 ulp for `x` in [−87.3, 88.3]; clamped outside (so `exp(−∞)` is
/// ~1e−38, not 0, and nothing overflows).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    // `shifted`'s low mantissa bits hold the integer n = round(x · log2 e) ∈ [−126, 128].
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from n's bits, integer ops only: `n as i32` saturates (NaN → 0, out of range →
    // the bounds), which the compiler does one lane at a time, and that was most of the cost
    // of every kernel built on `exp`. A NaN `x` still gives NaN (`e` is NaN).
    let two_to_n = (shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    e * f32::from_bits(two_to_n)
}

/// GELU with the tanh approximation, `½x(1 + tanh(u))`, `u = √(2/π)(x + 0.044715x³)`, computed
/// as `x / (1 + e^{−2u})` (the same function: `½(1 + tanh u)` is the logistic of `2u`), which
/// has no cancellation for negative `x` and fewer operations.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const MINUS_2_SQRT_2_OVER_PI: f32 = -1.595_769;
    let minus_2u = MINUS_2_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(minus_2u))
}

/// SiLU, `x / (1 + e^{−x})`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `row = row · scale + bias` (`bias` as long as the row, or empty); returns the row's max.
#[inline(always)]
fn scale_bias_max(row: &mut [f32], scale: f32, bias: &[f32]) -> f32 {
    if bias.is_empty() {
        row.iter_mut().for_each(|v| *v *= scale);
    } else {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v = *v * scale + b);
    }
    // Reductions in 16 lanes (a plain running max or sum is a dependency chain the compiler
    // must not reorder, so it would not vectorise), combined at the end.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `row = exp(row − max)`; returns the row's sum.
#[inline(always)]
fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Sum of `values` in 16 lanes (so that it vectorises), combined at the end.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// One softmax row in place: `softmax(row · scale + bias)` (`bias` as long as the row, or empty).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32, bias: &[f32]) {
    let max = scale_bias_max(row, scale, bias);
    let inv = 1.0 / exp_sum(row, max);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The running state of one row of an online softmax (flash attention's): the max of the
/// scores seen so far and the sum of their `exp(s − max)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningSoftmax {
    /// Max of the (scaled, biased) scores seen so far; −∞ before the first block.
    pub max: f32,
    /// Sum of `exp(s − max)` over the scores seen so far.
    pub sum: f32,
}

impl Default for RunningSoftmax {
    fn default() -> Self {
        Self { max: f32::NEG_INFINITY, sum: 0.0 }
    }
}

/// One block of one row of an online softmax: `row = exp(row · scale + bias − max')` with `max'`
/// the new running max; returns the factor `exp(max − max')` by which what was accumulated with
/// the old max must be multiplied.
#[inline(always)]
fn online_softmax_row(row: &mut [f32], scale: f32, bias: &[f32], state: &mut RunningSoftmax) -> f32 {
    let block_max = scale_bias_max(row, scale, bias);
    let max = if block_max > state.max { block_max } else { state.max };
    let rescale = exp(state.max - max);
    state.sum = state.sum * rescale + exp_sum(row, max);
    state.max = max;
    rescale
}

/// The instruction sets the CPU kernels are compiled for, from the baseline up. Each kernel of
/// this module exists once per level; [`Simd::detected`] picks the best the CPU has at run time
/// (no `target-cpu` flag in the build), and the `*_at` forms run a given level, which is how the
/// tests check every path a CPU of another kind would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Whatever the build target guarantees (SSE2 on x86-64).
    Baseline,
    /// AVX2 + FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 F (+ AVX2, FMA): 16 f32 lanes.
    Avx512,
}

impl Simd {
    /// The best level this CPU runs, lowered by the `PIXART_SIMD` environment variable
    /// (`baseline`, `avx2` or `avx512`; read once) so that one machine can measure the paths of
    /// older CPUs. A level the CPU lacks is never chosen.
    pub fn detected() -> Self {
        static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("PIXART_SIMD").ok().as_deref().map(str::trim) {
                Some("baseline") => Self::Baseline,
                Some("avx2") => best.min(Self::Avx2),
                _ => best,
            }
        })
    }

    /// The best level the CPU supports.
    pub fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    /// Every level this CPU runs, lowest first.
    pub fn supported() -> Vec<Self> {
        let best = Self::best_supported();
        [Self::Baseline, Self::Avx2, Self::Avx512].into_iter().filter(|&level| level <= best).collect()
    }
}

/// Defines `$name` (runs at [`Simd::detected`]) and `$at` (runs at a given level; a level the
/// CPU lacks runs the best one below it) from one body, compiled once per level.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis $name:ident, $at:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            $at($crate::fast_math::Simd::detected(), $($arg),*)
        }

        $(#[$doc])*
        ///
        /// At the given SIMD level, capped at what the CPU supports.
        $vis fn $at(level: $crate::fast_math::Simd, $($arg: $ty),*) {
            use $crate::fast_math::Simd;
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                match level.min(Simd::best_supported()) {
                    // SAFETY: the CPU has AVX-512 F, AVX2 and FMA (`best_supported` checked).
                    Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU has AVX2 and FMA (`best_supported` checked).
                    Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    Simd::Baseline => {}
                }
            }
            let _ = level;
            $body
        }
    };
}
pub(crate) use dispatch;

dispatch!(
    /// `dst[i] = gelu_tanh(src[i])`.
    pub gelu_tanh_slice, gelu_tanh_slice_at(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| {
            d.write(gelu_tanh(s));
        });
    }
);

dispatch!(
    /// `dst[i] = silu(src[i])`.
    pub silu_slice, silu_slice_at(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| {
            d.write(silu(s));
        });
    }
);

dispatch!(
    /// `dst[i] = src[i] · scale + shift`, then SiLU when `silu` (GroupNorm's last pass).
    pub affine_silu_slice, affine_silu_slice_at(
        src: &[f32],
        dst: &mut [MaybeUninit<f32>],
        scale: f32,
        shift: f32,
        with_silu: bool
    ) {
        if with_silu {
            dst.iter_mut().zip(src).for_each(|(d, &s)| {
                d.write(silu(s * scale + shift));
            });
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &s)| {
                d.write(s * scale + shift);
            });
        }
    }
);

dispatch!(
    /// Softmax of every `len`-long row of `rows` in place, after `· scale + bias` (`bias` empty,
    /// or `len` long for every row).
    pub softmax_rows, softmax_rows_at(rows: &mut [f32], len: usize, scale: f32, bias: &[f32]) {
        rows.chunks_exact_mut(len).for_each(|row| softmax_row(row, scale, bias));
    }
);

dispatch!(
    /// One key block of an online softmax over the `cols`-long score rows of `scores`: row `r`
    /// becomes `exp(s · scale + bias − max)` with `max` its running max (`states[r]`, updated)
    /// and `rescale[r]` is set to the factor its output accumulated so far must be multiplied by
    /// (`bias` empty or `cols` long).
    pub online_softmax_block, online_softmax_block_at(
        scores: &mut [f32],
        cols: usize,
        scale: f32,
        bias: &[f32],
        states: &mut [RunningSoftmax],
        rescale: &mut [f32]
    ) {
        let rows = scores.chunks_exact_mut(cols).zip(states.iter_mut()).zip(rescale.iter_mut());
        rows.for_each(|((row, state), factor)| *factor = online_softmax_row(row, scale, bias, state));
    }
);

dispatch!(
    /// LayerNorm of each `dim`-long row of `src` (no affine parameters; mean and biased variance
    /// in two passes), then `· scale + shift` per column (adaLN's modulation with
    /// `scale = 1 + scale_msa`), into `dst`.
    pub modulated_layer_norm_rows, modulated_layer_norm_rows_at(
        src: &[f32],
        dst: &mut [MaybeUninit<f32>],
        dim: usize,
        scale: &[f32],
        shift: &[f32],
        eps: f32
    ) {
        let inv_dim = 1.0 / dim.max(1) as f32;
        for (row, out) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
            let mean = lane_sum(row, |v| v) * inv_dim;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) * inv_dim;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &a), &b) in out.iter_mut().zip(row).zip(scale).zip(shift) {
                o.write((v - mean) * rstd * a + b);
            }
        }
    }
);

dispatch!(
    /// `dst = x + y · gate` on `dim`-long rows (`gate` one row): a residual add with adaLN's gate.
    pub gated_add_rows, gated_add_rows_at(
        x: &[f32],
        y: &[f32],
        dst: &mut [MaybeUninit<f32>],
        dim: usize,
        gate: &[f32]
    ) {
        let rows = x.chunks_exact(dim).zip(y.chunks_exact(dim)).zip(dst.chunks_exact_mut(dim));
        for ((x, y), out) in rows {
            for (((o, &a), &b), &g) in out.iter_mut().zip(x).zip(y).zip(gate) {
                o.write(a + b * g);
            }
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::canary::{nans, values};

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-1e4) >= 0.0);
        assert!(exp(1e4).is_finite());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan() && gelu_tanh(f32::NAN).is_nan() && silu(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_silu_match_the_formulas() {
        for i in -2000..2000 {
            let x = i as f32 * 0.01;
            let u = f64::from(x);
            let gelu = 0.5 * u * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (u + 0.044715 * u * u * u)).tanh());
            let silu_want = u / (1.0 + (-u).exp());
            assert!((f64::from(gelu_tanh(x)) - gelu).abs() < 2e-6 * (1.0 + gelu.abs()), "gelu({x})");
            assert!((f64::from(silu(x)) - silu_want).abs() < 2e-6 * (1.0 + silu_want.abs()), "silu({x})");
        }
    }

    /// Each SIMD level this CPU runs (the AVX-512 machine checks all three) against the f64
    /// formulas, on lengths that leave remainders for every vector width.
    #[test]
    fn every_simd_level_computes_the_same_functions() {
        let levels = Simd::supported();
        assert!(levels.contains(&Simd::Baseline) && levels.contains(&Simd::detected()));
        let src: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let close = |got: f32, want: f64| (f64::from(got) - want).abs() <= 4e-6 * (1.0 + want.abs());
        for &level in &levels {
            let mut out = nans(src.len());
            gelu_tanh_slice_at(level, &src, &mut out);
            let dst = values(&out);
            for (&x, &y) in src.iter().zip(&dst) {
                let u = f64::from(x);
                let want = 0.5 * u * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (u + 0.044715 * u * u * u)).tanh());
                assert!(close(y, want), "{level:?} gelu({x}) = {y}, want {want}");
            }
            let mut out = nans(src.len());
            silu_slice_at(level, &src, &mut out);
            let dst = values(&out);
            for (&x, &y) in src.iter().zip(&dst) {
                let u = f64::from(x);
                assert!(close(y, u / (1.0 + (-u).exp())), "{level:?} silu({x}) = {y}");
            }
            for with_silu in [false, true] {
                let mut out = nans(src.len());
                affine_silu_slice_at(level, &src, &mut out, 1.5, -0.25, with_silu);
                let dst = values(&out);
                for (&x, &y) in src.iter().zip(&dst) {
                    let a = f64::from(x) * 1.5 - 0.25;
                    let want = if with_silu { a / (1.0 + (-a).exp()) } else { a };
                    assert!(close(y, want), "{level:?} affine({x}, {with_silu}) = {y}");
                }
            }
            let mut rows = src.clone();
            rows.truncate(3 * 331);
            let bias: Vec<f32> = (0..331).map(|j| if j % 7 == 3 { -10000.0 } else { 0.0 }).collect();
            softmax_rows_at(level, &mut rows, 331, 0.7, &bias);
            for (r, row) in rows.chunks(331).enumerate() {
                let logits: Vec<f64> =
                    (0..331).map(|j| f64::from(src[r * 331 + j]) * 0.7 + f64::from(bias[j])).collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                for (&p, l) in row.iter().zip(&logits) {
                    assert!((f64::from(p) - (l - max).exp() / total).abs() < 1e-7, "{level:?} softmax row {r}");
                }
            }
        }
    }

    /// Key blocks of an online softmax, rescaled and summed, give the whole row's softmax.
    #[test]
    fn online_softmax_blocks_equal_the_whole_row() {
        let (rows, cols) = (3, 100);
        let scores: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
        let bias: Vec<f32> = (0..cols).map(|j| if j > 90 { -10000.0 } else { 0.0 }).collect();
        let mut whole = scores.clone();
        softmax_rows(&mut whole, cols, 0.5, &bias);
        for &level in &Simd::supported() {
            for block in [cols, 64, 17] {
                // Accumulate Σ p_j · j (a one-column "value" matrix) the way attention does.
                let mut states = vec![RunningSoftmax::default(); rows];
                let mut acc = vec![0f32; rows];
                for start in (0..cols).step_by(block) {
                    let end = (start + block).min(cols);
                    let mut part: Vec<f32> =
                        (0..rows).flat_map(|r| scores[r * cols + start..r * cols + end].to_vec()).collect();
                    let mut rescale = vec![0f32; rows];
                    online_softmax_block_at(
                        level,
                        &mut part,
                        end - start,
                        0.5,
                        &bias[start..end],
                        &mut states,
                        &mut rescale,
                    );
                    for r in 0..rows {
                        let block_sum: f32 = part[r * (end - start)..(r + 1) * (end - start)]
                            .iter()
                            .enumerate()
                            .map(|(j, p)| p * (start + j) as f32)
                            .sum();
                        acc[r] = acc[r] * rescale[r] + block_sum;
                    }
                }
                for r in 0..rows {
                    let want: f32 = whole[r * cols..(r + 1) * cols].iter().enumerate().map(|(j, p)| p * j as f32).sum();
                    let got = acc[r] / states[r].sum;
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "{level:?} block {block}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_ignore_masked_keys() {
        let mut rows: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let bias = [0.0, 0.0, -10000.0, 0.0, 0.0, -10000.0];
        softmax_rows(&mut rows, 6, 2.0, &bias);
        for row in rows.chunks(6) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row[2] < 1e-30 && row[5] < 1e-30);
        }
    }
}
