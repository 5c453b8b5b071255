//! SA-Solver (diffusers' `SASolverScheduler`) as the official PixArt-Σ demo runs it: data
//! prediction, τ(t) = 1 for 200 ≤ t ≤ 800 else 0, a stochastic Adams–Bashforth predictor and
//! Adams–Moulton corrector of order 2, a final target sigma of σ_min.
//!
//! All scalar coefficients follow diffusers' expressions in the same f32 order of operations.

use candle_core::{DType, Tensor};

use crate::config::SchedulerConfig;
use crate::noise_schedule::{inference_schedule, train_alphas_cumprod, AlphaSigma, DataPrediction};
use crate::{begin_step, check_begin, mix, scale, NoiseSource, Scheduler, SchedulerError};

/// Predictor and corrector order of the demo configuration.
const ORDER: usize = 2;

/// The demo's stochasticity: τ = 1 for 200 ≤ t ≤ 800, else 0 (diffusers' default `tau_func`).
pub fn demo_tau(timestep: u32) -> u32 {
    u32::from((200..=800).contains(&timestep))
}

/// ∫ e^{(1+τ²)λ} λ^order dλ-type terms of `get_coefficients_exponential_positive`, orders 0 and 1.
fn exp_positive(order: usize, start: f32, end: f32, t2: f32) -> f32 {
    let end_cov = t2 * end;
    let start_cov = t2 * start;
    let decay = (-(end_cov - start_cov)).exp();
    match order {
        0 => end_cov.exp() * (1.0 - decay) / t2,
        _ => end_cov.exp() * ((end_cov - 1.0) - (start_cov - 1.0) * decay) / (t2 * t2),
    }
}

/// `get_coefficients_fn` for orders 1 and 2 (Lagrange basis on `lambdas` times the integrals).
fn coefficients(order: usize, start: f32, end: f32, lambdas: &[f32], t2: f32) -> Vec<f32> {
    let lagrange: Vec<Vec<f32>> = if order == 1 {
        vec![vec![1.0]]
    } else {
        let (l0, l1) = (lambdas[0], lambdas[1]);
        vec![vec![1.0 / (l0 - l1), -l1 / (l0 - l1)], vec![1.0 / (l1 - l0), -l0 / (l1 - l0)]]
    };
    lagrange
        .iter()
        .map(|row| (0..order).fold(0.0f32, |acc, j| acc + row[j] * exp_positive(order - 1 - j, start, end, t2)))
        .collect()
}

/// SA-Solver with the demo's settings.
#[derive(Debug, Clone)]
pub struct SaSolver {
    timesteps: Vec<u32>,
    /// Schedule sigmas at each timestep, then σ_min.
    sigmas: Vec<f32>,
    /// `(√ᾱ_t, √(1 − ᾱ_t))` at each timestep, what `add_noise` mixes with.
    noise_levels: Vec<(f32, f32)>,
    /// `x0` from each step's model output.
    data_prediction: DataPrediction,
    lower_order_final: bool,
    /// Data predictions of the last two steps, oldest first.
    model_outputs: [Option<Tensor>; ORDER],
    /// Their timesteps.
    timestep_list: [Option<u32>; ORDER],
    last_sample: Option<Tensor>,
    last_noise: Option<Tensor>,
    this_corrector_order: usize,
    lower_order_nums: usize,
    step_index: usize,
}

