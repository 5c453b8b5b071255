//! DPM-Solver++ and SA-Solver against diffusers' schedulers fed the same inputs, for
//! N ∈ {1, 2, 3, 5, 14, 20, 25, 35, 50}: identical timesteps, every step within 1e-6 relative
//! (max |ours − diffusers| / max |diffusers|).
//!
//! One exception, measured rather than assumed: where an SA-Solver update cancels, diffusers'
//! own f32 result is more than 1e-6 away from the same step evaluated exactly (float64, recorded
//! in the goldens as `sa.N.samples_f64`), because torch's f32 `exp`/`log` (MKL VML) round
//! differently from any portable libm. There the bound is 3× diffusers' own f32 error.

use candle_core::{DType, Device, Shape, Tensor};
use pixart_scheduler::{DpmSolverMultistep, NoiseSource, SaSolver, Scheduler, SchedulerConfig, SchedulerError};
use pixart_suite::{golden, load_goldens, max_abs, max_abs_diff, model_dir};

const STEP_COUNTS: [usize; 9] = [1, 2, 3, 5, 14, 20, 25, 35, 50];

fn fixture_config() -> SchedulerConfig {
    let text = std::fs::read_to_string(model_dir("tiny-sigma-256").join("scheduler/scheduler_config.json")).unwrap();
    SchedulerConfig::from_json(&text).unwrap()
}

/// Replays the noise diffusers drew, in order.
struct Recorded {
    noises: Tensor,
    next: usize,
}

impl NoiseSource for Recorded {
    fn sample(&mut self, shape: &Shape, dtype: DType, _device: &Device) -> candle_core::Result<Tensor> {
        let noise = self.noises.get(self.next)?.to_dtype(dtype)?;
        assert_eq!(noise.shape(), shape);
        self.next += 1;
        Ok(noise)
    }
}

/// The bound for step `i`: 1e-6, or 3× diffusers' own f32 rounding error at that step when the
/// goldens record an exact (f64) evaluation and that error is larger.
fn bound(goldens: &std::collections::HashMap<String, Tensor>, prefix: &str, n: usize, i: usize) -> f32 {
    let Some(exact) = goldens.get(&format!("{prefix}.{n}.samples_f64")) else { return 1e-6 };
    let want = golden(goldens, &format!("{prefix}.{n}.samples")).get(i).unwrap();
    let floor = max_abs_diff(&want, &exact.get(i).unwrap()) / max_abs(&want);
    1e-6f32.max(3.0 * floor)
}

fn run(prefix: &str, n: usize, scheduler: &mut dyn Scheduler, noise: &mut dyn NoiseSource) {
    let goldens = load_goldens("schedulers.safetensors");
    let timesteps: Vec<u32> = golden(&goldens, &format!("{prefix}.{n}.timesteps"))
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert_eq!(scheduler.timesteps(), timesteps.as_slice(), "{prefix} N={n} timesteps");
    let outputs = golden(&goldens, &format!("dpm.{n}.model_outputs"));
    let expected = golden(&goldens, &format!("{prefix}.{n}.samples"));
    let mut sample = golden(&goldens, &format!("dpm.{n}.sample0")).clone();
    let mut worst = 0f32;
    for i in 0..n {
        sample = scheduler.step(&outputs.get(i).unwrap(), &sample, noise).unwrap();
        let want = expected.get(i).unwrap();
        let relative = max_abs_diff(&sample, &want) / max_abs(&want).max(f32::MIN_POSITIVE);
        worst = worst.max(relative);
        let tolerance = bound(&goldens, prefix, n, i);
        if tolerance > 1e-6 {
            eprintln!("{prefix} N={n} step {i}: diffusers' own f32 error allows {tolerance:.2e}; ours {relative:.2e}");
        }
        assert!(relative <= tolerance, "{prefix} N={n} step {i}: relative diff {relative:e} > {tolerance:e}");
        sample = want; // each step is compared on diffusers' own input
    }
    eprintln!("{prefix} N={n}: worst step relative diff {worst:.2e}");
    assert!(matches!(scheduler.step(&outputs.get(0).unwrap(), &sample, noise), Err(SchedulerError::Finished(_))));
}

struct NoNoise;
impl NoiseSource for NoNoise {
    fn sample(&mut self, _: &Shape, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        panic!("DPM-Solver++ must not draw noise")
    }
}

#[test]
fn dpm_solver_matches_diffusers() {
    let config = fixture_config();
    for n in STEP_COUNTS {
        let mut scheduler = DpmSolverMultistep::new(&config, n).unwrap();
        run("dpm", n, &mut scheduler, &mut NoNoise);
    }
}

#[test]
fn sa_solver_matches_diffusers_with_the_same_noise() {
    let config = fixture_config();
    let goldens = load_goldens("schedulers.safetensors");
    for n in STEP_COUNTS {
        let mut scheduler = SaSolver::new(&config, n).unwrap();
        let mut noise = Recorded { noises: golden(&goldens, &format!("sa.{n}.noises")).clone(), next: 0 };
        run("sa", n, &mut scheduler, &mut noise);
        assert_eq!(noise.next, n, "one noise draw per step");
    }
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let cases = [
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type"),
        (r#"{"solver_type": "heun"}"#, "solver_type"),
        (r#"{"prediction_type": "v_prediction"}"#, "prediction_type"),
        (r#"{"timestep_spacing": "trailing"}"#, "timestep_spacing"),
        (r#"{"final_sigmas_type": "sigma_min"}"#, "final_sigmas_type"),
        (r#"{"beta_schedule": "scaled_linear"}"#, "beta_schedule"),
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"solver_order": 3}"#, "solver_order"),
        (r#"{"variance_type": "learned_range"}"#, "variance_type"),
    ];
    for (json, field) in cases {
        let config = SchedulerConfig::from_json(json).unwrap();
        let err = DpmSolverMultistep::new(&config, 10).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("supported"), "{json}: {err}");
    }
    let config = SchedulerConfig::from_json(r#"{"use_karras_sigmas": true}"#).unwrap();
    assert!(SaSolver::new(&config, 10).is_err());
    let err = DpmSolverMultistep::new(&SchedulerConfig::default(), 0).unwrap_err().to_string();
    assert!(err.contains("num_inference_steps") && err.contains("1000"), "{err}");
}
