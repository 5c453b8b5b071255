//! HTTP: one dispatcher for the queue API (root), `/run/`, `/rest/` storage, `/cdn/` uploads,
//! upload targets and `/files/`, reached directly or through `x-fal-target-url` (the JS
//! client's `proxyUrl` mode).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Router;
use pixart_pipeline::{FieldError, GenerateRequest};
use serde_json::{json, Value};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::jobs::{CancelResult, Job, JobKind, JobState, Jobs, Outcome, StopReason, SubmitError};
use crate::server::Server;
use crate::storage;

/// The server's routes. CORS is off unless [`crate::ServerConfig::cors_origins`] names origins
/// (or `*`): then preflights from them are answered, the request's headers allowed and
/// `x-fal-request-id` exposed.
pub fn router(server: Arc<Server>) -> Router {
    let origins = server.config.cors_origins.clone();
    let router = Router::new().fallback(dispatch).with_state(server);
    if origins.is_empty() {
        return router;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let cors = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([header::HeaderName::from_static("x-fal-request-id")])
        .max_age(Duration::from_secs(3600));
    router.layer(cors)
}

/// One call, after routing: what the handlers need.
pub struct Call {
    /// Shared state.
    pub server: Arc<Server>,
    /// The HTTP method.
    pub method: Method,
    /// Request headers.
    pub headers: HeaderMap,
    /// `scheme://host[:port]` the request came in on.
    pub base: String,
    /// The query string (from the target URL in proxy mode).
    pub query: Option<String>,
    /// The body, not read yet.
    pub body: Body,
}

impl Call {
    /// A query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Refuses (415) a body that is not declared as JSON. A cross-site page can send a
    /// `text/plain` POST without a CORS preflight; requiring `application/json` (which does need
    /// one) keeps such requests out even where CORS is open. A call without a body passes.
    pub fn require_json(&self) -> Result<(), Response> {
        let declared = self.header("content-type");
        let length = self.header("content-length").and_then(|v| v.parse::<u64>().ok());
        if declared.is_none() && length == Some(0) {
            return Ok(());
        }
        let essence = declared.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
            return Ok(());
        }
        Err(detail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type must be application/json, got {}",
                declared.map_or("none".into(), |d| format!("{d:?}"))
            ),
        ))
    }

    /// Reads the body, refusing more than `limit` bytes with 413, and a body that stalls for
    /// `--idle-timeout` between chunks with 408 (the connection then closes).
    pub async fn read_body(&mut self, limit: usize, setting: &str) -> Result<Bytes, Response> {
        use futures_util::StreamExt;
        let too_large =
            || detail(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {limit} bytes ({setting})"));
        let declared = self.header("content-length").and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let idle = self.server.config.idle_timeout;
        let mut chunks = std::mem::take(&mut self.body).into_data_stream();
        let mut body = Vec::with_capacity(declared.unwrap_or(0));
        loop {
            match tokio::time::timeout(idle, chunks.next()).await {
                Err(_) => {
                    return Err(detail(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("the request body stalled for {idle:?} (--idle-timeout)"),
                    ))
                }
                Ok(None) => return Ok(Bytes::from(body)),
                Ok(Some(Ok(chunk))) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Some(Err(e))) => {
                    return Err(detail(StatusCode::BAD_REQUEST, format!("the request body could not be read: {e}")))
                }
            }
        }
    }
}

async fn dispatch(State(server): State<Arc<Server>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let base = base_url(&parts.headers, &server);
    let (path, query) = match parts.headers.get("x-fal-target-url") {
        Some(target) => match proxy_target(target) {
            Ok(routed) => routed,
            Err(message) => return detail(StatusCode::BAD_REQUEST, message),
        },
        None => (parts.uri.path().to_string(), parts.uri.query().map(str::to_string)),
    };
    let call = Call { server, method: parts.method, headers: parts.headers, base, query, body };
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    if let Some(response) = check_auth(&call, &segments) {
        return response;
    }
    route(call, &segments).await
}

