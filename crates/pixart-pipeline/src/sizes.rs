//! Image sizes: validated dimensions, diffusers' aspect-ratio bins
//! (`ASPECT_RATIO_*_BIN`), and the plan that turns a requested size into a generated one and back.
//!
//! The size rule: the output is always exactly the requested width × height.
//! * With a bin table (checkpoints with `sample_size` 32/64/128/256), as diffusers: generate at the
//!   nearest aspect-ratio bin, scale by `max(h/H, w/W)` with bilinear resampling to
//!   `(⌊H·ratio⌋, ⌊W·ratio⌋)`, and crop the centre. Where that truncation lands one pixel short of
//!   the request (1.9% of all 16–4096 × 16–4096 sizes on the 256/512/1024 tables, 1.8% on the 2048
//!   one; e.g. 64×118 on the 256 table), diffusers' crop starts at −1 and returns a single row or
//!   column on that side (64×1 for 64×118); here that side is resized to the requested length
//!   instead, so the output always has the requested size. Everywhere else the result is
//!   diffusers' to the pixel.
//! * Without a bin table: generate at the requested size rounded up to a multiple of the latent
//!   patch in pixels (VAE scale × patch size: 16 for the SDXL VAE and patch size 2) and crop the
//!   centre; sizes that are already multiples are generated as they are, as diffusers does with
//!   binning off.

use crate::invalid_parameter::InvalidParameter;

/// An output size a generation may ask for: each side from [`Dimensions::MIN`] to
/// [`Dimensions::MAX`]. Built only through [`Dimensions::new`], so a value is always valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dimensions {
    width: u32,
    height: u32,
}

impl Dimensions {
    /// The smallest side, in pixels.
    pub const MIN: u32 = 16;
    /// The largest side, in pixels (the size rule is checked up to it).
    pub const MAX: u32 = 4096;
    /// 1024×1024, the published checkpoints' native size.
    pub const DEFAULT: Self = Self { width: 1024, height: 1024 };

    /// Checks both sides; the error names `width` or `height` and the range.
    pub fn new(width: u32, height: u32) -> Result<Self, InvalidParameter> {
        for (name, side) in [("width", width), ("height", height)] {
            if !(Self::MIN..=Self::MAX).contains(&side) {
                return Err(InvalidParameter::new(name, Self::range()));
            }
        }
        Ok(Self { width, height })
    }

    /// What a side allows, for messages.
    pub fn range() -> String {
        format!("must be an integer from {} to {}", Self::MIN, Self::MAX)
    }

    /// Width in pixels.
    pub fn width(self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(self) -> u32 {
        self.height
    }
}

impl std::fmt::Display for Dimensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A width × height in pixels, without the request's bounds (generated and resized sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PixelSize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// How a requested size is produced: generated at [`SizePlan::generated`], resampled to
/// [`SizePlan::resized`], and cropped at [`SizePlan::crop_offset`] to [`SizePlan::output`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePlan {
    /// The size the model generates at: a multiple of the latent patch.
    pub generated: PixelSize,
    /// The size the decoded image is resampled to (bilinear, `align_corners=False`); equal to
    /// `generated` when no resampling happens. Never smaller than `output` on either side.
    pub resized: PixelSize,
    /// The top-left corner of the centre crop inside the resized image.
    pub crop_offset: PixelSize,
    /// The output size: always the requested one.
    pub output: Dimensions,
}

impl SizePlan {
    /// Plans `requested` for a checkpoint with the bin table `bins` (if any) whose generated sizes
    /// must be multiples of `multiple` pixels (VAE scale × patch size; 0 is treated as 1). See the
    /// module documentation for the rule.
    pub fn new(requested: Dimensions, bins: Option<AspectRatioBins>, multiple: u32) -> Self {
        let multiple = multiple.max(1);
        let round_up = |side: u32| side.div_ceil(multiple) * multiple;
        let (width, height) = (requested.width, requested.height);
        let (generated, resized) = match bins {
            None => {
                let generated = PixelSize { width: round_up(width), height: round_up(height) };
                (generated, generated)
            }
            Some(bins) => {
                let (bin_h, bin_w) = bins.classify(height, width);
                let generated = PixelSize { width: round_up(bin_w), height: round_up(bin_h) };
                if generated.width == width && generated.height == height {
                    (generated, generated)
                } else {
                    // diffusers' resize, then never short of the request.
                    let d = diffusers_resize(generated, requested);
                    (generated, PixelSize { width: d.width.max(width), height: d.height.max(height) })
                }
            }
        };
        let crop_offset = PixelSize { width: (resized.width - width) / 2, height: (resized.height - height) / 2 };
        Self { generated, resized, crop_offset, output: requested }
    }

