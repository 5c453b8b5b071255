//! The queue API: submit, status (and its event stream), result, cancel, and `/run/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use pixart_fal::{ErrorKind, FieldError, GenerateRequest};
use serde_json::{json, Value};

use super::body::{read_all, require_json};
use super::errors::{json_response, outcome_status, ApiError};
use super::request_info::{check_app, query_param, BaseUrl};
use crate::core::fal_format::{error_type, log_line, result_body};
use crate::core::{CancelResult, Failure, JobKind, JobState, JobView, NewJob, Outcome, Priority};
use crate::state::AppState;

/// Builds a job from a submit or run call (webhook, priority, start timeout) and parses its
/// input (invalid input becomes the job's failure). Header and query problems answer 422 at once.
async fn new_job(
    state: &AppState,
    app: &str,
    kind: JobKind,
    base: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<NewJob, ApiError> {
    require_json(headers)?;
    let body = read_all(body).await?;
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        GenerateRequest::from_value(&json!({}))
    } else {
        std::str::from_utf8(&body)
            .map_err(|_| vec![FieldError::new("", ErrorKind::JsonInvalid, "body is not UTF-8")])
            .and_then(GenerateRequest::from_json)
    };
    let mut job = NewJob::new(kind, app, base, parsed.map_err(|errors| Failure::invalid(&errors)));
    if let Some(hook) = query_param(query, "fal_webhook") {
        let allow_private = state.config.allow_private_webhooks;
        url::Url::parse(&hook)
            .map_err(|_| format!("must be an http(s) URL, got {hook:?}"))
            .and_then(|url| crate::core::webhook_target::check_url(&url, allow_private))
            .map_err(|message| ApiError::field("query", "fal_webhook", message))?;
        job.webhook = Some(hook);
    }
    queue_headers(&mut job, headers)?;
    Ok(job)
}

/// The queue's headers of a call: `x-fal-queue-priority` (`normal`, `low`) and
/// `x-fal-request-timeout` (seconds to start within); 422 naming the header when one is invalid.
pub(super) fn queue_headers(job: &mut NewJob, headers: &HeaderMap) -> Result<(), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match header("x-fal-queue-priority").map(str::to_ascii_lowercase).as_deref() {
        None | Some("normal") => {}
        Some("low") => job.priority = Priority::Low,
        Some(other) => {
            return Err(ApiError::field(
                "header",
                "x-fal-queue-priority",
                format!("must be normal or low, got {other:?}"),
            ))
        }
    }
    if let Some(timeout) = header("x-fal-request-timeout") {
        match timeout.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
                job.start_deadline = Some(SystemTime::now() + Duration::from_secs_f64(secs))
            }
            _ => {
                return Err(ApiError::field(
                    "header",
                    "x-fal-request-timeout",
                    format!("must be a positive number of seconds, got {timeout:?}"),
                ))
            }
        }
    }
    Ok(())
}

fn request_urls(base: &str, app: &str, id: &str) -> (String, String, String) {
    let response_url = format!("{base}/{app}/requests/{id}");
    (format!("{response_url}/status"), format!("{response_url}/cancel"), response_url)
}

fn set_request_id(response: &mut Response, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-fal-request-id", value);
    }
}

/// `POST /{owner}/{alias}[?fal_webhook=URL]`.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Path((owner, alias)): Path<(String, String)>,
    BaseUrl(base): BaseUrl,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let app = check_app(&state, &owner, &alias)?;
    let job = new_job(&state, app, JobKind::Queued, &base, query.as_deref(), &headers, body).await?;
    let id = job.id.clone();
    let position = state.queue.submit(job).await?;
    tracing::info!(request_id = %id, ?position, "request queued");
    let (status_url, cancel_url, response_url) = request_urls(&base, app, &id);
    let mut response = json_response(
        StatusCode::OK,
        json!({
            "status": "IN_QUEUE",
            "request_id": id,
            "gateway_request_id": id,
            "response_url": response_url,
            "status_url": status_url,
            "cancel_url": cancel_url,
            "queue_position": position.unwrap_or(0),
        }),
    );
    set_request_id(&mut response, &id);
    Ok(response)
}

/// A job of the queue API (`/run/` jobs are answered on their own connection only).
async fn queued_view(state: &AppState, id: &str, logs_from: usize) -> Result<JobView, ApiError> {
    match super::deadline::read(state.queue.view(id, logs_from)).await? {
        Some(view) if view.kind == JobKind::Queued => Ok(view),
        _ => Err(ApiError::RequestNotFound(id.to_string())),
    }
}

