//! `GET /health` and `GET /metrics` (Prometheus text format, version 0.0.4).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::errors::{json_response, ApiError};
use crate::state::AppState;

/// Liveness, the queue and the counters.
pub async fn health(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let stats = state.queue.stats()?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "status": if state.queue.is_closed() { "shutting_down" } else { "ok" },
            "app_id": state.config.app_id,
            "model": state.model,
            "queue_length": stats.queued,
            "in_progress": stats.running > 0,
            "requests": state.queue.counters(),
            "uptime_seconds": state.started.elapsed().as_secs_f64(),
        }),
    ))
}

/// The queue, the counters and the latency histograms.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let stats = state.queue.stats()?;
    let c = state.queue.counters();
    let latencies = state.queue.latencies();
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, value: usize| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    };
    gauge(&mut out, "pixart_queue_length", "Requests waiting in the queue.", stats.queued);
    gauge(&mut out, "pixart_requests_running", "Requests being generated.", stats.running);
    let _ = writeln!(out, "# HELP pixart_requests_total Requests by how they ended (accepted: every submit).");
    let _ = writeln!(out, "# TYPE pixart_requests_total counter");
    for (outcome, value) in
        [("accepted", c.accepted), ("succeeded", c.succeeded), ("failed", c.failed), ("cancelled", c.cancelled)]
    {
        let _ = writeln!(out, "pixart_requests_total{{outcome=\"{outcome}\"}} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP pixart_generations_started_total Generations this process started.\n# TYPE pixart_generations_started_total counter\npixart_generations_started_total {}",
        c.started
    );
    latencies.step.render(&mut out, "pixart_step_duration_seconds", "Duration of one denoising step.");
    latencies.request.render(
        &mut out,
        "pixart_request_duration_seconds",
        "Duration of a generated request from submit to its end, queue wait included.",
    );
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], out)
        .into_response())
}
