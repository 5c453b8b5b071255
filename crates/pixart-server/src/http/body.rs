//! Request bodies: the limits the middleware puts on them (size, idle time between chunks) and
//! the two ways handlers read them (JSON into memory, uploads spooled to disk).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::errors::ApiError;
use crate::core::uploads::{SpoolFile, Spooled, UploadError};

/// Why a body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It grew past its limit.
    #[error("request body is larger than {limit} bytes ({setting})")]
    TooLarge {
        /// Bytes allowed.
        limit: usize,
        /// The flag that sets it.
        setting: &'static str,
    },
    /// No chunk came for this long.
    #[error("the request body stalled for {0:?}")]
    Stalled(Duration),
    /// The whole body did not arrive within this long.
    #[error("the request body took longer than {0:?}")]
    TooSlow(Duration),
    /// The bodies being received hold all the memory allowed for them.
    #[error("request bodies in flight hold {0} bytes, all the memory allowed for them")]
    Busy(usize),
}

/// How long a body may take, and the memory it may hold.
#[derive(Debug, Clone)]
pub struct BodyRules {
    /// Longest pause between chunks.
    pub idle: Duration,
    /// Longest the whole body may take (`None`: no bound but the pauses').
    pub total: Option<Duration>,
    /// Bytes every body being received shares (one permit per byte, held until the body is
    /// dropped), with its size; `None`: the body goes to disk, not to memory.
    pub memory: Option<(Arc<Semaphore>, usize)>,
}

/// `body` limited to `limit` bytes, each chunk arriving within `rules.idle` of the last one,
/// all of it within `rules.total`, and held in `rules.memory`.
pub fn limited(body: Body, limit: usize, setting: &'static str, rules: BodyRules) -> Body {
    struct State {
        chunks: axum::body::BodyDataStream,
        seen: usize,
        failed: bool,
        held: Option<OwnedSemaphorePermit>,
    }
    let times = (rules.idle, rules.total);
    let state = State { chunks: body.into_data_stream(), seen: 0, failed: false, held: None };
    let deadline = times.1.map(|total| (tokio::time::Instant::now() + total, total));
    let memory = rules.memory;
    let stream = futures_util::stream::unfold(state, move |mut state| {
        let memory = memory.clone();
        async move {
            if state.failed {
                return None;
            }
            let (wait, late) = match deadline {
                Some((at, total)) if at.saturating_duration_since(tokio::time::Instant::now()) < times.0 => {
                    (at.saturating_duration_since(tokio::time::Instant::now()), BodyError::TooSlow(total))
                }
                _ => (times.0, BodyError::Stalled(times.0)),
            };
            let next = match tokio::time::timeout(wait, state.chunks.next()).await {
                Err(_) => Err(axum::BoxError::from(late)),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(axum::BoxError::from(e)),
                Ok(Some(Ok(chunk))) => {
                    state.seen += chunk.len();
                    if state.seen > limit {
                        Err(axum::BoxError::from(BodyError::TooLarge { limit, setting }))
                    } else {
                        hold(&mut state.held, memory.as_ref(), chunk.len()).map(|()| chunk)
                    }
                }
            };
            state.failed = next.is_err();
            Some((next, state))
        }
    });
    Body::from_stream(stream)
}

/// Takes `len` bytes of the bodies' shared memory into `held` (refused when it is all taken).
fn hold(
    held: &mut Option<OwnedSemaphorePermit>,
    memory: Option<&(Arc<Semaphore>, usize)>,
    len: usize,
) -> Result<(), axum::BoxError> {
    let Some((budget, size)) = memory else { return Ok(()) };
    let busy = || axum::BoxError::from(BodyError::Busy(*size));
    let permit = budget.clone().try_acquire_many_owned(u32::try_from(len).map_err(|_| busy())?).map_err(|_| busy())?;
    match held {
        Some(held) => held.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

/// The [`ApiError`] for a failed body read: the limit it broke, or 400.
fn read_error(error: &axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        match e.downcast_ref::<BodyError>() {
            Some(BodyError::TooLarge { limit, setting }) => return ApiError::TooLarge { limit: *limit, setting },
            Some(BodyError::Stalled(idle)) => return ApiError::BodyStalled(*idle),
            Some(BodyError::TooSlow(total)) => return ApiError::BodyTooSlow(*total),
            Some(BodyError::Busy(size)) => return ApiError::BodiesBusy(*size),
            None => source = e.source(),
        }
    }
    ApiError::BadRequest(format!("the request body could not be read: {error}"))
}

/// Reads a (limited) body into memory.
pub async fn read_all(body: Body) -> Result<Bytes, ApiError> {
    let mut chunks = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = chunks.next().await {
        out.extend_from_slice(&chunk.map_err(|e| read_error(&e))?);
    }
    Ok(Bytes::from(out))
}

/// Writes a (limited) body to a spool file as it arrives; returns the finished file.
pub async fn spool(body: Body, mut file: SpoolFile) -> Result<Spooled, ApiError> {
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        file.write(&chunk.map_err(|e| read_error(&e))?).await.map_err(upload_error)?;
    }
    file.finish().await.map_err(upload_error)
}

/// The answer to an upload problem.
pub fn upload_error(error: UploadError) -> ApiError {
    match error {
        UploadError::Unknown => ApiError::NotFound("unknown or finished upload".into()),
        UploadError::TooLarge(limit) => ApiError::TooLarge { limit, setting: "--max-upload-bytes" },
        UploadError::BadParts(message) => ApiError::BadRequest(message),
        UploadError::Io(message) => ApiError::Internal(message),
    }
}

/// Refuses (415) a body that is not declared as JSON. A cross-site page can send a `text/plain`
/// POST without a CORS preflight; requiring `application/json` (which does need one) keeps such
/// requests out even where CORS is open. A call without a body passes.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let declared = text("content-type");
    let length = text("content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_none() && length == Some(0) {
        return Ok(());
    }
    let essence = declared.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        return Ok(());
    }
    Err(ApiError::NotJson(format!(
        "Content-Type must be application/json, got {}",
        declared.map_or("none".into(), |d| format!("{d:?}"))
    )))
}

/// A JSON object body (empty means `{}`); 422 with fal's detail when it is not JSON.
pub async fn json_object(headers: &HeaderMap, body: Body) -> Result<serde_json::Value, ApiError> {
    require_json(headers)?;
    let bytes = read_all(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        let error = pixart_fal::FieldError::new("", pixart_fal::ErrorKind::JsonInvalid, format!("malformed JSON: {e}"));
        ApiError::Unprocessable { location: "body", errors: vec![error] }
    })
}
