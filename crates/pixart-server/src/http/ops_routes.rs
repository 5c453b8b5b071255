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

/// Liveness, the queue and the counters.
pub async fn health(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let (stats, counters) = probe(async { Ok((state.queue.stats().await?, state.queue.counters().await?)) }).await?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "status": if state.queue.is_closed() { "shutting_down" } else { "ok" },
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
