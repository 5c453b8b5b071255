//! The worker thread: takes requests from the queue one at a time and runs the pipeline,
//! reporting progress lines to the request's logs and checking its stop flag after every step.
//! It is a plain thread (the generation is blocking compute); it waits on the queue through the
//! runtime's handle only between requests, never inside the step loop.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;

use pixart_fal::GenerateRequest;
use pixart_pipeline::{Generation, Pipeline, PipelineError};

use super::files::FileStore;
use super::image_source::ImageSource;
use super::job::{Failure, FailureKind, LogLine, Outcome, StopReason};
use super::lora_source::LoraSource;
use super::queue::{Queue, WorkItem};

/// What the worker needs besides the pipeline.
#[derive(Debug, Clone)]
pub struct WorkerContext<'a> {
    /// The async runtime the queue's store calls run on.
    pub runtime: tokio::runtime::Handle,
    /// The jobs.
    pub queue: &'a Queue,
    /// Where images are written.
    pub files: &'a FileStore,
    /// The URL path a stored file is served at, from its key and name (the HTTP layer's route).
    pub file_url: fn(&str, &str) -> String,
    /// Where requests' LoRAs are read from.
    pub loras: &'a LoraSource,
    /// Where requests' input pictures are read from.
    pub images: &'a ImageSource,
    /// Whether the job store outlives the process: a job stopped by a shutdown is then given
    /// back to the queue (it runs after the restart) instead of failing.
    pub durable: bool,
}

/// Runs queued jobs until the queue is closed.
pub fn run(pipeline: &Pipeline, context: &WorkerContext<'_>) {
    let queue = context.queue;
    while let Some(item) = context.runtime.block_on(queue.next_work()) {
        if item.attempt > 1 {
            let line = format!("Started again (attempt {}): the server stopped while it was running", item.attempt);
            queue.log(&item, LogLine::new("WARN", line));
        }
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| generate(pipeline, context, &item))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(request_id = %item.id, "generation panicked: {message}");
                Some(Outcome::Failed(Failure::new(FailureKind::Internal, format!("generation failed: {message}"))))
            }
        };
        let recorded = match outcome {
            Some(outcome) => {
                let ok = outcome.failure().is_none();
                let done = context.runtime.block_on(queue.finish(&item, outcome));
                if ok && !matches!(done, Ok(true)) {
                    // Its images are no one's: the request ended failed, or stays unrecorded.
                    context.files.remove_key(&item.id);
                }
                tracing::info!(request_id = %item.id, ok, "request finished");
                done.map(|_| ())
            }
            None => {
                tracing::info!(request_id = %item.id, "request given back to the queue for the next start");
                context.runtime.block_on(queue.release(&item))
            }
        };
        if let Err(e) = recorded {
            tracing::error!(request_id = %item.id, error = %e, "the end of a request could not be recorded");
        }
    }
}

