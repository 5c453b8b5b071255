//! DPM-Solver++ 2M (diffusers' `DPMSolverMultistepScheduler` with `dpmsolver++`, order 2,
//! midpoint, final sigma zero).
//!
//! ```text
//! D_k  = (x_k − σ_k ε_k) / α_k                         (data prediction)
//! h    = λ_{k+1} − λ_k
//! 1st order (first and last step): x_{k+1} = (σ_{k+1}/σ_k) x_k − α_{k+1}(e^{−h} − 1) D_k
//! 2nd order: r = (λ_k − λ_{k−1})/h, D1 = (D_k − D_{k−1})/r,
//!            x_{k+1} = (σ_{k+1}/σ_k) x_k − α_{k+1}(e^{−h} − 1) D_k − ½ α_{k+1}(e^{−h} − 1) D1
//! ```

use candle_core::Tensor;
use pixart_core::UnsupportedConfig;

use crate::config::SchedulerConfig;
use crate::noise_schedule::{inference_schedule, AlphaSigma, DataPrediction};
use crate::{begin_step, check_begin, mix, scale, NoiseSource, Scheduler, SchedulerError};

/// DPM-Solver++ multistep, second order.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    timesteps: Vec<u32>,
    /// Schedule sigmas at each timestep, then the final 0.
    sigmas: Vec<f32>,
    /// `x0` from each step's model output.
    data_prediction: DataPrediction,
    /// The previous data prediction, once one step has run.
    previous: Option<Tensor>,
    step_index: usize,
}

impl DpmSolverMultistep {
    /// Builds the sampler for `steps` inference steps, refusing configs it does not implement.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate_common()?;
        if config.algorithm_type != "dpmsolver++" {
            return Err(UnsupportedConfig::new("algorithm_type", &config.algorithm_type, "dpmsolver++").into());
        }
        if config.solver_order != 2 {
            return Err(UnsupportedConfig::new("solver_order", config.solver_order, "2").into());
        }
        if config.solver_type != "midpoint" {
            return Err(UnsupportedConfig::new("solver_type", &config.solver_type, "midpoint").into());
        }
        if config.final_sigmas_type != "zero" {
            return Err(UnsupportedConfig::new("final_sigmas_type", &config.final_sigmas_type, "zero").into());
        }
        let (timesteps, sigmas) = inference_schedule(config, steps, true)?;
        let data_prediction = DataPrediction::new(&sigmas);
        Ok(Self { timesteps, sigmas, data_prediction, previous: None, step_index: 0 })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[u32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        let (k, n) = (self.step_index, self.timesteps.len());
        let (eps, sample, out_dtype) = begin_step(k, n, model_output, sample)?;
        let s0 = AlphaSigma::new(self.sigmas[k]);
        let t = AlphaSigma::new(self.sigmas[k + 1]);
        let x0 = self.data_prediction.at(k, &eps, &sample)?;
        // With a zero final sigma diffusers always takes the last step at first order;
        // `lower_order_final` and `euler_at_final` change nothing else at order 2.
        let last = k == n - 1;
        let h = t.lambda - s0.lambda;
        let exp_m1 = (-h).exp() - 1.0;
        let first = scale(&sample, t.sigma / s0.sigma)?;
        let prev = match (&self.previous, last) {
            (Some(previous), false) => {
                let s1 = AlphaSigma::new(self.sigmas[k - 1]);
                let h0 = s0.lambda - s1.lambda;
                let r0 = h0 / h;
                let d1 = scale(&(&x0 - previous)?, 1.0 / r0)?;
                ((first - scale(&x0, t.alpha * exp_m1)?)? - scale(&d1, 0.5 * (t.alpha * exp_m1))?)?
            }
            _ => (first - scale(&x0, t.alpha * exp_m1)?)?,
        };
        self.previous = Some(x0);
        self.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn begin_at(&mut self, index: usize) -> Result<(), SchedulerError> {
        check_begin(self.step_index, index, self.timesteps.len())?;
        self.step_index = index;
        Ok(())
    }

    /// `α_k · x + σ_k · noise` from the schedule sigma at `index`, as diffusers picks it (its
    /// begin index before the first step, its step index after).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor, SchedulerError> {
        let Some(&sigma) = self.sigmas.get(index) else {
            return Err(SchedulerError::Sequence(format!("add_noise at {index} past the schedule")));
        };
        let level = AlphaSigma::new(sigma);
        mix(original, level.alpha, noise, level.sigma)
    }
}
