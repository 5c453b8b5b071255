//! What diffusers' `VaeImageProcessor` does to a PIL image, to the bit: Pillow's Lanczos resize of
//! 8-bit images (`Image.resize(size, Image.LANCZOS)`) and its RGB → L conversion.
//!
//! Pillow resizes in two separable passes, horizontal first (only over the rows the vertical pass
//! reads), each rounding to 8 bits. A pass's coefficients come from a Lanczos-3 window stretched
//! by the scale when shrinking, normalised to sum 1, then fixed point with 22 fractional bits;
//! each output is `clip8((½ + Σ pixel·coefficient) >> 22)`. A side that keeps its size is not
//! resampled.

use crate::image::RgbImage;

/// Fractional bits of the fixed-point coefficients (Pillow's `PRECISION_BITS`, 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;
/// The Lanczos window's half-width.
const SUPPORT: f64 = 3.0;

/// `sinc(x) = sin(πx)/(πx)`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's `lanczos_filter`: `sinc(x)·sinc(x/3)` on [−3, 3).
fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One pass's taps: for each output position, the first input index and fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size` → `out_size`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast: toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let raw: Vec<f64> =
            (0..count).map(|x| lanczos(((x + xmin) as f64 - center + 0.5) * (1.0 / filter_scale))).collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                // Rounded half away from zero, then truncated as C does.
                (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Taps { first, weights }
}

/// Pillow's `clip8`: the accumulator's integer part, clamped to a byte.
fn clip8(accumulator: i64) -> u8 {
    (accumulator >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit image of `channels` interleaved channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plane8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Channels per pixel (1 or 3).
    pub channels: usize,
    /// `width × height × channels` bytes, row-major.
    pub data: Vec<u8>,
}

impl Plane8 {
    /// The picture's bytes as a 3-channel plane.
    pub fn from_rgb(image: &RgbImage) -> Self {
        Self { width: image.width as usize, height: image.height as usize, channels: 3, data: image.pixels.clone() }
    }

    /// Pillow's `convert("L")` of an RGB plane: `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16`.
    pub fn to_luma(&self) -> Self {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self
            .data
            .chunks_exact(self.channels)
            .map(|p| {
                ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
            })
            .collect();
        Self { width: self.width, height: self.height, channels: 1, data }
    }

    /// Pillow's `resize((width, height), Image.LANCZOS)`.
    pub fn resize_lanczos(&self, width: usize, height: usize) -> Self {
        let horizontal = width != self.width;
        let vertical = height != self.height;
        let rows = taps(self.height, height);
        let columns = taps(self.width, width);
        if !horizontal && !vertical {
            return self.clone();
        }
        // The rows the vertical pass reads.
        let first_row = rows.first.first().copied().unwrap_or(0);
        let last_row = rows.first.iter().zip(&rows.weights).map(|(f, w)| f + w.len()).max().unwrap_or(0);
        let source = if horizontal {
            self.resample_rows(&columns, first_row, last_row.max(first_row), width)
        } else {
            self.clone()
        };
        if !vertical {
            return source;
        }
        let offset = if horizontal { first_row } else { 0 };
        source.resample_columns(&rows, offset, height)
    }

    /// The horizontal pass over rows `from..to`, to `width` columns.
    fn resample_rows(&self, taps: &Taps, from: usize, to: usize, width: usize) -> Self {
        let c = self.channels;
        let mut data = Vec::with_capacity((to - from) * width * c);
        for y in from..to {
            let row = &self.data[y * self.width * c..(y + 1) * self.width * c];
            for (first, weights) in taps.first.iter().zip(&taps.weights) {
                for channel in 0..c {
                    let mut acc = 1i64 << (PRECISION_BITS - 1);
                    for (k, &w) in weights.iter().enumerate() {
                        acc += i64::from(row[(first + k) * c + channel]) * i64::from(w);
                    }
                    data.push(clip8(acc));
                }
            }
        }
        Self { width, height: to - from, channels: c, data }
    }

    /// The vertical pass to `height` rows; the taps' row indices are shifted by `offset` (the
    /// first row the horizontal pass kept).
    fn resample_columns(&self, taps: &Taps, offset: usize, height: usize) -> Self {
        let (c, stride) = (self.channels, self.width * self.channels);
        let mut data = Vec::with_capacity(height * stride);
        for (first, weights) in taps.first.iter().zip(&taps.weights) {
            let first = first - offset;
            for i in 0..stride {
                let mut acc = 1i64 << (PRECISION_BITS - 1);
                for (k, &w) in weights.iter().enumerate() {
                    acc += i64::from(self.data[(first + k) * stride + i]) * i64::from(w);
                }
                data.push(clip8(acc));
            }
        }
        Self { width: self.width, height, channels: c, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_weights_sum_to_one() {
        let plane = Plane8 { width: 3, height: 2, channels: 1, data: vec![0, 50, 255, 7, 8, 9] };
        assert_eq!(plane.resize_lanczos(3, 2), plane);
        for (input, output) in [(10, 3), (3, 10), (160, 256), (7, 7)] {
            for weights in taps(input, output).weights {
                let sum: i64 = weights.iter().map(|&w| i64::from(w)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= weights.len() as i64, "{input}→{output}: {sum}");
            }
        }
        // A flat image stays flat whatever the scale.
        let flat = Plane8 { width: 9, height: 5, channels: 3, data: vec![77; 9 * 5 * 3] };
        assert!(flat.resize_lanczos(4, 13).data.iter().all(|&v| v == 77));
    }
}
