//! ggml's block formats as the CPU kernels read them: a weight row as small integers with one
//! scale (and, for the k-quants with minimums, one offset) per unit of 16 or 32 weights, and
//! activation rows quantized to 8 bits the way ggml pairs them with each format (q8_0 with
//! q8_0, the k-quants with q8_K).
//!
//! Layouts (little endian, as GGUF and candle store them): q8_0 `d: f16, q: [i8; 32]`;
//! q4_K `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; q5_K the same with `qh: [u8; 32]`
//! before `qs`; q6_K `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.

use half::f16;
use rayon::prelude::*;

/// Weights per k-quant super-block.
const SUPER_BLOCK: usize = 256;

/// A weight block format the panel kernel decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFormat {
    /// 32 weights `d · q`, `q: i8`.
    Q8_0,
    /// 256 weights in 8 units of 32, `d·sc · q − dmin·m`, `q` in `0..16`.
    Q4K,
    /// As [`Self::Q4K`] with `q` in `0..32`.
    Q5K,
    /// 256 weights in 16 units of 16, `d·sc · (q − 32)`, `q` in `0..64`.
    Q6K,
}

impl BlockFormat {
    /// Weights per stored block.
    pub(crate) fn block_weights(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 32,
            _ => SUPER_BLOCK,
        }
    }

    /// Bytes per stored block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => 144,
            BlockFormat::Q5K => 176,
            BlockFormat::Q6K => 210,
        }
    }

    /// Weights sharing one scale.
    pub(crate) fn unit(self) -> usize {
        match self {
            BlockFormat::Q6K => 16,
            _ => 32,
        }
    }

    /// Whether weights carry a per-unit offset (`mins`).
    pub(crate) fn has_mins(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q5K)
    }

    /// Weights per activation scale (q8_0: 32; q8_K: 256).
    pub(crate) fn activation_block(self) -> usize {
        self.block_weights()
    }

    /// Calls `unit(u, scale, min)` for every unit `u` of one row (`row`: whole blocks), the
    /// weights of the unit being `scale · q − min` (`min` 0 without minimums); the integers `q`
    /// are read by the kernels from the blocks themselves.
    pub(crate) fn row_scales(self, row: &[u8], mut unit: impl FnMut(usize, f32, f32)) {
        for (b, block) in row.chunks_exact(self.block_bytes()).enumerate() {
            match self {
                BlockFormat::Q8_0 => unit(b, half_at(block, 0), 0.0),
                BlockFormat::Q4K | BlockFormat::Q5K => {
                    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
                    let (scales, mins) = scales_mins_k4(&block[4..16]);
                    for j in 0..8 {
                        unit(8 * b + j, d * scales[j] as f32, dmin * mins[j] as f32);
                    }
                }
                BlockFormat::Q6K => {
                    let d = half_at(block, 208);
                    for (j, &sc) in block[192..208].iter().enumerate() {
                        unit(16 * b + j, d * (sc as i8) as f32, 0.0);
                    }
                }
            }
        }
    }
}

/// The f16 at `offset`, as f32.
fn half_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// The eight 6-bit scales and minimums of a q4_K / q5_K super-block, unpacked from their 12
/// bytes (units 0–3: low 6 bits of bytes 0–3 and 4–7; units 4–7: nibbles of bytes 8–11 with
/// the top 2 bits of bytes 0–3 and 4–7 above them).
fn scales_mins_k4(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let scales_low = w0 & LOW6;
    let mins_low = w1 & LOW6;
    let scales_high = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let mins_high = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    let join = |low: u32, high: u32| {
        let (l, h) = (low.to_le_bytes(), high.to_le_bytes());
        [l[0], l[1], l[2], l[3], h[0], h[1], h[2], h[3]]
    };
    (join(scales_low, scales_high), join(mins_low, mins_high))
}

/// Activation rows quantized to 8 bits: `x ≈ scales[block] · values`.
pub(crate) struct QuantizedActivations {
    /// `m × k` values in `-128..=127`.
    pub values: Vec<i8>,
    /// One scale per block of [`BlockFormat::activation_block`] values (row major).
    pub scales: Vec<f32>,
}

/// Quantizes `x` (rows of `k`, a multiple of the format's activation block) as ggml pairs it
/// with `format`: q8_0 (`d = max|x| / 127` kept as f16, `q = round(x / d)`) for q8_0 weights,
/// q8_K (`d = max / −127` of the largest-magnitude value, f32) for the k-quants.
pub(crate) fn quantize_activations(format: BlockFormat, x: &[f32]) -> QuantizedActivations {
    let block = format.activation_block();
    let mut values = vec![0i8; x.len()];
    let mut scales = vec![0f32; x.len() / block];
    let blocks = x.par_chunks_exact(block).zip(values.par_chunks_exact_mut(block)).zip(scales.par_iter_mut());
    blocks.with_min_len(64).for_each(|((xs, out), scale)| {
        *scale = match format {
            BlockFormat::Q8_0 => quantize_q8_0(xs, out),
            _ => quantize_q8k(xs, out),
        };
    });
    QuantizedActivations { values, scales }
}

/// ggml's q8_0 quantization of one block; returns the scale as stored (rounded to f16).
fn quantize_q8_0(xs: &[f32], out: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in out.iter_mut().zip(xs) {
        *q = round_half_away(v * id) as i8;
    }
    f16::from_f32(d).to_f32()
}

/// `v.round()` (halves away from zero) for `|v| < 2²³`, without the libm call `round` becomes
/// on the baseline x86-64 target.
fn round_half_away(v: f32) -> i32 {
    let whole = v as i32;
    let fraction = v - whole as f32;
    whole + (fraction >= 0.5) as i32 - (fraction <= -0.5) as i32
}

/// ggml's q8_K quantization of one super-block; returns the scale.
fn quantize_q8k(xs: &[f32], out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xs {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in out.iter_mut().zip(xs) {
        *q = round_half_away(iscale * v).clamp(-128, 127) as i8;
    }
    1.0 / iscale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_equals_f32_round_over_the_activation_range() {
        // Every half-integer of the range and the floats just beside it, then a fine sweep.
        for i in -270..=270 {
            let half = i as f32 * 0.5;
            for v in [half, half.next_up(), half.next_down()] {
                assert_eq!(round_half_away(v), v.round() as i32, "{v}");
            }
        }
        let mut v = -130.0f32;
        while v <= 130.0 {
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
            v += 1.0 / 1024.0 + 1e-6;
        }
    }
}
