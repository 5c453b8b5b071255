//! Input pictures as diffusers' image processors hand them to the VAE: the image to start from
//! (`VaeImageProcessor.preprocess(image, height, width)`) and the inpainting mask (the mask
//! processor: `do_normalize=False, do_binarize=True, do_convert_grayscale=True`, then
//! `F.interpolate` to the latent size).

use candle_core::{Device, Tensor};

use crate::image::RgbImage;
use crate::resample::Plane8;
use crate::PipelineError;

/// `[1, 3, height, width]` f32 in [−1, 1]: Pillow's Lanczos resize to exactly `width × height`
/// (no crop, whatever the aspect ratio), `/255`, then `2x − 1`, each in f32 as numpy and torch do.
pub fn image_tensor(image: &RgbImage, width: usize, height: usize, device: &Device) -> Result<Tensor, PipelineError> {
    let plane = Plane8::from_rgb(image).resize_lanczos(width, height);
    let mut chw = vec![0f32; 3 * width * height];
    for (i, pixel) in plane.data.chunks_exact(3).enumerate() {
        for (c, &v) in pixel.iter().enumerate() {
            chw[c * width * height + i] = 2.0 * (f32::from(v) / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, height, width), device)?)
}

/// The mask at the latent size `[1, 1, latent_height, latent_width]`, 1 where the model repaints:
/// resized like the image to `width × height` (Lanczos, in RGB), then to grayscale, `/255`,
/// binarised (`< 0.5` → 0, else 1), and sampled nearest (torch's legacy `nearest`:
/// `⌊i · in/out⌋`) down to the latents.
pub fn mask_tensor(
    mask: &RgbImage,
    (width, height): (usize, usize),
    (latent_width, latent_height): (usize, usize),
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let gray = Plane8::from_rgb(mask).resize_lanczos(width, height).to_luma();
    let nearest = |i: usize, input: usize, output: usize| {
        if input == output {
            return i;
        }
        let scale = input as f32 / output as f32;
        ((i as f32 * scale).floor() as usize).min(input - 1)
    };
    let mut values = Vec::with_capacity(latent_width * latent_height);
    for y in 0..latent_height {
        let row = nearest(y, height, latent_height);
        for x in 0..latent_width {
            let v = f32::from(gray.data[row * width + nearest(x, width, latent_width)]) / 255.0;
            values.push(if v < 0.5 { 0f32 } else { 1.0 });
        }
    }
    Ok(Tensor::from_vec(values, (1, 1, latent_height, latent_width), device)?)
}
