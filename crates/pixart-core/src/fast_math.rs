//! Elementwise f32 kernels for the CPU that the compiler can vectorise: `exp` by range
//! reduction and a polynomial (Cephes' `expf`, within 2 ulp), and GELU (tanh), SiLU and a scaled,
//! biased softmax built on it. Each kernel is compiled twice, for AVX2 + FMA (chosen at run time)
//! and for the baseline target. glibc's scalar `expf`/`tanhf` were 25% of a transformer step.
//!
//! The candle ops using these kernels are in [`crate::activation`] and [`crate::attention`]; each
//! is tested against the plain candle composition it replaces.

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
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// GELU with the tanh approximation, `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, with
/// `tanh(u) = 1 − 2/(1 + e^{2u})`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
    0.5 * x * (1.0 + tanh)
}

/// SiLU, `x / (1 + e^{−x})`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// One softmax row in place: `softmax(row · scale + bias)` (`bias` as long as the row, or empty).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32, bias: &[f32]) {
    if bias.is_empty() {
        row.iter_mut().for_each(|v| *v *= scale);
    } else {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v = *v * scale + b);
    }
    // Reductions in eight lanes (a plain running sum or max is a dependency chain the compiler
    // must not reorder, so it would not vectorise), combined at the end.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    let sum: f32 = chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

dispatch!(
    /// `dst[i] = gelu_tanh(src[i])`.
    gelu_tanh_slice(src: &[f32], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = gelu_tanh(s));
    }
);

dispatch!(
    /// `dst[i] = silu(src[i])`.
    silu_slice(src: &[f32], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = silu(s));
    }
);

dispatch!(
    /// `dst[i] = src[i] · scale + shift`, then SiLU when `silu` (GroupNorm's last pass).
    affine_silu_slice(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, with_silu: bool) {
        if with_silu {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = silu(s * scale + shift));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s * scale + shift);
        }
    }
);

dispatch!(
    /// Softmax of every `len`-long row of `rows` in place, after `· scale + bias` (`bias` empty,
    /// or `len` long for every row).
    softmax_rows(rows: &mut [f32], len: usize, scale: f32, bias: &[f32]) {
        rows.chunks_exact_mut(len).for_each(|row| softmax_row(row, scale, bias));
    }
);

#[cfg(test)]
mod tests {
    use super::*;

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
        let src: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let mut dst = vec![0.0; 1000];
        gelu_tanh_slice(&src, &mut dst);
        assert!(src.iter().zip(&dst).all(|(&s, &d)| d == gelu_tanh(s)));
        silu_slice(&src, &mut dst);
        assert!(src.iter().zip(&dst).all(|(&s, &d)| d == silu(s)));
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
