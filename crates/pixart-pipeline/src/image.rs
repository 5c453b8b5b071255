//! From decoded VAE output to pictures: diffusers' `resize_and_crop_tensor` (bilinear,
//! `align_corners=False`, no antialias, then a centre crop) and `postprocess` to 8-bit RGB.

use candle_core::{DType, Tensor};

use crate::sizes::SizePlan;
use crate::PipelineError;

/// One generated picture: 8-bit RGB, row-major (`pixels[(y·width + x)·3 + c]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 3` bytes.
    pub pixels: Vec<u8>,
}

/// Bilinear resampling of one `[h, w]` plane to `[oh, ow]` as torch's `upsample_bilinear2d`
/// (`align_corners=False`): source `max(s·(i + ½) − ½, 0)` with `s = in/out` in f32.
fn bilinear_plane(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let weights = |out: usize, len: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = len as f32 / out as f32;
        (0..out)
            .map(|i| {
                let real = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = real as usize;
                let i1 = if i0 < len - 1 { i0 + 1 } else { i0 };
                let l1 = (real - i0 as f32).clamp(0.0, 1.0);
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (rows, cols) = (weights(oh, h), weights(ow, w));
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, wy0, wy1) in &rows {
        for &(x0, x1, wx0, wx1) in &cols {
            let top = wx0 * src[y0 * w + x0] + wx1 * src[y0 * w + x1];
            let bottom = wx0 * src[y1 * w + x0] + wx1 * src[y1 * w + x1];
            out.push(wy0 * top + wy1 * bottom);
        }
    }
    out
}

/// diffusers' `resize_and_crop_tensor` following a [`SizePlan`]: resamples `[B, C, H, W]`
/// (H × W = the plan's generated size) to the plan's resized size and crops the centre to the
/// requested size. Returns f32 on the CPU, always exactly `[B, C, height, width]` of the request.
pub fn resize_and_crop(images: &Tensor, plan: &SizePlan) -> Result<Tensor, PipelineError> {
    let images = images.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    let (b, c, h, w) = images.dims4()?;
    let (new_w, new_h) = (plan.output.width() as usize, plan.output.height() as usize);
    let (rw, rh) = (plan.resized.width as usize, plan.resized.height as usize);
    let (x0, y0) = (plan.crop_offset.width as usize, plan.crop_offset.height as usize);
    let generated = (plan.generated.width as usize, plan.generated.height as usize);
    let fits = (w, h) == generated && rw >= x0 + new_w && rh >= y0 + new_h;
    if !fits {
        return Err(PipelineError::Internal(format!("size plan {plan:?} does not fit decoded images of {w}x{h}")));
    }
    let resized = if (rh, rw) == (h, w) {
        images
    } else {
        let data = images.flatten_all()?.to_vec1::<f32>()?;
        let mut resized = Vec::with_capacity(b * c * rh * rw);
        for plane in data.chunks_exact(h * w) {
            resized.extend(bilinear_plane(plane, h, w, rh, rw));
        }
        Tensor::from_vec(resized, (b, c, rh, rw), &candle_core::Device::Cpu)?
    };
    if (rh, rw) == (new_h, new_w) {
        return Ok(resized);
    }
    Ok(resized.narrow(2, y0, new_h)?.narrow(3, x0, new_w)?)
}

/// `postprocess` + `numpy_to_pil`: `(x/2 + ½)` clamped to [0, 1], ×255, rounded half to even.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
    let images = images.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(PipelineError::Internal(format!("expected 3 channels from the VAE, got {c}")));
    }
    let hwc = ((images * 0.5)? + 0.5)?.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
    Ok(hwc
        .chunks_exact(h * w * 3)
        .take(b)
        .map(|chunk| RgbImage {
            width: w as u32,
            height: h as u32,
            pixels: chunk.iter().map(|v| (v * 255.0).round_ties_even() as u8).collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_identity_and_halving() {
        let plane: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(bilinear_plane(&plane, 4, 4, 4, 4), plane);
        // Halving averages 2×2 blocks at align_corners=False.
        assert_eq!(bilinear_plane(&plane, 4, 4, 2, 2), vec![2.5, 4.5, 10.5, 12.5]);
    }
}
