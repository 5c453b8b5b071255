//! Every HTTP status the API answers, in one place: [`ApiError`] for refusals, and
//! [`outcome_status`] for how a finished job's result is answered.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pixart_fal::FieldError;
use serde_json::{json, Value};

use crate::core::{FailureKind, Outcome, RefusedSubmit, StoreError, SubmitError};

/// A refused call. Its body is fal's `{"detail": …}`.
#[derive(Debug)]
pub enum ApiError {
    /// 400: a malformed call.
    BadRequest(String),
    /// 401: a missing or wrong API key.
    Unauthorized(&'static str),
    /// 404: no such route, app, request or file.
    NotFound(String),
    /// 404 with fal's `{"status": "NOT_FOUND"}` for an unknown request id.
    RequestNotFound(String),
    /// 405: the route exists with other methods.
    MethodNotAllowed(&'static str),
    /// 408: the body stalled.
    BodyStalled(std::time::Duration),
    /// 507: the storage disk has no room for an upload.
    InsufficientStorage(String),
    /// 408: the whole body did not come within `--body-timeout`.
    BodyTooSlow(std::time::Duration),
    /// 503: the bodies being received hold all of `--max-body-memory`.
    BodiesBusy(usize),
    /// 413: the body is over a limit (named by its flag).
    TooLarge {
        /// The limit in bytes.
        limit: usize,
        /// The flag that sets it.
        setting: &'static str,
    },
    /// 415: not JSON.
    NotJson(String),
    /// 422 with fal's validation list: the fields found invalid in a part of the call (`body`,
    /// `query`, `header`).
    Unprocessable {
        /// Where the fields are.
        location: &'static str,
        /// Each invalid field.
        errors: Vec<FieldError>,
    },
    /// 429: the queue is full.
    QueueFull(usize),
    /// 503: shutting down.
    ShuttingDown,
    /// 503: the shared queue cannot be reached for now.
    QueueUnavailable(String),
    /// 500: storage or database failure.
    Internal(String),
}

impl ApiError {
    /// A 422 for one field of the query or headers, e.g. `("query", "fal_webhook", …)`.
    pub fn field(location: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self::Unprocessable { location, errors: vec![FieldError::value(field, message)] }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "job store failed");
        match e {
            StoreError::Unavailable(message) => Self::QueueUnavailable(message),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<RefusedSubmit> for ApiError {
    fn from(e: RefusedSubmit) -> Self {
        match e {
            RefusedSubmit::ShuttingDown => Self::ShuttingDown,
            RefusedSubmit::StoreProblem(problem) => Self::QueueUnavailable(problem),
            RefusedSubmit::Store(SubmitError::QueueFull(n)) => Self::QueueFull(n),
            RefusedSubmit::Store(SubmitError::Store(e)) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({"detail": m})),
            Self::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({"detail": m})),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, json!({"detail": m})),
            Self::RequestNotFound(id) => {
                (StatusCode::NOT_FOUND, json!({"status": "NOT_FOUND", "detail": format!("request {id} not found")}))
            }
            Self::MethodNotAllowed(allowed) => {
                (StatusCode::METHOD_NOT_ALLOWED, json!({"detail": format!("method not allowed here (use {allowed})")}))
            }
            Self::BodyStalled(idle) => (
                StatusCode::REQUEST_TIMEOUT,
                json!({"detail": format!("the request body stalled for {idle:?} (--idle-timeout)")}),
            ),
            Self::InsufficientStorage(m) => (StatusCode::INSUFFICIENT_STORAGE, json!({"detail": m})),
            Self::BodiesBusy(size) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"detail": format!("request bodies being received hold all {size} bytes allowed for them (--max-body-memory); retry")}),
            ),
            Self::BodyTooSlow(total) => (
                StatusCode::REQUEST_TIMEOUT,
                json!({"detail": format!("the request body took longer than {total:?} (--body-timeout)")}),
            ),
            Self::TooLarge { limit, setting } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"detail": format!("request body is larger than {limit} bytes ({setting})")}),
            ),
            Self::NotJson(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({"detail": m})),
            Self::Unprocessable { location, errors } => {
                (StatusCode::UNPROCESSABLE_ENTITY, pixart_fal::validation_body(location, &errors))
            }
            Self::QueueFull(n) => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"detail": format!("the queue is full ({n} requests waiting); retry later")}),
            ),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, json!({"detail": "the server is shutting down"})),
            Self::QueueUnavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"detail": format!("the queue is unavailable for now, retry: {m}")}),
            ),
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"detail": m})),
        };
        json_response(status, body)
    }
}

/// The status a finished job's result is answered with.
pub fn outcome_status(outcome: &Outcome) -> StatusCode {
    match outcome.failure().map(|f| f.kind) {
        None => StatusCode::OK,
        Some(FailureKind::InvalidInput) => StatusCode::UNPROCESSABLE_ENTITY,
        Some(FailureKind::Cancelled) => StatusCode::BAD_REQUEST,
        Some(FailureKind::Shutdown) => StatusCode::SERVICE_UNAVAILABLE,
        Some(FailureKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
        Some(FailureKind::Generation | FailureKind::Storage | FailureKind::Interrupted | FailureKind::Internal) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: Value) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], value.to_string()).into_response()
}
