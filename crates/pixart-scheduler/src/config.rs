//! `scheduler_config.json` (diffusers' `DPMSolverMultistepScheduler` config), with validation.

use serde::Deserialize;

use pixart_core::UnsupportedConfig;

use crate::SchedulerError;

/// The fields of a diffusers scheduler config that affect sampling. Unknown keys are ignored, as
/// diffusers ignores them; every known key that would change the result is checked by
/// [`SchedulerConfig::validate_common`] and each sampler's constructor.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (1e-4).
    pub beta_start: f64,
    /// Last beta (0.02).
    pub beta_end: f64,
    /// `linear` only.
    pub beta_schedule: String,
    /// Must be null.
    pub trained_betas: Option<serde_json::Value>,
    /// 2 only.
    pub solver_order: usize,
    /// `epsilon` only.
    pub prediction_type: String,
    /// Must be false.
    pub thresholding: bool,
    /// `dpmsolver++` (DPM-Solver) or `data_prediction` (SA-Solver); other values are refused.
    pub algorithm_type: String,
    /// `midpoint` only.
    pub solver_type: String,
    /// Lower the order on the final steps.
    pub lower_order_final: bool,
    /// Use Euler on the final step.
    pub euler_at_final: bool,
    /// Must be false.
    pub use_karras_sigmas: bool,
    /// Must be false.
    pub use_exponential_sigmas: bool,
    /// Must be false.
    pub use_beta_sigmas: bool,
    /// Must be false.
    pub use_lu_lambdas: bool,
    /// Must be false.
    pub use_flow_sigmas: bool,
    /// `zero` only (for DPM-Solver).
    pub final_sigmas_type: String,
    /// Must be -inf (`-Infinity` in diffusers' JSON) or absent.
    pub lambda_min_clipped: Option<serde_json::Value>,
    /// Must be null.
    pub variance_type: Option<String>,
    /// `linspace` only.
    pub timestep_spacing: String,
    /// Must be false.
    pub rescale_betas_zero_snr: bool,
    /// Must be false.
    pub use_dynamic_shifting: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: None,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
        }
    }
}

/// The most training timesteps a config may declare (the published models use 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

fn unsupported(field: &'static str, value: impl std::fmt::Display, supported: &'static str) -> SchedulerError {
    UnsupportedConfig::new(field, value, supported).into()
}

fn must_be_false(field: &'static str, value: bool) -> Result<(), SchedulerError> {
    if value {
        return Err(unsupported(field, value, "false"));
    }
    Ok(())
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` text (Python-style `-Infinity` accepted).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&pixart_core::python_json(text))
    }

    /// Checks every setting shared by both samplers; the sampler-specific ones (algorithm type,
    /// final sigma) are checked by each sampler.
    pub fn validate_common(&self) -> Result<(), SchedulerError> {
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return Err(unsupported("num_train_timesteps", self.num_train_timesteps, "an integer from 2 to 100000"));
        }
        for (field, beta) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(unsupported(field, beta, "a number between 0 and 1 (exclusive)"));
            }
        }
        if self.beta_schedule != "linear" {
            return Err(unsupported("beta_schedule", &self.beta_schedule, "linear"));
        }
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("trained_betas", "a list", "null"));
        }
        if self.prediction_type != "epsilon" {
            return Err(unsupported("prediction_type", &self.prediction_type, "epsilon"));
        }
        if let Some(v) = &self.variance_type {
            return Err(unsupported("variance_type", v, "null"));
        }
        if self.timestep_spacing != "linspace" {
            return Err(unsupported("timestep_spacing", &self.timestep_spacing, "linspace"));
        }
        match &self.lambda_min_clipped {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if s == "-Infinity" => {}
            Some(other) => return Err(unsupported("lambda_min_clipped", other, "-Infinity")),
        }
        must_be_false("thresholding", self.thresholding)?;
        must_be_false("use_karras_sigmas", self.use_karras_sigmas)?;
        must_be_false("use_exponential_sigmas", self.use_exponential_sigmas)?;
        must_be_false("use_beta_sigmas", self.use_beta_sigmas)?;
        must_be_false("use_lu_lambdas", self.use_lu_lambdas)?;
        must_be_false("use_flow_sigmas", self.use_flow_sigmas)?;
        must_be_false("rescale_betas_zero_snr", self.rescale_betas_zero_snr)?;
        must_be_false("use_dynamic_shifting", self.use_dynamic_shifting)?;
        Ok(())
    }
}