    /// What diffusers' `resize_and_crop_tensor` returns for this plan when that is not the
    /// requested size: where `⌊side·ratio⌋` truncates one pixel short of the request, its centre
    /// crop starts at −1 and Python's slice keeps a single row or column on that side. `None`
    /// when diffusers returns the requested size (then [`Self::resized`] is diffusers' resize
    /// exactly).
    pub fn diffusers_output(&self) -> Option<PixelSize> {
        if self.generated == self.resized {
            return None;
        }
        let (w, h) = (self.output.width, self.output.height);
        let d = diffusers_resize(self.generated, self.output);
        let (short_w, short_h) = (d.width < w, d.height < h);
        (short_w || short_h)
            .then_some(PixelSize { width: if short_w { 1 } else { w }, height: if short_h { 1 } else { h } })
    }
}

/// diffusers' `resize_and_crop_tensor` size in Python floats: `ratio = max(h/H, w/W)`, then
/// `(⌊W·ratio⌋, ⌊H·ratio⌋)` for a generated `W × H` and a requested `w × h`.
fn diffusers_resize(generated: PixelSize, requested: Dimensions) -> PixelSize {
    let ratio = (f64::from(requested.height) / f64::from(generated.height))
        .max(f64::from(requested.width) / f64::from(generated.width));
    let scaled = |side: u32| (f64::from(side) * ratio) as u32;
    PixelSize { width: scaled(generated.width), height: scaled(generated.height) }
}

/// The aspect-ratio bins of one checkpoint resolution: (height/width ratio key, height, width),
/// in diffusers' dict order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AspectRatioBins {
    /// The table's name (256, 512, 1024 or 2048).
    pub resolution: u32,
    /// The bins.
    pub bins: &'static [(f64, u32, u32)],
}

impl AspectRatioBins {
    /// The table diffusers picks for a transformer `sample_size` (32, 64, 128, 256), if any.
    pub fn for_sample_size(sample_size: usize) -> Option<Self> {
        let (resolution, bins) = match sample_size {
            32 => (256, BIN_256),
            64 => (512, BIN_512),
            128 => (1024, BIN_1024),
            256 => (2048, BIN_2048),
            _ => return None,
        };
        Some(Self { resolution, bins })
    }

    /// `classify_height_width_bin`: the bin whose ratio key is nearest to `height / width`
    /// (the first on ties), as `(height, width)`.
    /// An empty table keeps the size as it is.
    pub fn classify(&self, height: u32, width: u32) -> (u32, u32) {
        let ratio = f64::from(height) / f64::from(width);
        let mut best: Option<(f64, u32, u32)> = None;
        for &bin in self.bins {
            if best.is_none_or(|b| (bin.0 - ratio).abs() < (b.0 - ratio).abs()) {
                best = Some(bin);
            }
        }
        best.map_or((height, width), |b| (b.1, b.2))
    }
}

