//! The samplers PixArt-Σ uses, equal to diffusers' schedulers step for step:
//!
//! * [`DpmSolverMultistep`] — DPM-Solver++ 2M (`DPMSolverMultistepScheduler`) exactly as the
//!   model repos' `scheduler_config.json` configures it (linspace spacing, order 2, midpoint,
//!   epsilon prediction, lower-order final step, final sigma zero).
//! * [`SaSolver`] — SA-Solver (`SASolverScheduler`) as the official PixArt-Σ demo runs it (data
//!   prediction, τ = 1 for 200 ≤ t ≤ 800, predictor and corrector of order 2), drawing its per-step
//!   noise from a [`NoiseSource`] the caller owns (so a seeded generator reproduces diffusers).
//!
//! Scalar coefficients are computed in f32 in the same order of operations as diffusers (which
//! computes them on 0-dim f32 tensors), so steps agree to a few ulps. A config asking for
//! something not implemented here (Karras sigmas, another solver type, thresholding, …) is an
//! error, never a silent divergence.

#![warn(missing_docs)]

pub mod config;
pub mod dpm_solver;
pub mod noise_schedule;
pub mod sa_solver;

pub use config::SchedulerConfig;
pub use dpm_solver::DpmSolverMultistep;
pub use sa_solver::SaSolver;

use candle_core::{DType, Device, Shape, Tensor};

/// Errors from building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config asks for behaviour this implementation does not have.
    #[error(transparent)]
    Unsupported(#[from] pixart_core::UnsupportedConfig),
    /// The number of inference steps is out of range.
    #[error("num_inference_steps must be between 1 and {max}, got {got}")]
    Steps {
        /// The rejected value.
        got: usize,
        /// The largest value (the number of training timesteps).
        max: usize,
    },
    /// `step` was called more times than there are timesteps.
    #[error("scheduler stepped past its last timestep ({0} steps)")]
    Finished(usize),
    /// A call out of sequence (a begin index after stepping or past the end, noise of another
    /// shape).
    #[error("scheduler used out of sequence: {0}")]
    Sequence(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Where a stochastic sampler gets its per-step Gaussian noise.
pub trait NoiseSource {
    /// Draws standard normal noise of `shape`.
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> candle_core::Result<Tensor>;
}

/// A sampler driven by the denoising loop: it owns the timesteps and turns model outputs into the
/// next sample.
pub trait Scheduler: Send {
    /// The timesteps to run the model at, first to last.
    fn timesteps(&self) -> &[u32];
    /// The factor the initial noise is multiplied by (1 for both samplers here).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// One step: the model's (ε) output at the current timestep and the current sample give the
    /// next sample. Stochastic samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError>;
    /// Starts the run at `index` of [`Self::timesteps`] (diffusers' `set_begin_index`, which
    /// image-to-image uses): the steps before it are skipped, and the first step taken has no
    /// history (first order), as in diffusers. Only before the first step.
    fn begin_at(&mut self, index: usize) -> Result<(), SchedulerError>;
    /// diffusers' `add_noise`: `original` noised with `noise` to the level of `index` of
    /// [`Self::timesteps`] (the level the sample has when the step at `index` runs).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor, SchedulerError>;
}

/// Checks a [`Scheduler::begin_at`] call: before the first step, within the timesteps.
pub(crate) fn check_begin(step_index: usize, index: usize, steps: usize) -> Result<(), SchedulerError> {
    if step_index != 0 {
        return Err(SchedulerError::Sequence(format!("begin_at({index}) after {step_index} steps")));
    }
    if index >= steps {
        return Err(SchedulerError::Sequence(format!("begin_at({index}) past the last of {steps} timesteps")));
    }
    Ok(())
}

/// `a · original + b · noise` in f32, as diffusers' `add_noise` computes it (scalars in f32).
pub(crate) fn mix(original: &Tensor, a: f32, noise: &Tensor, b: f32) -> Result<Tensor, SchedulerError> {
    let original = original.to_dtype(DType::F32)?;
    let noise = noise.to_dtype(DType::F32)?.to_device(original.device())?;
    if original.dims() != noise.dims() {
        return Err(SchedulerError::Sequence(format!(
            "add_noise: noise {:?} and sample {:?} differ in shape",
            noise.dims(),
            original.dims()
        )));
    }
    Ok((scale(&original, a)? + scale(&noise, b)?)?)
}

/// `x · a` for a scalar `a` computed in f32 (candle's affine, `x · a + 0`).
pub(crate) fn scale(x: &Tensor, a: f32) -> candle_core::Result<Tensor> {
    x.affine(f64::from(a), 0.0)
}

/// The common start of a step: refuses a step past the last timestep, and returns the model
/// output and sample in f32 with the dtype to return the next sample in.
pub(crate) fn begin_step(
    step_index: usize,
    steps: usize,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<(Tensor, Tensor, DType), SchedulerError> {
    if step_index >= steps {
        return Err(SchedulerError::Finished(steps));
    }
    Ok((model_output.to_dtype(DType::F32)?, sample.to_dtype(DType::F32)?, model_output.dtype()))
}