fn logs_param(query: Option<&str>) -> bool {
    query_param(query, "logs").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// fal's status body of a job (its logs only when asked).
fn status_body(view: &JobView, base: &str, logs: bool) -> (StatusCode, Value) {
    let (status_url, cancel_url, response_url) = request_urls(base, &view.app, &view.id);
    let mut map = serde_json::Map::new();
    map.insert("request_id".into(), view.id.clone().into());
    map.insert("response_url".into(), response_url.into());
    map.insert("status_url".into(), status_url.into());
    map.insert("cancel_url".into(), cancel_url.into());
    let log_lines = || -> Value {
        if logs {
            Value::Array(view.logs.iter().map(log_line).collect())
        } else {
            Value::Array(Vec::new())
        }
    };
    let code = match &view.state {
        JobState::Queued { position } => {
            map.insert("status".into(), "IN_QUEUE".into());
            map.insert("queue_position".into(), (*position).into());
            StatusCode::ACCEPTED
        }
        JobState::Running => {
            map.insert("status".into(), "IN_PROGRESS".into());
            map.insert("logs".into(), log_lines());
            StatusCode::ACCEPTED
        }
        JobState::Completed(outcome) => {
            map.insert("status".into(), "COMPLETED".into());
            map.insert("logs".into(), log_lines());
            let inference_time = match outcome {
                Outcome::Succeeded { inference_time, .. } => Some(*inference_time),
                Outcome::Failed(_) => None,
            };
            map.insert("metrics".into(), json!({"inference_time": inference_time}));
            if let Some(failure) = outcome.failure() {
                map.insert("error".into(), failure.message.clone().into());
                map.insert("error_type".into(), error_type(failure.kind).into());
            }
            StatusCode::OK
        }
    };
    (code, Value::Object(map))
}

/// `GET …/requests/{id}/status[?logs=1]`.
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path((owner, alias, id)): Path<(String, String, String)>,
    BaseUrl(base): BaseUrl,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_app(&state, &owner, &alias)?;
    let view = queued_view(&state, &id, 0).await?;
    let (code, body) = status_body(&view, &base, logs_param(query.as_deref()));
    Ok(json_response(code, body))
}

/// The result response of a finished job.
pub(super) fn outcome_response(outcome: &Outcome, base: &str, id: &str) -> Response {
    let mut response = json_response(outcome_status(outcome), result_body(outcome, base));
    set_request_id(&mut response, id);
    if let Some(failure) = outcome.failure() {
        if failure.kind == crate::core::FailureKind::Timeout {
            response.headers_mut().insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
        }
        response.headers_mut().insert("x-fal-error-type", HeaderValue::from_static(error_type(failure.kind)));
    }
    response
}

/// `GET …/requests/{id}`: the output, or the error it ended with.
pub async fn result(
    State(state): State<Arc<AppState>>,
    Path((owner, alias, id)): Path<(String, String, String)>,
    BaseUrl(base): BaseUrl,
) -> Result<Response, ApiError> {
    check_app(&state, &owner, &alias)?;
    match queued_view(&state, &id, usize::MAX).await?.state {
        JobState::Completed(outcome) => Ok(outcome_response(&outcome, &base, &id)),
        _ => Err(ApiError::BadRequest("Request is still in progress".into())),
    }
}

/// `PUT …/requests/{id}/cancel`.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path((owner, alias, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_app(&state, &owner, &alias)?;
    queued_view(&state, &id, usize::MAX).await?;
    Ok(match state.queue.cancel(&id).await? {
        CancelResult::NotFound => return Err(ApiError::RequestNotFound(id)),
        CancelResult::AlreadyCompleted => {
            json_response(StatusCode::BAD_REQUEST, json!({"status": "ALREADY_COMPLETED"}))
        }
        CancelResult::Dequeued(_) | CancelResult::StopRequested => {
            tracing::info!(request_id = %id, "cancellation requested");
            json_response(StatusCode::ACCEPTED, json!({"status": "CANCELLATION_REQUESTED"}))
        }
    })
}