/// The outcome, or `None` when a durable server's shutdown stopped it (it runs again later).
fn generate(pipeline: &Pipeline, context: &WorkerContext<'_>, item: &WorkItem) -> Option<Outcome> {
    let queue = context.queue;
    let request = &item.request;
    queue.log(item, LogLine::new("INFO", describe(request)));
    let params = match prepare(context, item) {
        Ok(params) => params,
        Err(failure) => {
            queue.log(item, LogLine::new("ERROR", failure.message.clone()));
            return Some(Outcome::Failed(failure));
        }
    };
    let result = pipeline.generate_with_progress(&params, |progress| {
        let line = format!(
            "Step {}/{} (timestep {}) {:.0} ms",
            progress.step,
            progress.total,
            progress.timestep,
            progress.duration.as_secs_f64() * 1e3
        );
        queue.log(item, LogLine::new("INFO", line));
        queue.observe_step(progress.duration);
        match queue.stop_reason(item) {
            StopReason::None => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    });
    let failure = match result {
        Ok(generation) => {
            queue.log(item, LogLine::new("INFO", summarize(&generation)));
            return Some(store(context, item, &generation));
        }
        Err(PipelineError::Cancelled) => {
            let reason = item.stop.reason();
            if reason == StopReason::Shutdown && context.durable {
                queue.log(item, LogLine::new("WARN", "The server is restarting: this request will run again"));
                return None;
            }
            Failure::stopped(reason, true)
        }
        Err(e) => match pixart_fal::invalid_fields(&e) {
            Some(fields) => Failure::invalid(&fields),
            None => Failure::new(
                FailureKind::Generation,
                format!("generation failed: {}", pixart_pipeline::error_report(&e)),
            ),
        },
    };
    let level = if failure.kind == FailureKind::Cancelled { "WARN" } else { "ERROR" };
    queue.log(item, LogLine::new(level, failure.message.clone()));
    Some(Outcome::Failed(failure))
}

/// The engine's parameters: the request's LoRAs and input pictures read (each reported in the
/// logs), or the fields that cannot be used.
fn prepare(context: &WorkerContext<'_>, item: &WorkItem) -> Result<pixart_pipeline::GenerationParams, Failure> {
    let (queue, request) = (context.queue, &item.request);
    let base_url = Some(item.base_url.as_str());
    let loras = context.loras.resolve(&request.loras, base_url);
    let pictures = context.images.resolve(request, base_url);
    let (loras, pictures) = match (loras, pictures) {
        (Ok(loras), Ok(pictures)) => (loras, pictures),
        (loras, pictures) => {
            let fields: Vec<_> = [loras.err(), pictures.err()].into_iter().flatten().flatten().collect();
            return Err(Failure::invalid(&fields));
        }
    };
    for (i, used) in loras.iter().enumerate() {
        queue.log(item, LogLine::new("INFO", describe_lora(i, used)));
        let skipped = used.lora.text_encoder_tensors().len();
        if skipped > 0 {
            let line = format!("LoRA {i}: {skipped} text-encoder tensors not applied (the transformer's are)");
            queue.log(item, LogLine::new("WARN", line));
        }
    }
    for (field, picture) in [("image_url", &pictures.image), ("mask_url", &pictures.mask)] {
        if let Some(picture) = picture {
            queue.log(item, LogLine::new("INFO", format!("{field}: {}x{} picture", picture.width, picture.height)));
        }
    }
    let mut params = request.to_params_with_pictures(pictures).map_err(|e| Failure::invalid(&[e]))?;
    params.loras = loras;
    Ok(params)
}

/// Turns the pictures into fal's response: data URIs in sync mode, stored files otherwise.
fn store(context: &WorkerContext<'_>, item: &WorkItem, generation: &Generation) -> Outcome {
    let id = item.id.as_str();
    let inference_time = generation.timings.total.as_secs_f64();
    let content_type = item.request.output_format.content_type();
    let response = pixart_fal::respond(&item.request, generation, |file_name, bytes| {
        let name = context.files.put(id, file_name, content_type, bytes)?;
        Ok((context.file_url)(id, &name))
    });
    match response {
        Ok(response) => Outcome::Succeeded { response, inference_time },
        Err(e) => {
            // Images written before the one that failed are removed with it.
            context.files.remove_key(id);
            let message = pixart_pipeline::error_report(&e);
            context.queue.log(item, LogLine::new("ERROR", message.clone()));
            Outcome::Failed(Failure::new(FailureKind::Storage, message))
        }
    }
}

fn describe(request: &GenerateRequest) -> String {
    let size = match (request.image_size, &request.image_url) {
        (Some(size), _) => size.dimensions().to_string(),
        (None, Some(_)) => "the input picture's size".into(),
        (None, None) => pixart_fal::ImageSize::default().dimensions().to_string(),
    };
    let scheduler = request.scheduler;
    let seed = request.seed.map_or_else(|| "random".into(), |s| s.to_string());
    let mode = match (&request.image_url, &request.mask_url) {
        (Some(_), Some(_)) => format!(", inpainting at strength {}", request.strength),
        (Some(_), None) => format!(", from a picture at strength {}", request.strength),
        _ => String::new(),
    };
    format!(
        "Generating {} image(s) at {size}, {} steps of {scheduler}, guidance {}, seed {seed}{mode}",
        request.num_images, request.num_inference_steps, request.guidance_scale
    )
}

fn describe_lora(i: usize, used: &pixart_pipeline::LoraUse) -> String {
    let lora = &used.lora;
    format!(
        "LoRA {i}: {} layers ({}), scale {}, sha256 {}",
        lora.layer_count(),
        lora.layout(),
        used.scale,
        lora.digest().get(..12).unwrap_or_default()
    )
}

fn summarize(generation: &Generation) -> String {
    let stages = &generation.timings;
    let denoise = stages.denoise().as_secs_f64();
    format!(
        "Done (seed {}): text encoder {:.3} s, denoising {:.3} s, VAE {:.3} s, total {:.3} s",
        generation.seed,
        stages.text_encoder.as_secs_f64(),
        denoise,
        stages.vae.as_secs_f64(),
        stages.total.as_secs_f64()
    )
}
