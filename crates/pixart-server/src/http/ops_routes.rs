//! `GET /health` and `GET /metrics` (Prometheus text format, version 0.0.4).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::deadline::read as probe;
use super::errors::{json_response, ApiError};
use super::prometheus::{Snapshot, CONTENT_TYPE};
use crate::state::AppState;

/// Liveness, the queue and the counters; 503 with `"status": "unhealthy"` and the `problem`
/// while the store cannot record requests (its file deleted, the disk full).
pub async fn health(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let problem = state.queue.problem();
    let queue = probe(async { Ok((state.queue.stats().await?, state.queue.counters().await?)) }).await;
    // An unhealthy store may not answer at all: the problem is what to report then.
    let (stats, counters) = match (queue, &problem) {
        (Ok(queue), _) => queue,
        (Err(_), Some(problem)) => {
            let body = json!({"status": "unhealthy", "problem": problem, "app_id": state.config.app_id});
            return Ok(json_response(StatusCode::SERVICE_UNAVAILABLE, body));
        }
        (Err(e), None) => return Err(e.into()),
    };
    let (code, status) = match (&problem, state.queue.is_closed()) {
        (Some(_), _) => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
        (None, true) => (StatusCode::OK, "shutting_down"),
        (None, false) => (StatusCode::OK, "ok"),
    };
    Ok(json_response(
        code,
        json!({
            "status": status,
            "problem": problem,
            "app_id": state.config.app_id,
            "model": state.model,
            "queue_length": stats.queued,
            "in_progress": stats.running > 0,
            "requests": counters,
            "uptime_seconds": state.started.elapsed().as_secs_f64(),
        }),
    ))
}

/// The queue, the counters and the latency histograms.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let queue = &state.queue;
    let snapshot = probe(async {
        Ok(Snapshot {
            stats: queue.stats().await?,
            counters: queue.counters().await?,
            latencies: queue.latencies().await?,
        })
    })
    .await?;
    let text = snapshot.render().map_err(|e| ApiError::Internal(format!("rendering the metrics: {e}")))?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], text).into_response())
}