/// `GET …/requests/{id}/status/stream`: server-sent events, one status per change (new logs
/// only), closed after `COMPLETED`.
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Path((owner, alias, id)): Path<(String, String, String)>,
    BaseUrl(base): BaseUrl,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_app(&state, &owner, &alias)?;
    queued_view(&state, &id, usize::MAX).await?;
    struct Cursor {
        state: Arc<AppState>,
        id: String,
        base: String,
        logs: bool,
        changes: tokio::sync::watch::Receiver<u64>,
        sent_logs: usize,
        last: Option<Value>,
        done: bool,
    }
    let cursor = Cursor {
        changes: state.queue.subscribe(),
        state,
        id,
        logs: logs_param(query.as_deref()),
        base,
        sent_logs: 0,
        last: None,
        done: false,
    };
    let events = futures_util::stream::unfold(cursor, |mut cursor| async move {
        if cursor.done {
            return None;
        }
        loop {
            let view = cursor.state.queue.view(&cursor.id, cursor.sent_logs).await.ok()??;
            let completed = matches!(view.state, JobState::Completed(_));
            let (_, body) = status_body(&view, &cursor.base, cursor.logs);
            let mut key = body.clone();
            if let Some(map) = key.as_object_mut() {
                map.remove("logs");
            }
            let new_logs = cursor.logs && view.log_count > cursor.sent_logs;
            if completed || new_logs || cursor.last.as_ref() != Some(&key) {
                cursor.sent_logs = view.log_count;
                cursor.last = Some(key);
                cursor.done = completed;
                return Some((Ok::<Event, Infallible>(Event::default().data(body.to_string())), cursor));
            }
            // Changes made by other processes sharing the store wake no channel here: look
            // again at least every second.
            let _ = tokio::time::timeout(Duration::from_secs(1), cursor.changes.changed()).await;
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// Once a `/run/` call ends (answered, or its caller gone): a finished job is forgotten, an
/// unfinished one cancelled (its worker ends it at its next step; the record, which no API call
/// can reach, goes with the retention sweep). Dropping it never blocks: the store calls run as a
/// task of their own.
struct ForgetRun {
    queue: Arc<crate::core::Queue>,
    id: String,
}

impl Drop for ForgetRun {
    fn drop(&mut self) {
        let (queue, id) = (self.queue.clone(), std::mem::take(&mut self.id));
        tokio::spawn(async move {
            let ended = queue
                .view(&id, usize::MAX)
                .await
                .ok()
                .flatten()
                .is_some_and(|v| matches!(v.state, JobState::Completed(_)));
            if !ended {
                tracing::info!(request_id = %id, "run caller went away: cancelling");
                let _ = queue.cancel(&id).await;
            } else if let Err(e) = queue.forget(&id).await {
                tracing::warn!(request_id = %id, error = %e, "a finished run was not forgotten");
            }
        });
    }
}

/// `POST /run/{owner}/{alias}`: queues the request like any other and answers on this
/// connection. If the caller goes away first, the request is cancelled (and its record left to
/// the retention sweep); once answered it is forgotten.
pub async fn run(
    State(state): State<Arc<AppState>>,
    Path((owner, alias)): Path<(String, String)>,
    BaseUrl(base): BaseUrl,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let app = check_app(&state, &owner, &alias)?;
    let job = new_job(&state, app, JobKind::Run, &base, query.as_deref(), &headers, body).await?;
    let id = job.id.clone();
    let outcome = run_to_end(&state, job).await?;
    Ok(outcome_response(&outcome, &base, &id))
}

/// Queues a run job and waits for its end on this call (invalid input ends at once). If the
/// caller goes away first, the job is cancelled; once it ended, it is forgotten.
pub(super) async fn run_to_end(state: &AppState, job: NewJob) -> Result<Outcome, ApiError> {
    let id = job.id.clone();
    if let Err(failure) = &job.input {
        return Ok(Outcome::Failed(failure.clone()));
    }
    let mut changes = state.queue.subscribe();
    state.queue.submit(job).await?;
    let _forget = ForgetRun { queue: state.queue.clone(), id: id.clone() };
    loop {
        if let Some(view) = state.queue.view(&id, usize::MAX).await? {
            if let JobState::Completed(outcome) = view.state {
                return Ok(outcome);
            }
        }
        if tokio::time::timeout(Duration::from_secs(1), changes.changed()).await.is_ok_and(|r| r.is_err()) {
            return Err(ApiError::ShuttingDown);
        }
    }
}
