//! diffusers' `DiagonalGaussianDistribution`: the encoder's latent posterior.

use candle_core::Tensor;

use crate::VaeError;

/// A Gaussian with diagonal covariance over latents: `mean`, and `logvar` clamped to [−30, 20]
/// as diffusers clamps it. All tensors f32, `[B, latent, h, w]`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// The mean (what `mode()` returns).
    pub mean: Tensor,
    /// The log-variance, clamped.
    pub logvar: Tensor,
    /// `exp(logvar / 2)`.
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// From the encoder's moments `[B, 2·latent, h, w]`: the first half of the channels is the
    /// mean, the second the log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self, VaeError> {
        let channels = moments.dim(1)?;
        if channels % 2 != 0 {
            return Err(VaeError::Input(format!("moments need an even channel count, got {:?}", moments.dims())));
        }
        let half = channels / 2;
        let mean = moments.narrow(1, 0, half)?.contiguous()?;
        let logvar = moments.narrow(1, half, half)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// `mode()`: the mean.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `sample(generator)`: `mean + std · ε` for a standard normal `ε` of the mean's shape,
    /// drawn by the caller (from the request's generator, where diffusers draws it).
    pub fn sample(&self, standard_normal: &Tensor) -> Result<Tensor, VaeError> {
        if standard_normal.dims() != self.mean.dims() {
            return Err(VaeError::Input(format!(
                "the noise {:?} must have the posterior's shape {:?}",
                standard_normal.dims(),
                self.mean.dims()
            )));
        }
        let noise = standard_normal.to_dtype(self.mean.dtype())?.to_device(self.mean.device())?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}