async fn route(call: Call, segments: &[&str]) -> Response {
    let method = call.method.clone();
    let server = call.server.clone();
    match (segments, &method) {
        (["health"], &Method::GET) => health(&call),
        (["metrics"], &Method::GET) => metrics(&call),
        (["files", key, name], &Method::GET | &Method::HEAD) => storage::serve_file(call, key, name).await,
        (["files", key, name, "multipart", upload, part], _) => {
            storage::cdn_multipart(call, key, name, upload, part).await
        }
        (["uploads", upload], &Method::PUT) => storage::put_upload(call, upload).await,
        (["uploads", upload, part], _) => storage::upload_part_or_complete(call, upload, part).await,
        (["rest", "storage", "upload", "initiate" | "initiate-multipart"], &Method::POST) => {
            storage::initiate(call).await
        }
        (["rest", "storage", "auth", "token"], &Method::POST) => storage::cdn_token(&call),
        (["cdn", "files", "upload"], &Method::POST) => storage::cdn_upload(call).await,
        (["cdn", "files", "upload", "multipart"], &Method::POST) => storage::cdn_multipart_begin(call).await,
        (["health" | "metrics" | "files" | "uploads" | "rest" | "cdn", ..], _) => no_route(segments),
        (["run", app @ ..], _) => match split_app(&server, app) {
            Ok((app, [])) if method == Method::POST => run(call, app).await,
            Ok((_, [])) => method_not_allowed("POST"),
            Ok(_) => detail(StatusCode::NOT_FOUND, "this app has no endpoint at that path"),
            Err(response) => response,
        },
        _ => match split_app(&server, segments) {
            Ok((app, [])) if method == Method::POST => submit(call, app).await,
            Ok((_, ["requests", id])) if method == Method::GET => result(&call, id),
            Ok((_, ["requests", id, "status"])) if method == Method::GET => status(&call, id),
            Ok((_, ["requests", id, "status", "stream"])) if method == Method::GET => stream(call, id),
            Ok((_, ["requests", id, "cancel"])) if method == Method::PUT => cancel(&call, id),
            Ok((_, [])) => method_not_allowed("POST"),
            Ok((_, ["requests", _, ..])) => method_not_allowed("GET or PUT"),
            Ok(_) => detail(StatusCode::NOT_FOUND, "this app has no endpoint at that path"),
            Err(response) => response,
        },
    }
}

/// Splits `[ns/]owner/alias[/subpath]` into the served app id and the rest, or answers 404.
fn split_app<'a>(server: &'a Server, segments: &'a [&'a str]) -> Result<(&'a str, &'a [&'a str]), Response> {
    let app = server.config.app_id.as_str();
    let n = if matches!(segments.first(), Some(&"workflows" | &"comfy")) { 3 } else { 2 };
    if n == 2 && segments.len() >= 2 && app.split('/').eq(segments[..2].iter().copied()) {
        return Ok((app, &segments[2..]));
    }
    let asked = segments.iter().take(n).copied().collect::<Vec<_>>().join("/");
    if asked.is_empty() {
        return Err(detail(StatusCode::NOT_FOUND, format!("this server runs {app}: POST /{app}")));
    }
    Err(detail(StatusCode::NOT_FOUND, format!("application '{asked}' not found (this server runs '{app}')")))
}

fn no_route(segments: &[&str]) -> Response {
    detail(StatusCode::NOT_FOUND, format!("no route for /{}", segments.join("/")))
}

fn method_not_allowed(allowed: &str) -> Response {
    detail(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed here (use {allowed})"))
}

/// `{"detail": message}` with a status.
pub fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    json_response(status, json!({"detail": message.into()}))
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: Value) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], value.to_string()).into_response()
}

/// `scheme://host` of the request: `x-forwarded-proto`/`x-forwarded-host` when a proxy set
/// them, the Host header, else the listening address.
fn base_url(headers: &HeaderMap, server: &Server) -> String {
    let get =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or(v).trim());
    let scheme = get("x-forwarded-proto").filter(|s| matches!(*s, "http" | "https")).unwrap_or("http");
    let host = get("x-forwarded-host")
        .or_else(|| get("host"))
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c)))
        .map(str::to_string)
        .unwrap_or_else(|| server.local_addr.to_string());
    format!("{scheme}://{host}")
}

/// Routes a proxied call by its `x-fal-target-url`: queue.fal.run → `/`, fal.run → `/run/`,
/// rest.fal.ai → `/rest/`, v3.fal.media → `/cdn/`; any other host by its path as is.
fn proxy_target(target: &HeaderValue) -> Result<(String, Option<String>), String> {
    let text = target.to_str().map_err(|_| "x-fal-target-url is not valid text".to_string())?;
    let url = url::Url::parse(text).map_err(|e| format!("x-fal-target-url {text:?}: {e}"))?;
    let prefix = match url.host_str().unwrap_or_default() {
        "queue.fal.run" => "",
        "fal.run" => "/run",
        "rest.fal.ai" | "rest.alpha.fal.ai" => "/rest",
        "v3.fal.media" | "v3b.fal.media" => "/cdn",
        _ => "",
    };
    Ok((format!("{prefix}{}", url.path()), url.query().map(str::to_string)))
}