impl SaSolver {
    /// Builds the demo's SA-Solver from the model repo's (DPM-Solver) scheduler config, as
    /// `SASolverScheduler.from_config(config, algorithm_type="data_prediction")` does.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate_common()?;
        let (timesteps, sigmas) = inference_schedule(config, steps, false)?;
        let alphas_cumprod = train_alphas_cumprod(config);
        let noise_levels = timesteps
            .iter()
            .map(|&t| {
                let alpha_bar = alphas_cumprod[t as usize];
                (alpha_bar.sqrt(), (1.0f32 - alpha_bar).sqrt())
            })
            .collect();
        Ok(Self {
            timesteps,
            noise_levels,
            data_prediction: DataPrediction::new(&sigmas),
            sigmas,
            lower_order_final: config.lower_order_final,
            model_outputs: [None, None],
            timestep_list: [None, None],
            last_sample: None,
            last_noise: None,
            this_corrector_order: 1,
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    fn lambda_at(&self, index: usize) -> f32 {
        AlphaSigma::new(self.sigmas[index]).lambda
    }

    /// The shared tail of both updates: `e^{−τ²h}(σ_t/σ_s)x + Σ c_i·(1+τ²)σ_t e^{−τ²λ_t} m_i + noise`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        x: &Tensor,
        outputs: &[&Tensor],
        gradient: &[f32],
        t: AlphaSigma,
        s0: AlphaSigma,
        h: f32,
        tau: u32,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let tau2 = (tau * tau) as f32;
        let t2 = 1.0 + tau2;
        let mut gradient_part = x.zeros_like()?;
        for (coefficient, output) in gradient.iter().zip(outputs) {
            let c = t2 * t.sigma * (-tau2 * t.lambda).exp() * coefficient;
            gradient_part = (gradient_part + scale(output, c)?)?;
        }
        let noise_part = scale(noise, t.sigma * (1.0 - (-2.0 * tau2 * h).exp()).sqrt())?;
        (scale(x, (-tau2 * h).exp() * (t.sigma / s0.sigma))? + gradient_part)? + noise_part
    }

    /// The stochastic Adams–Bashforth predictor from step k to k+1.
    fn predict(&self, x: &Tensor, order: usize, tau: u32, noise: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.step_index;
        let t = AlphaSigma::new(self.sigmas[k + 1]);
        let s0 = AlphaSigma::new(self.sigmas[k]);
        let h = t.lambda - s0.lambda;
        let lambdas: Vec<f32> = (0..order).map(|i| self.lambda_at(k - i)).collect();
        let t2 = (1 + tau * tau) as f32;
        let mut gradient = coefficients(order, s0.lambda, t.lambda, &lambdas, t2);
        if order == 2 {
            let temp_lambda = self.lambda_at(k - 1);
            let correction = 1.0 * (t2 * t.lambda).exp() * (h * h / 2.0 - (h * t2 - 1.0 + (t2 * -h).exp()) / (t2 * t2))
                / (s0.lambda - temp_lambda);
            gradient[0] += correction;
            gradient[1] -= correction;
        }
        let outputs: Vec<&Tensor> = match (order, &self.model_outputs) {
            (1, [_, Some(newest)]) => vec![newest],
            (_, [Some(older), Some(newest)]) => vec![newest, older],
            _ => return Err(out_of_sequence("the predictor ran without the model outputs it needs")),
        };
        self.update(x, &outputs, &gradient, t, s0, h, tau, noise)
    }

    /// The stochastic Adams–Moulton corrector of the sample that arrived at step k.
    fn correct(&self, this_output: &Tensor, order: usize, tau: u32) -> candle_core::Result<Tensor> {
        let k = self.step_index;
        let t = AlphaSigma::new(self.sigmas[k]);
        let s0 = AlphaSigma::new(self.sigmas[k - 1]);
        let h = t.lambda - s0.lambda;
        let lambdas: Vec<f32> = (0..order).map(|i| self.lambda_at(k - i)).collect();
        let t2 = (1 + tau * tau) as f32;
        let mut gradient = coefficients(order, s0.lambda, t.lambda, &lambdas, t2);
        if order == 2 {
            let correction = 1.0 * (t2 * t.lambda).exp() * (h / 2.0 - (h * t2 - 1.0 + (t2 * -h).exp()) / (t2 * t2 * h));
            gradient[0] += correction;
            gradient[1] -= correction;
        }
        let previous = self.model_outputs[ORDER - 1].as_ref();
        let outputs: Vec<&Tensor> = match (order, previous) {
            (2, Some(previous)) => vec![this_output, previous],
            _ => vec![this_output],
        };
        let (Some(last_sample), Some(last_noise)) = (self.last_sample.as_ref(), self.last_noise.as_ref()) else {
            return Err(out_of_sequence("the corrector ran before any step"));
        };
        self.update(last_sample, &outputs, &gradient, t, s0, h, tau, last_noise)
    }
}

/// An internal sequencing invariant does not hold (a bug), reported instead of panicking.
fn out_of_sequence(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("SA-Solver: {what}"))
}

impl Scheduler for SaSolver {
    fn timesteps(&self) -> &[u32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        let (k, n) = (self.step_index, self.timesteps.len());
        let (eps, mut sample, out_dtype) = begin_step(k, n, model_output, sample)?;
        let x0 = self.data_prediction.at(k, &eps, &sample)?;
        if let (true, Some(_), Some(previous_t)) = (k > 0, &self.last_sample, self.timestep_list[ORDER - 1]) {
            sample = self.correct(&x0, self.this_corrector_order, demo_tau(previous_t))?;
        }
        self.model_outputs.rotate_left(1);
        self.timestep_list.rotate_left(1);
        self.model_outputs[ORDER - 1] = Some(x0.clone());
        self.timestep_list[ORDER - 1] = Some(self.timesteps[k]);
        let drawn = noise.sample(eps.shape(), DType::F32, eps.device())?;
        let (predictor, corrector) =
            if self.lower_order_final { (ORDER.min(n - k), ORDER.min(n - k + 1)) } else { (ORDER, ORDER) };
        let this_predictor_order = predictor.min(self.lower_order_nums + 1);
        self.this_corrector_order = corrector.min(self.lower_order_nums + 2);
        self.last_sample = Some(sample.clone());
        self.last_noise = Some(drawn.clone());
        let tau = demo_tau(self.timesteps[k]);
        let prev = self.predict(&sample, this_predictor_order, tau, &drawn)?;
        if self.lower_order_nums < ORDER {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn begin_at(&mut self, index: usize) -> Result<(), SchedulerError> {
        check_begin(self.step_index, index, self.timesteps.len())?;
        self.step_index = index;
        Ok(())
    }

    /// `√ᾱ_t · x + √(1 − ᾱ_t) · noise` at the timestep `t` at `index`, as diffusers'
    /// `SASolverScheduler.add_noise` (which reads ᾱ at the timestep it is given).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor, SchedulerError> {
        let Some(&(signal, noise_level)) = self.noise_levels.get(index) else {
            return Err(SchedulerError::Sequence(format!("add_noise at {index} past the schedule")));
        };
        mix(original, signal, noise, noise_level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_is_one_inside_200_to_800() {
        assert_eq!([demo_tau(199), demo_tau(200), demo_tau(800), demo_tau(801)], [0, 1, 1, 0]);
    }
}
