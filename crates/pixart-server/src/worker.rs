//! The worker thread: takes requests from the queue one at a time and runs the pipeline,
//! writing progress lines to the request's logs and checking its stop flag after every step.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use pixart_pipeline::{GenerateRequest, Generation, Pipeline, PipelineError};
use serde_json::json;

use crate::api::validation_outcome;
use crate::jobs::{stopped_outcome, LogLine, Outcome, StopReason, WorkItem};
use crate::server::Server;

/// Runs queued requests until the queue is closed and empty.
pub fn run(pipeline: Pipeline, server: Arc<Server>) {
    while let Some(item) = server.table.next_work(|delivery| server.send_webhook(delivery)) {
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| generate(&pipeline, &server, &item))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(request_id = %item.id, "generation panicked: {message}");
                Outcome::failure(500, "InternalError", json!(format!("generation failed: {message}")), message)
            }
        };
        let status = outcome.status;
        if let Some(delivery) = server.table.finish(&item.id, outcome) {
            server.send_webhook(delivery);
        }
        tracing::info!(request_id = %item.id, status, "request finished");
    }
}

fn generate(pipeline: &Pipeline, server: &Server, item: &WorkItem) -> Outcome {
    let id = item.id.as_str();
    let request = &item.request;
    server.table.log(id, LogLine::new("INFO", describe(request)));
    let result = pipeline.generate_with_progress(request, |progress| {
        let line = format!(
            "Step {}/{} (timestep {}) {:.0} ms",
            progress.step,
            progress.total,
            progress.timestep,
            progress.duration.as_secs_f64() * 1e3
        );
        server.table.log(id, LogLine::new("INFO", line));
        server.table.observe_step(progress.duration);
        match item.stop.reason() {
            StopReason::None => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    });
    match result {
        Ok(generation) => {
            server.table.log(id, LogLine::new("INFO", summarize(&generation)));
            store(server, id, generation)
        }
        Err(PipelineError::Cancelled) => {
            let reason = item.stop.reason();
            let outcome = stopped_outcome(reason, true);
            server.table.log(id, LogLine::new("WARN", outcome.error.clone().unwrap_or_default()));
            outcome
        }
        Err(PipelineError::Invalid(errors)) => validation_outcome(&errors),
        Err(e) => {
            let message = format!("generation failed: {}", pixart_pipeline::error_report(&e));
            server.table.log(id, LogLine::new("ERROR", message.clone()));
            Outcome::failure(500, "GenerationError", json!(message), message)
        }
    }
}

/// Turns the pictures into fal's response: data URIs in sync mode, stored files otherwise.
fn store(server: &Server, id: &str, generation: Generation) -> Outcome {
    let inference = generation.inference_seconds;
    let response = generation.into_response(|file_name, png| Ok(server.files.put(id, file_name, "image/png", png)?));
    match response {
        Ok(response) => Outcome::output(response, inference),
        Err(e) => {
            let message = pixart_pipeline::error_report(&e);
            server.table.log(id, LogLine::new("ERROR", message.clone()));
            Outcome::failure(500, "StorageError", json!(message), message)
        }
    }
}

fn describe(request: &GenerateRequest) -> String {
    let size = request.image_size.dimensions();
    let scheduler = request.scheduler;
    let seed = request.seed.map_or_else(|| "random".into(), |s| s.to_string());
    format!(
        "Generating {} image(s) at {size}, {} steps of {scheduler}, guidance {}, seed {seed}",
        request.num_images, request.num_inference_steps, request.guidance_scale
    )
}

fn summarize(generation: &Generation) -> String {
    let stages = &generation.stages;
    let denoise: f64 = stages.steps.iter().map(|d| d.as_secs_f64()).sum();
    format!(
        "Done (seed {}): text encoder {:.3} s, denoising {:.3} s, VAE {:.3} s, total {:.3} s",
        generation.seed,
        stages.text_encoder.as_secs_f64(),
        denoise,
        stages.vae.as_secs_f64(),
        stages.total.as_secs_f64()
    )
}