fn percent_decode(segment: &str) -> String {
    let bytes: Vec<u8> = form_urlencoded::parse(format!("x={}", segment.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_else(|_| segment.to_string())
}

/// With an API key configured, every API call needs `Authorization: Key <key>` (or `Bearer`);
/// file downloads, upload targets (their ids are the capability) and `/health` do not. CDN
/// uploads also accept a token from `/rest/storage/auth/token`.
fn check_auth(call: &Call, segments: &[&str]) -> Option<Response> {
    let key = call.server.config.api_key.as_deref()?;
    if matches!(segments.first(), Some(&"files" | &"uploads" | &"health")) {
        return None;
    }
    let given = call.header("authorization").and_then(|v| {
        let (scheme, value) = v.split_once(' ')?;
        matches!(scheme.to_ascii_lowercase().as_str(), "key" | "bearer").then(|| value.trim())
    });
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return None;
    }
    if segments.first() == Some(&"cdn") && given.is_some_and(|g| storage::cdn_token_valid(&call.server, g)) {
        return None;
    }
    let message = if given.is_some() { "invalid API key" } else { "missing API key: send 'Authorization: Key <key>'" };
    Some(detail(StatusCode::UNAUTHORIZED, message))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /metrics`: Prometheus' text format.
fn metrics(call: &Call) -> Response {
    let text = crate::metrics::render(&call.server.table.lock());
    (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], text)
        .into_response()
}

fn health(call: &Call) -> Response {
    let jobs = call.server.table.lock();
    json_response(
        StatusCode::OK,
        json!({
            "status": if jobs.closed { "shutting_down" } else { "ok" },
            "app_id": call.server.config.app_id,
            "model": call.server.model,
            "queue_length": jobs.queue.len(),
            "in_progress": jobs.running.is_some(),
            "requests": jobs.counters,
            "uptime_seconds": call.server.started.elapsed().as_secs_f64(),
        }),
    )
}

/// fal's 422 for invalid input: `{"detail": [{"loc": ["body", …], "msg", "type"}]}`.
pub fn validation_outcome(errors: &[FieldError]) -> Outcome {
    let detail: Vec<Value> = errors
        .iter()
        .map(|e| {
            let mut loc = vec![Value::from("body")];
            loc.extend(e.field.split('.').filter(|s| !s.is_empty()).map(Value::from));
            let kind = match e.kind {
                "missing" => "value_error.missing",
                "extra_forbidden" => "value_error.extra",
                "json_invalid" => "value_error.jsondecode",
                other => other,
            };
            json!({"loc": loc, "msg": e.message, "type": kind})
        })
        .collect();
    let summary = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    Outcome::with_body(422, "ValidationError", json!({"detail": detail}), summary)
}

/// Builds a job from a submit or run call (webhook, priority, start timeout) and parses its
/// input: the request, or the 422 outcome of invalid input. Header and query problems answer 422
/// at once.
async fn new_job(
    call: &mut Call,
    app: &str,
    kind: JobKind,
) -> Result<(Job, Result<GenerateRequest, Outcome>), Response> {
    call.require_json()?;
    let limit = call.server.config.max_request_bytes;
    let body = call.read_body(limit, "--max-request-bytes").await?;
    let mut job = Job::new(kind, app.to_string(), call.base.clone());
    let query_error = |loc: [&str; 2], msg: String| {
        json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}),
        )
    };
    if let Some(hook) = call.param("fal_webhook") {
        let allow_private = call.server.config.allow_private_webhooks;
        let checked = url::Url::parse(&hook)
            .map_err(|_| format!("must be an http(s) URL, got {hook:?}"))
            .and_then(|url| crate::webhook_target::check_url(&url, allow_private));
        match checked {
            Ok(()) => job.webhook = Some(hook),
            Err(message) => return Err(query_error(["query", "fal_webhook"], message)),
        }
    }
    match call.header("x-fal-queue-priority").map(str::to_ascii_lowercase).as_deref() {
        None | Some("normal") => {}
        Some("low") => job.low_priority = true,
        Some(other) => {
            return Err(query_error(
                ["header", "x-fal-queue-priority"],
                format!("must be normal or low, got {other:?}"),
            ))
        }
    }
    if let Some(timeout) = call.header("x-fal-request-timeout") {
        match timeout.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
                job.start_deadline = Some(Instant::now() + Duration::from_secs_f64(secs))
            }
            _ => {
                return Err(query_error(
                    ["header", "x-fal-request-timeout"],
                    format!("must be a positive number of seconds, got {timeout:?}"),
                ))
            }
        }
    }
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        GenerateRequest::from_value(&json!({}))
    } else {
        std::str::from_utf8(&body)
            .map_err(|_| vec![FieldError::new("", "json_invalid", "body is not UTF-8")])
            .and_then(GenerateRequest::from_json)
    };
    Ok((job, parsed.map_err(|errors| validation_outcome(&errors))))
}

fn submit_error(error: SubmitError) -> Response {
    match error {
        SubmitError::QueueFull(n) => {
            detail(StatusCode::TOO_MANY_REQUESTS, format!("the queue is full ({n} requests waiting); retry later"))
        }
        SubmitError::ShuttingDown => detail(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
    }
}

fn request_urls(base: &str, app: &str, id: &str) -> (String, String, String) {
    let response_url = format!("{base}/{app}/requests/{id}");
    (format!("{response_url}/status"), format!("{response_url}/cancel"), response_url)
}

async fn submit(mut call: Call, app: &str) -> Response {
    let (job, input) = match new_job(&mut call, app, JobKind::Queued).await {
        Ok(built) => built,
        Err(response) => return response,
    };
    let submitted = match call.server.table.submit(job, input) {
        Ok(submitted) => submitted,
        Err(e) => return submit_error(e),
    };
    if let Some(delivery) = submitted.delivery {
        call.server.send_webhook(delivery);
    }
    let id = submitted.id;
    tracing::info!(request_id = %id, position = ?submitted.position, "request queued");
    let (status_url, cancel_url, response_url) = request_urls(&call.base, app, &id);
    let mut response = json_response(
        StatusCode::OK,
        json!({
            "status": "IN_QUEUE",
            "request_id": id,
            "gateway_request_id": id,
            "response_url": response_url,
            "status_url": status_url,
            "cancel_url": cancel_url,
            "queue_position": submitted.position.unwrap_or(0),
        }),
    );
    set_request_id(&mut response, &id);
    response
}

fn set_request_id(response: &mut Response, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-fal-request-id", value);
    }
}

fn logs_param(call: &Call) -> bool {
    call.param("logs").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// A request of the queue API (`/run/` requests are answered on their own connection only).
fn queued_job<'a>(jobs: &'a Jobs, id: &str) -> Option<&'a Job> {
    jobs.jobs.get(id).filter(|j| j.kind == JobKind::Queued)
}

fn not_found(id: &str) -> Response {
    json_response(StatusCode::NOT_FOUND, json!({"status": "NOT_FOUND", "detail": format!("request {id} not found")}))
}

/// The status body of a job; `since` is the first log line to include.
fn status_body(jobs: &Jobs, job: &Job, base: &str, logs: bool, since: usize) -> (StatusCode, Value) {
    let (status_url, cancel_url, response_url) = request_urls(base, &job.app, &job.id);
    let mut map = serde_json::Map::new();
    map.insert("request_id".into(), job.id.clone().into());
    map.insert("response_url".into(), response_url.into());
    map.insert("status_url".into(), status_url.into());
    map.insert("cancel_url".into(), cancel_url.into());
    let log_lines = || -> Value {
        if logs {
            Value::Array(job.logs.iter().skip(since).map(|l| l.to_json()).collect())
        } else {
            Value::Array(Vec::new())
        }
    };
    let code = match &job.state {
        JobState::Queued => {
            map.insert("status".into(), "IN_QUEUE".into());
            map.insert("queue_position".into(), jobs.position(&job.id).unwrap_or(0).into());
            StatusCode::ACCEPTED
        }
        JobState::InProgress => {
            map.insert("status".into(), "IN_PROGRESS".into());
            map.insert("logs".into(), log_lines());
            StatusCode::ACCEPTED
        }
        JobState::Completed(outcome) => {
            map.insert("status".into(), "COMPLETED".into());
            map.insert("logs".into(), log_lines());
            map.insert("metrics".into(), json!({"inference_time": outcome.inference_time}));
            if let Some(error) = &outcome.error {
                map.insert("error".into(), error.clone().into());
                map.insert("error_type".into(), outcome.error_type.into());
            }
            StatusCode::OK
        }
    };
    (code, Value::Object(map))
}

fn status(call: &Call, id: &str) -> Response {
    let jobs = call.server.table.lock();
    match queued_job(&jobs, id) {
        Some(job) => {
            let (code, body) = status_body(&jobs, job, &call.base, logs_param(call), 0);
            json_response(code, body)
        }
        None => not_found(id),
    }
}

fn outcome_response(outcome: &Outcome, base: &str, id: &str) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, outcome.body_json(base));
    set_request_id(&mut response, id);
    if outcome.user_timeout {
        response.headers_mut().insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
    }
    if let Some(kind) = outcome.error_type {
        response.headers_mut().insert("x-fal-error-type", HeaderValue::from_static(kind));
    }
    response
}

fn result(call: &Call, id: &str) -> Response {
    let jobs = call.server.table.lock();
    match queued_job(&jobs, id).map(|j| &j.state) {
        None => not_found(id),
        Some(JobState::Completed(outcome)) => outcome_response(outcome, &call.base, id),
        Some(_) => detail(StatusCode::BAD_REQUEST, "Request is still in progress"),
    }
}

fn cancel(call: &Call, id: &str) -> Response {
    if queued_job(&call.server.table.lock(), id).is_none() {
        return not_found(id);
    }
    match call.server.table.cancel(id, StopReason::Cancelled) {
        CancelResult::NotFound => not_found(id),
        CancelResult::AlreadyCompleted => {
            json_response(StatusCode::BAD_REQUEST, json!({"status": "ALREADY_COMPLETED"}))
        }
        CancelResult::Requested(delivery) => {
            tracing::info!(request_id = %id, "cancellation requested");
            if let Some(delivery) = delivery {
                call.server.send_webhook(delivery);
            }
            json_response(StatusCode::ACCEPTED, json!({"status": "CANCELLATION_REQUESTED"}))
        }
    }
}

/// Server-sent events: one status per change (new logs only), closed after `COMPLETED`.
fn stream(call: Call, id: &str) -> Response {
    if queued_job(&call.server.table.lock(), id).is_none() {
        return not_found(id);
    }
    struct Cursor {
        server: Arc<Server>,
        id: String,
        base: String,
        logs: bool,
        changes: tokio::sync::watch::Receiver<u64>,
        sent_logs: usize,
        last: Option<Value>,
        done: bool,
    }
    let cursor = Cursor {
        changes: call.server.table.subscribe(),
        server: call.server.clone(),
        id: id.to_string(),
        logs: logs_param(&call),
        base: call.base,
        sent_logs: 0,
        last: None,
        done: false,
    };
    let events = futures_util::stream::unfold(cursor, |mut cursor| async move {
        if cursor.done {
            return None;
        }
        loop {
            let snapshot = {
                let jobs = cursor.server.table.lock();
                let job = jobs.jobs.get(&cursor.id)?;
                let (_, body) = status_body(&jobs, job, &cursor.base, cursor.logs, cursor.sent_logs);
                (body, job.logs.len(), matches!(job.state, JobState::Completed(_)))
            };
            let (body, log_count, completed) = snapshot;
            let mut key = body.clone();
            if let Some(map) = key.as_object_mut() {
                map.remove("logs");
            }
            let new_logs = cursor.logs && log_count > cursor.sent_logs;
            if completed || new_logs || cursor.last.as_ref() != Some(&key) {
                cursor.sent_logs = log_count;
                cursor.last = Some(key);
                cursor.done = completed;
                return Some((Ok::<Event, Infallible>(Event::default().data(body.to_string())), cursor));
            }
            cursor.changes.changed().await.ok()?;
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `POST /run/{app}`: queues the request like any other and answers on this connection. If the
/// caller goes away first, the request is cancelled.
async fn run(mut call: Call, app: &str) -> Response {
    let (job, input) = match new_job(&mut call, app, JobKind::Run).await {
        Ok(built) => built,
        Err(response) => return response,
    };
    let request = match input {
        Ok(request) => request,
        Err(outcome) => return outcome_response(&outcome, &call.base, &job.id),
    };
    let mut changes = call.server.table.subscribe();
    let id = match call.server.table.submit(job, Ok(request)) {
        Ok(submitted) => submitted.id,
        Err(e) => return submit_error(e),
    };
    struct Forget<'a>(&'a Server, &'a str);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            if self.0.table.outcome(self.1).is_none() {
                tracing::info!(request_id = %self.1, "run caller went away: cancelling");
                self.0.table.cancel(self.1, StopReason::Cancelled);
            }
            self.0.table.remove(self.1);
        }
    }
    let _forget = Forget(&call.server, &id);
    loop {
        if let Some(outcome) = call.server.table.outcome(&id) {
            return outcome_response(&outcome, &call.base, &id);
        }
        if changes.changed().await.is_err() {
            return detail(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
        }
    }
}