/// diffusers' `ASPECT_RATIO_256_BIN`: (height/width key, height, width).
pub const BIN_256: &[(f64, u32, u32)] = &[
    (0.25, 128, 512),
    (0.28, 128, 464),
    (0.32, 144, 448),
    (0.33, 144, 432),
    (0.35, 144, 416),
    (0.4, 160, 400),
    (0.42, 160, 384),
    (0.48, 176, 368),
    (0.5, 176, 352),
    (0.52, 176, 336),
    (0.57, 192, 336),
    (0.6, 192, 320),
    (0.68, 208, 304),
    (0.72, 208, 288),
    (0.78, 224, 288),
    (0.82, 224, 272),
    (0.88, 240, 272),
    (0.94, 240, 256),
    (1.0, 256, 256),
    (1.07, 256, 240),
    (1.13, 272, 240),
    (1.21, 272, 224),
    (1.29, 288, 224),
    (1.38, 288, 208),
    (1.46, 304, 208),
    (1.67, 320, 192),
    (1.75, 336, 192),
    (2.0, 352, 176),
    (2.09, 368, 176),
    (2.4, 384, 160),
    (2.5, 400, 160),
    (3.0, 432, 144),
    (4.0, 512, 128),
];
/// diffusers' `ASPECT_RATIO_512_BIN`: (height/width key, height, width).
pub const BIN_512: &[(f64, u32, u32)] = &[
    (0.25, 256, 1024),
    (0.28, 256, 928),
    (0.32, 288, 896),
    (0.33, 288, 864),
    (0.35, 288, 832),
    (0.4, 320, 800),
    (0.42, 320, 768),
    (0.48, 352, 736),
    (0.5, 352, 704),
    (0.52, 352, 672),
    (0.57, 384, 672),
    (0.6, 384, 640),
    (0.68, 416, 608),
    (0.72, 416, 576),
    (0.78, 448, 576),
    (0.82, 448, 544),
    (0.88, 480, 544),
    (0.94, 480, 512),
    (1.0, 512, 512),
    (1.07, 512, 480),
    (1.13, 544, 480),
    (1.21, 544, 448),
    (1.29, 576, 448),
    (1.38, 576, 416),
    (1.46, 608, 416),
    (1.67, 640, 384),
    (1.75, 672, 384),
    (2.0, 704, 352),
    (2.09, 736, 352),
    (2.4, 768, 320),
    (2.5, 800, 320),
    (3.0, 864, 288),
    (4.0, 1024, 256),
];
/// diffusers' `ASPECT_RATIO_1024_BIN`: (height/width key, height, width).
pub const BIN_1024: &[(f64, u32, u32)] = &[
    (0.25, 512, 2048),
    (0.28, 512, 1856),
    (0.32, 576, 1792),
    (0.33, 576, 1728),
    (0.35, 576, 1664),
    (0.4, 640, 1600),
    (0.42, 640, 1536),
    (0.48, 704, 1472),
    (0.5, 704, 1408),
    (0.52, 704, 1344),
    (0.57, 768, 1344),
    (0.6, 768, 1280),
    (0.68, 832, 1216),
    (0.72, 832, 1152),
    (0.78, 896, 1152),
    (0.82, 896, 1088),
    (0.88, 960, 1088),
    (0.94, 960, 1024),
    (1.0, 1024, 1024),
    (1.07, 1024, 960),
    (1.13, 1088, 960),
    (1.21, 1088, 896),
    (1.29, 1152, 896),
    (1.38, 1152, 832),
    (1.46, 1216, 832),
    (1.67, 1280, 768),
    (1.75, 1344, 768),
    (2.0, 1408, 704),
    (2.09, 1472, 704),
    (2.4, 1536, 640),
    (2.5, 1600, 640),
    (3.0, 1728, 576),
    (4.0, 2048, 512),
];
/// diffusers' `ASPECT_RATIO_2048_BIN`: (height/width key, height, width).
pub const BIN_2048: &[(f64, u32, u32)] = &[
    (0.25, 1024, 4096),
    (0.26, 1024, 3968),
    (0.27, 1024, 3840),
    (0.28, 1024, 3712),
    (0.32, 1152, 3584),
    (0.33, 1152, 3456),
    (0.35, 1152, 3328),
    (0.4, 1280, 3200),
    (0.42, 1280, 3072),
    (0.48, 1408, 2944),
    (0.5, 1408, 2816),
    (0.52, 1408, 2688),
    (0.57, 1536, 2688),
    (0.6, 1536, 2560),
    (0.68, 1664, 2432),
    (0.72, 1664, 2304),
    (0.78, 1792, 2304),
    (0.82, 1792, 2176),
    (0.88, 1920, 2176),
    (0.94, 1920, 2048),
    (1.0, 2048, 2048),
    (1.07, 2048, 1920),
    (1.13, 2176, 1920),
    (1.21, 2176, 1792),
    (1.29, 2304, 1792),
    (1.38, 2304, 1664),
    (1.46, 2432, 1664),
    (1.67, 2560, 1536),
    (1.75, 2688, 1536),
    (2.0, 2816, 1408),
    (2.09, 2944, 1408),
    (2.4, 3072, 1280),
    (2.5, 3200, 1280),
    (2.89, 3328, 1152),
    (3.0, 3456, 1152),
    (3.11, 3584, 1152),
    (3.62, 3712, 1024),
    (3.75, 3840, 1024),
    (3.88, 3968, 1024),
    (4.0, 4096, 1024),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_matches_diffusers_examples() {
        let bins = AspectRatioBins::for_sample_size(128).unwrap();
        assert_eq!(bins.classify(1024, 1024), (1024, 1024));
        assert_eq!(bins.classify(1024, 576), (1344, 768)); // 1.78 → 1.75
        assert_eq!(bins.classify(576, 1024), (768, 1344));
        let small = AspectRatioBins::for_sample_size(32).unwrap();
        assert_eq!(small.classify(96, 160), (192, 320)); // 0.6
        assert!(AspectRatioBins::for_sample_size(48).is_none());
    }
}
