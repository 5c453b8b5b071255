//! The discrete noise schedule both samplers share: betas, ᾱ, σ and the inference timesteps,
//! computed with the same floating-point steps as torch/numpy in diffusers.

use crate::config::SchedulerConfig;
use crate::SchedulerError;

/// `torch.linspace(start, end, steps, dtype=float32)`: an f32 step, the first half counted from
/// the start and the second half from the end, each value one fused multiply-add (ATen's CPU
/// kernel as compiled, which contracts `start + step * i`; verified bit for bit against torch).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// `ᾱ_t` for every training timestep, in f32 as diffusers stores them.
pub fn train_alphas_cumprod(config: &SchedulerConfig) -> Vec<f32> {
    let betas = torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, config.num_train_timesteps);
    // torch.cumprod on CPU accumulates in double and rounds each output to f32.
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&beta| {
            acc *= f64::from(1.0f32 - beta);
            acc as f32
        })
        .collect()
}

/// `σ_t = √((1 − ᾱ_t)/ᾱ_t)` for every training timestep, in f32 as diffusers stores them.
pub fn train_sigmas(config: &SchedulerConfig) -> Vec<f32> {
    train_alphas_cumprod(config).into_iter().map(|alpha_bar| ((1.0f32 - alpha_bar) / alpha_bar).sqrt()).collect()
}

/// `round_half_even(linspace(0, T−1, N+1))[::-1][:-1]`: N timesteps from T−1 down.
pub fn linspace_timesteps(num_train_timesteps: usize, steps: usize) -> Result<Vec<u32>, SchedulerError> {
    if steps == 0 || steps > num_train_timesteps {
        return Err(SchedulerError::Steps { got: steps, max: num_train_timesteps });
    }
    let stop = (num_train_timesteps - 1) as f64;
    let delta = stop / steps as f64;
    let mut points: Vec<f64> = (0..=steps).map(|i| i as f64 * delta).collect();
    points[steps] = stop;
    Ok(points.iter().rev().take(steps).map(|v| v.round_ties_even() as u32).collect())
}

/// The inference timesteps and their schedule sigmas, followed by the final sigma the last step
/// lands on (0 for DPM-Solver++ with `final_sigmas_type = "zero"`, σ_min for SA-Solver).
pub fn inference_schedule(
    config: &SchedulerConfig,
    steps: usize,
    final_sigma_is_zero: bool,
) -> Result<(Vec<u32>, Vec<f32>), SchedulerError> {
    let timesteps = linspace_timesteps(config.num_train_timesteps, steps)?;
    let train = train_sigmas(config);
    let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| train[t as usize]).collect();
    sigmas.push(if final_sigma_is_zero { 0.0 } else { train[0] });
    Ok((timesteps, sigmas))
}

/// The data prediction `x0 = (x − σ_k ε) / α_k` at each step `k` of a run, in f32 as diffusers'
/// `convert_model_output`. The division stays an elementwise division (a multiplication by
/// `1/α` rounds differently); its divisors, every step's α, go to the device once, at the first
/// step, instead of a scalar upload at each.
#[derive(Debug, Clone)]
pub struct DataPrediction {
    steps: Vec<AlphaSigma>,
    /// f32 `[steps]`: every α_k, on the device of the first sample seen.
    alphas: Option<candle_core::Tensor>,
}

impl DataPrediction {
    /// For a run over the schedule `sigmas` (one per step; extra trailing ones are ignored by
    /// callers that never reach them).
    pub fn new(sigmas: &[f32]) -> Self {
        Self { steps: sigmas.iter().map(|&s| AlphaSigma::new(s)).collect(), alphas: None }
    }

    /// `x0` of step `k` from the model's `eps` and the `sample`, both f32.
    pub fn at(
        &mut self,
        k: usize,
        eps: &candle_core::Tensor,
        sample: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        let Some(at) = self.steps.get(k).copied() else {
            candle_core::bail!("data prediction: no step {k} in a schedule of {}", self.steps.len())
        };
        let alphas = match &self.alphas {
            Some(alphas) if alphas.device().same_device(sample.device()) => alphas,
            _ => {
                let values: Vec<f32> = self.steps.iter().map(|s| s.alpha).collect();
                self.alphas.insert(candle_core::Tensor::new(values.as_slice(), sample.device())?)
            }
        };
        let alpha = alphas.narrow(0, k, 1)?.to_dtype(sample.dtype())?;
        (sample - crate::scale(eps, at.sigma)?)?.broadcast_div(&alpha)
    }
}

/// `α_t = 1/√(σ²+1)` and `σ_t = σ·α_t` of diffusers' `_sigma_to_alpha_sigma_t`, and
/// `λ = ln α − ln σ`, all in f32.
#[derive(Debug, Clone, Copy)]
pub struct AlphaSigma {
    /// α_t.
    pub alpha: f32,
    /// σ_t (the scaled one).
    pub sigma: f32,
    /// λ_t = ln α_t − ln σ_t (+∞ when σ = 0).
    pub lambda: f32,
}

impl AlphaSigma {
    /// From a schedule sigma.
    pub fn new(sigma: f32) -> Self {
        let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
        let sigma = sigma * alpha;
        Self { alpha, sigma, lambda: alpha.ln() - sigma.ln() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_the_documented_schedule() {
        assert_eq!(linspace_timesteps(1000, 1).unwrap(), vec![999]);
        let t20 = linspace_timesteps(1000, 20).unwrap();
        assert_eq!(t20[..3], [999, 949, 899]);
        assert_eq!(*t20.last().unwrap(), 50);
        assert!(linspace_timesteps(1000, 0).is_err());
        assert!(linspace_timesteps(1000, 1001).is_err());
    }

    #[test]
    fn linspace_hits_both_ends() {
        let v = torch_linspace_f32(1e-4, 0.02, 1000);
        assert_eq!(v[0], 1e-4);
        assert_eq!(v[999], 0.02);
    }
}
