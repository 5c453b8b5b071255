//! Tower middleware in front of the routes: `x-fal-target-url` routing (the JS client's
//! `proxyUrl` mode), API-key authentication and request body limits.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::body::{limited, BodyRules};
use super::errors::ApiError;
use crate::state::AppState;

/// Routes a call carrying `x-fal-target-url` by that URL: queue.fal.run → `/`, fal.run →
/// `/run/`, rest.fal.ai → `/rest/`, v3.fal.media → `/cdn/`; any other host by its path as is.
pub async fn route_by_target_url(mut request: Request, next: Next) -> Response {
    if let Some(target) = request.headers().get("x-fal-target-url") {
        match proxy_target(target) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(message) => return ApiError::BadRequest(message).into_response(),
        }
    }
    next.run(request).await
}

fn proxy_target(target: &HeaderValue) -> Result<Uri, String> {
    let text = target.to_str().map_err(|_| "x-fal-target-url is not valid text".to_string())?;
    let url = url::Url::parse(text).map_err(|e| format!("x-fal-target-url {text:?}: {e}"))?;
    let prefix = match url.host_str().unwrap_or_default() {
        "queue.fal.run" => "",
        "fal.run" => "/run",
        "rest.fal.ai" | "rest.alpha.fal.ai" => "/rest",
        "v3.fal.media" | "v3b.fal.media" => "/cdn",
        _ => "",
    };
    let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{prefix}{}{query}", url.path()).parse().map_err(|e| format!("x-fal-target-url {text:?}: {e}"))
}

/// With an API key configured, every API call needs `Authorization: Key <key>` (or `Bearer`);
/// file downloads, upload targets (their ids are the capability), `/health` and the playground's
/// page (`/`, `/playground/…`) do not. CDN
/// uploads also accept a token from `/rest/storage/auth/token`.
pub async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else { return next.run(request).await };
    let first = request.uri().path().split('/').find(|s| !s.is_empty()).unwrap_or("");
    // The playground's page and assets are public; the calls it makes carry the key.
    if matches!(first, "files" | "uploads" | "health" | "playground" | "") {
        return next.run(request).await;
    }
    let given = request.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, value) = v.split_once(' ')?;
        matches!(scheme.to_ascii_lowercase().as_str(), "key" | "bearer").then(|| value.trim())
    });
    let allowed = match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(key.as_bytes())) => true,
        Some(given) if first == "cdn" => {
            let (tokens, given) = (state.cdn_tokens.clone(), given.to_string());
            crate::state::blocking(move || tokens.is_valid(&given)).await.unwrap_or(false)
        }
        _ => false,
    };
    if allowed {
        return next.run(request).await;
    }
    let message = if given.is_some() { "invalid API key" } else { "missing API key: send 'Authorization: Key <key>'" };
    ApiError::Unauthorized(message).into_response()
}

/// Limits every request body: uploads to `--max-upload-bytes`, everything else to
/// `--max-request-bytes` (413 at once when `Content-Length` says so, else when the stream
/// passes it), and a body pausing `--idle-timeout` between chunks fails with 408.
///
/// Kept rather than tower-http's `RequestBodyLimitLayer` + `TimeoutLayer`: those answer 413
/// with a plain-text body (fal's clients expect `{"detail"}` naming the flag), and a whole-request
/// timeout would cut a long `/run` or a status stream, where only a stalled body must be cut.
pub async fn limit_body(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let upload = path.starts_with("/uploads/")
        || path.starts_with("/cdn/files/upload")
        || (path.starts_with("/files/") && path.contains("/multipart/"));
    let (limit, setting) = if upload {
        (state.config.max_upload_bytes, "--max-upload-bytes")
    } else {
        (state.config.max_request_bytes, "--max-request-bytes")
    };
    let declared = request.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return ApiError::TooLarge { limit, setting }.into_response();
    }
    if upload {
        // An upload is spooled to the storage disk: refused (507) where it would eat the room
        // kept for the job store.
        let (files, bytes) = (state.files.clone(), declared.unwrap_or(0) as u64);
        if let Ok(Err(full)) = crate::state::blocking(move || files.ensure_room(bytes)).await {
            return ApiError::InsufficientStorage(full.to_string()).into_response();
        }
    }
    // An API body is read into memory: it must all come within --body-timeout, and all bodies
    // being received share --max-body-memory. An upload is spooled to disk as it comes: only its
    // pauses are bounded.
    let rules = BodyRules {
        idle: state.config.idle_timeout,
        total: (!upload).then_some(state.config.body_timeout),
        memory: (!upload).then(|| (state.body_memory.clone(), state.config.max_body_memory)),
    };
    let request = request.map(|body| limited(body, limit, setting, rules));
    next.run(request).await
}
