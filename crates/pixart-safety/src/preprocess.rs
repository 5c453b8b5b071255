//! `ViTImageProcessor`'s preprocessing: PIL's bilinear resize of the 8-bit image, rescale and
//! normalise, to a `[B, 3, H, W]` f32 tensor.
//!
//! transformers resizes through Pillow (`Image.resize(size, BILINEAR)`), whose 8-bit resampler
//! is an antialiased separable filter (the triangle kernel widened by the downscale factor),
//! computed with 22-bit fixed-point coefficients, horizontally then vertically, each pass
//! rounded and clipped to 8 bits. [`pil_bilinear_resize`] reproduces that arithmetic, so the
//! classifier sees the same bytes as transformers' PIL backend.

use candle_core::{Device, Tensor};

use crate::config::PreprocessorConfig;
use crate::error::SafetyError;

/// Pillow's `PRECISION_BITS` for 8-bit resampling (32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// The bilinear (triangle) filter, support 1.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Per output position: the first input index, the tap count and the fixed-point weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the triangle's support (1) widened when downscaling
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; negative values are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            // Pillow multiplies by the inverse scale: the same rounding gives the same coefficients.
            let inverse = 1.0 / filter_scale;
            let weights: Vec<f64> = (xmin..xmax).map(|x| triangle((x as f64 - center + 0.5) * inverse)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    (if scaled < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Pillow's `clip8`: the fixed-point sum back to a byte.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass along rows: `[rows, w, 3]` → `[rows, ow, 3]` with `taps` per output column.
fn pass_along_rows(pixels: &[u8], rows: usize, w: usize, taps: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let ow = taps.len();
    let mut out = Vec::with_capacity(rows * ow * 3);
    for row in pixels.chunks_exact(w * 3).take(rows) {
        for (start, k) in taps {
            for c in 0..3 {
                let sum: i64 =
                    k.iter().enumerate().map(|(i, &k)| i64::from(row[(start + i) * 3 + c]) * i64::from(k)).sum();
                out.push(clip8(sum + round));
            }
        }
    }
    out
}

/// One separable pass along columns: `[h, w, 3]` → `[oh, w, 3]`, reading rows from `first`.
fn pass_along_columns(pixels: &[u8], w: usize, first: usize, taps: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let mut out = Vec::with_capacity(taps.len() * w * 3);
    for (start, k) in taps {
        let start = start - first;
        for x in 0..w * 3 {
            let sum: i64 =
                k.iter().enumerate().map(|(i, &k)| i64::from(pixels[(start + i) * w * 3 + x]) * i64::from(k)).sum();
            out.push(clip8(sum + round));
        }
    }
    out
}

/// Resizes 8-bit RGB `[h, w, 3]` to `[oh, ow, 3]` as Pillow's `Image.resize(…, BILINEAR)`.
///
/// Pillow's C source resamples horizontally (only the rows the vertical pass reads) and then
/// vertically, each pass rounded to 8 bits; an unchanged side is not resampled. The pinned
/// Pillow 13.0 wheel runs the vertical pass first when the width grows and the height shrinks
/// (observed on every such size tried, 283 of them): we do the same. When both sides shrink it
/// also goes vertical-first for some sizes (no rule found); there our bytes can differ from its
/// by one level on some pixels (see the crate's tests).
pub fn pil_bilinear_resize(pixels: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let horizontal = coefficients(w, ow);
    let vertical = coefficients(h, oh);
    match (ow != w, oh != h) {
        (false, false) => pixels.to_vec(),
        (true, false) => pass_along_rows(pixels, h, w, &horizontal),
        (false, true) => pass_along_columns(pixels, w, 0, &vertical),
        (true, true) if ow > w && oh < h => {
            let tall = pass_along_columns(pixels, w, 0, &vertical);
            pass_along_rows(&tall, oh, w, &horizontal)
        }
        (true, true) => {
            // Only the rows the vertical pass reads are resampled horizontally.
            let first = vertical.first().map_or(0, |(start, _)| *start);
            let last = vertical.last().map_or(h, |(start, k)| start + k.len());
            let wide = pass_along_rows(&pixels[first * w * 3..last * w * 3], last - first, w, &horizontal);
            pass_along_columns(&wide, ow, first, &vertical)
        }
    }
}

/// `ViTImageProcessor` as configured by a `preprocessor_config.json`.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    config: PreprocessorConfig,
}

impl Preprocessor {
    /// A preprocessor for `config` (validated by [`PreprocessorConfig::load`]).
    pub fn new(config: PreprocessorConfig) -> Self {
        Self { config }
    }

    /// The size images are resized to, `(height, width)`.
    pub fn output_size(&self) -> (usize, usize) {
        (self.config.size.height, self.config.size.width)
    }

    /// One image's `[3, H, W]` values, channel-major: resized, rescaled, normalised.
    pub fn pixel_values(&self, pixels: &[u8], width: usize, height: usize) -> Result<Vec<f32>, SafetyError> {
        if width == 0 || height == 0 || pixels.len() != width * height * 3 {
            return Err(SafetyError::Image(format!(
                "{width}x{height} RGB needs {} bytes, got {}",
                width.saturating_mul(height).saturating_mul(3),
                pixels.len()
            )));
        }
        let c = &self.config;
        let (oh, ow) = if c.do_resize { self.output_size() } else { (height, width) };
        let resized = if c.do_resize { pil_bilinear_resize(pixels, width, height, ow, oh) } else { pixels.to_vec() };
        let mut out = vec![0f32; 3 * oh * ow];
        for ch in 0..3 {
            // transformers rescales in float64 and stores float32, then normalises in float32.
            let (mean, std) = (c.image_mean[ch] as f32, c.image_std[ch] as f32);
            for (i, px) in resized.iter().skip(ch).step_by(3).enumerate() {
                let mut v = if c.do_rescale { (f64::from(*px) * c.rescale_factor) as f32 } else { f32::from(*px) };
                if c.do_normalize {
                    v = (v - mean) / std;
                }
                out[ch * oh * ow + i] = v;
            }
        }
        Ok(out)
    }

    /// `[B, 3, H, W]` f32 on `device` for a batch of images (`(pixels, width, height)`).
    pub fn batch(&self, images: &[(&[u8], usize, usize)], device: &Device) -> Result<Tensor, SafetyError> {
        let (oh, ow) = if self.config.do_resize {
            self.output_size()
        } else {
            let (_, w, h) = images.first().copied().unwrap_or((&[], 0, 0));
            (h, w)
        };
        let mut values = Vec::with_capacity(images.len() * 3 * oh * ow);
        for (pixels, w, h) in images {
            let one = self.pixel_values(pixels, *w, *h)?;
            if one.len() != 3 * oh * ow {
                return Err(SafetyError::Image("without do_resize every image must have the same size".into()));
            }
            values.extend(one);
        }
        Ok(Tensor::from_vec(values, (images.len(), 3, oh, ow), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy_and_constant_images_stay_constant() {
        let px: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(pil_bilinear_resize(&px, 5, 4, 5, 4), px);
        let flat = vec![200u8; 37 * 23 * 3];
        assert!(pil_bilinear_resize(&flat, 37, 23, 224, 224).iter().all(|&v| v == 200));
        assert!(pil_bilinear_resize(&flat, 37, 23, 11, 5).iter().all(|&v| v == 200));
    }
}
