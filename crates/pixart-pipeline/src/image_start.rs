//! Starting from a picture, as diffusers' SDXL image-to-image and inpainting pipelines start
//! (`get_timesteps`, `prepare_latents`, `prepare_mask_latents`), around PixArt's own loop.
//!
//! Random draws, in this order, from the request's generator: (1) the posterior sample of the
//! encoded image; (2) the noise, one draw for the whole batch; (3) inpainting only: the sample
//! diffusers draws when it encodes the masked image for a 9-channel model — a 4-channel model
//! never uses it, so it is drawn and dropped (it moves the generator before SA-Solver's draws).

use candle_core::{DType, Device, Tensor};
use pixart_scheduler::Scheduler;
use pixart_vae::VaeEncoder;

use crate::invalid_parameter::InvalidParameter;
use crate::rng::TorchGenerator;
use crate::PipelineError;

/// The index of the first step a run of `steps` steps at `strength` takes: `steps − init` with
/// `init = min(⌊steps · strength⌋, steps)` (`get_timesteps`). A strength that leaves no step is
/// refused naming `strength`.
pub fn first_step(steps: usize, strength: f64) -> Result<usize, InvalidParameter> {
    let init = ((steps as f64 * strength) as usize).min(steps);
    if init == 0 {
        return Err(InvalidParameter::new(
            "strength",
            format!(
                "leaves no step to run: with {steps} steps it must be at least {} (⌊steps · strength⌋ ≥ 1)",
                1.0 / steps as f64
            ),
        ));
    }
    Ok(steps - init)
}

/// What a run started from a picture keeps for inpainting's blend after every step.
#[derive(Debug)]
pub struct PictureStart {
    /// The image's latents (posterior sample × scaling factor), one row per image.
    image_latents: Tensor,
    /// The noise drawn for the batch.
    noise: Tensor,
    /// Inpainting: `[n, 1, h, w]`, 1 where the model repaints.
    mask: Option<Tensor>,
}

/// The input of [`PictureStart::prepare`]: the preprocessed image and mask, the batch size,
/// where the run begins and whether the whole image is repainted (strength 1).
pub struct StartInput<'a> {
    /// `[1, 3, H, W]` in [−1, 1] at the generated size.
    pub image: &'a Tensor,
    /// `[1, 1, h, w]` at the latent size (inpainting).
    pub mask: Option<&'a Tensor>,
    /// Images in the batch.
    pub num_images: usize,
    /// The first step's index in the schedule.
    pub begin: usize,
    /// `strength == 1`.
    pub full_strength: bool,
}

impl PictureStart {
    /// Encodes the image and draws in diffusers' order; returns the start and the first latents
    /// (the noised image latents; for inpainting at strength 1, the noise itself).
    pub fn prepare(
        encoder: &VaeEncoder,
        input: StartInput<'_>,
        scheduler: &dyn Scheduler,
        generator: &mut TorchGenerator,
        device: &Device,
    ) -> Result<(Self, Tensor), PipelineError> {
        let n = input.num_images;
        let posterior = encoder.encode(input.image)?;
        let shape = posterior.mean.dims().to_vec();
        let sample = posterior.sample(&generator.randn(shape.as_slice(), DType::F32, device)?)?; // draw 1
        let one = encoder.scale_latents(&sample)?;
        let image_latents = Tensor::cat(&vec![one; n], 0)?;
        let noise = generator.randn(image_latents.dims(), DType::F32, device)?; // draw 2
        let mask = match input.mask {
            Some(mask) => {
                generator.randn_vec(shape.iter().product()); // draw 3, dropped
                Some(Tensor::cat(&vec![mask.to_device(device)?; n], 0)?)
            }
            None => None,
        };
        let latents = if mask.is_some() && input.full_strength {
            (&noise * scheduler.init_noise_sigma())?
        } else {
            scheduler.add_noise(&image_latents, &noise, input.begin)?
        };
        Ok((Self { image_latents, noise, mask }, latents))
    }

    /// Inpainting's blend after a step: the image latents noised to the level of the next step
    /// (`next`, an index in the schedule; the clean latents after the last step) where the mask
    /// keeps, the model's latents where it repaints. Image-to-image: the latents as they are.
    pub fn blend(
        &self,
        latents: Tensor,
        scheduler: &dyn Scheduler,
        next: Option<usize>,
    ) -> Result<Tensor, PipelineError> {
        let Some(mask) = &self.mask else { return Ok(latents) };
        let kept = match next {
            Some(index) => scheduler.add_noise(&self.image_latents, &self.noise, index)?,
            None => self.image_latents.clone(),
        };
        let latents = latents.to_dtype(DType::F32)?;
        // (1 − m)·kept + m·latents, as diffusers writes it.
        Ok((mask.ones_like()? - mask)?.broadcast_mul(&kept)?.add(&mask.broadcast_mul(&latents)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_is_get_timesteps() {
        assert_eq!(first_step(10, 0.3).unwrap(), 7);
        assert_eq!(first_step(10, 1.0).unwrap(), 0);
        assert_eq!(first_step(7, 0.29).unwrap(), 5); // ⌊2.03⌋ = 2
        assert_eq!(first_step(20, 0.05).unwrap(), 19);
        assert_eq!(first_step(10, 0.05).unwrap_err().parameter, "strength");
        assert!(first_step(10, 0.0).is_err());
    }
}
