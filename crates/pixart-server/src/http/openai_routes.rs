//! OpenAI's images API over the same queue: `POST /v1/images/generations` and `GET /v1/models`,
//! for tools written against OpenAI's SDK (`base_url` pointed here).
//!
//! A generation is a run job like fal's `/run/` (same queue, metrics, retention, and fal's
//! `x-fal-queue-priority` and `x-fal-request-timeout` headers).
//! Fields: `prompt`; `n` → `num_images`; `size` `WIDTHxHEIGHT` → `image_size` (`auto`: the
//! default); `response_format` `url` (stored image URLs) or `b64_json` (the PNG inline); `model`,
//! `quality`, `style` and `user` are accepted and ignored (one model per server); any other field
//! is one of fal's request fields (`seed`, `negative_prompt`, `num_inference_steps`,
//! `guidance_scale`… as the SDK's `extra_body` sends them at the top level). Errors, every one on
//! these routes, are OpenAI's `{"error": {message, type, param, code}}`, 400 where fal says 422.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use pixart_fal::{FieldError, GenerateRequest};
use serde_json::{json, Map, Value};

use super::body::json_object;
use super::errors::{json_response, ApiError};
use super::queue_routes::{outcome_response, queue_headers, run_to_end};
use super::request_info::BaseUrl;
use crate::core::fal_format::result_body;
use crate::core::{JobKind, NewJob, Outcome};
use crate::state::AppState;

/// fal's field names and the OpenAI names they came from, for errors.
const RENAMED: [(&str, &str); 3] = [("num_images", "n"), ("image_size", "size"), ("sync_mode", "response_format")];

/// OpenAI's fields that change nothing here.
const IGNORED: [&str; 4] = ["model", "quality", "style", "user"];

/// `POST /v1/images/generations`.
pub async fn image_generations(
    State(state): State<Arc<AppState>>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(&headers, body).await?;
    let (request, inline) = to_request(&body)?;
    let mut job = NewJob::new(JobKind::Run, &state.config.app_id, &base, Ok(request));
    queue_headers(&mut job, &headers)?;
    let id = job.id.clone();
    let outcome = run_to_end(&state, job).await?;
    if !matches!(outcome, Outcome::Succeeded { .. }) {
        return Ok(outcome_response(&outcome, &base, &id));
    }
    let result = result_body(&outcome, &base);
    let images = result.get("images").and_then(Value::as_array).cloned().unwrap_or_default();
    let data: Vec<Value> = images
        .iter()
        .filter_map(|image| image.get("url").and_then(Value::as_str))
        .map(|url| match (inline, url.split_once(";base64,")) {
            (true, Some((_, b64))) => json!({"b64_json": b64}),
            _ => json!({"url": url}),
        })
        .collect();
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(json_response(StatusCode::OK, json!({"created": created, "data": data})))
}

/// `GET /v1/models`: the one model this server runs, under its app id.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let model = json!({"id": state.config.app_id, "object": "model", "created": 0, "owned_by": "pixart"});
    json_response(StatusCode::OK, json!({"object": "list", "data": [model]}))
}

/// fal's request from OpenAI's fields, and whether images go inline (`b64_json`).
fn to_request(body: &Value) -> Result<(GenerateRequest, bool), ApiError> {
    let invalid = |field: &str, message: &str| ApiError::field("body", field, message);
    let Value::Object(fields) = body else { return Err(invalid("", "the body must be a JSON object")) };
    let mut fal = Map::new();
    let mut inline = false;
    for (name, value) in fields {
        match name.as_str() {
            name if IGNORED.contains(&name) => {}
            "n" => {
                fal.insert("num_images".into(), value.clone());
            }
            "size" => match value.as_str() {
                None if value.is_null() => {}
                Some("auto") => {}
                Some(text) => {
                    let size = parse_size(text).ok_or_else(|| {
                        invalid("size", &format!("must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {text:?}"))
                    })?;
                    fal.insert("image_size".into(), size);
                }
                None => return Err(invalid("size", "must be a string: WIDTHxHEIGHT (e.g. 1024x1024) or auto")),
            },
            "response_format" => match value.as_str() {
                None if value.is_null() => {}
                Some("url") => {}
                Some("b64_json") => inline = true,
                _ => return Err(invalid("response_format", &format!("must be url or b64_json, got {value}"))),
            },
            _ => {
                fal.insert(name.clone(), value.clone());
            }
        }
    }
    fal.insert("sync_mode".into(), Value::Bool(inline));
    let request = GenerateRequest::from_value(&Value::Object(fal)).map_err(|errors| ApiError::Unprocessable {
        location: "body",
        errors: errors.into_iter().map(openai_names).collect(),
    })?;
    Ok((request, inline))
}

/// `{"width": W, "height": H}` from `WxH`.
fn parse_size(text: &str) -> Option<Value> {
    let (width, height) = text.split_once(['x', 'X'])?;
    let (width, height) = (width.trim().parse::<u64>().ok()?, height.trim().parse::<u64>().ok()?);
    Some(json!({"width": width, "height": height}))
}

/// An error about a fal field, named as the OpenAI field it came from.
fn openai_names(mut error: FieldError) -> FieldError {
    for (fal, openai) in RENAMED {
        if error.field == fal || error.field.starts_with(&format!("{fal}.")) {
            error.field = openai.to_string();
        }
    }
    error
}

/// Rewrites every error answered on `/v1/` (fal's `{"detail": …}`, from any route or layer:
/// the API key, body limits, the queue) into OpenAI's shape, 422 becoming 400.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    let openai = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    if !openai || response.status().as_u16() < 400 {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 1 << 20)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|v| v.get("detail").cloned())
        .unwrap_or(Value::Null);
    let (message, param) = match &detail {
        Value::String(message) => (message.clone(), Value::Null),
        Value::Array(errors) => {
            let field = |e: &Value| {
                let loc: Vec<String> = e
                    .get("loc")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .skip(1)
                    .map(|l| l.to_string().trim_matches('"').to_string())
                    .collect();
                loc.join(".")
            };
            let text = |e: &Value| format!("{}: {}", field(e), e.get("msg").and_then(Value::as_str).unwrap_or(""));
            let message = errors.iter().map(text).collect::<Vec<_>>().join("; ");
            (message, errors.first().map_or(Value::Null, |e| Value::String(field(e))))
        }
        _ => (parts.status.canonical_reason().unwrap_or("error").to_string(), Value::Null),
    };
    let status = if parts.status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { parts.status };
    let kind = match status.as_u16() {
        401 => "authentication_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let mut rewritten =
        json_response(status, json!({"error": {"message": message, "type": kind, "param": param, "code": null}}));
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_LENGTH && name != axum::http::header::CONTENT_TYPE {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_fields_become_fals() {
        let body = json!({"prompt": "a cat", "n": 2, "size": "512x768", "response_format": "b64_json",
                          "model": "dall-e-3", "quality": "hd", "seed": 7, "num_inference_steps": 3});
        let (request, inline) = to_request(&body).unwrap();
        assert!(inline);
        let fal = serde_json::to_value(&request).unwrap();
        assert_eq!(fal["num_images"], 2);
        assert_eq!(fal["image_size"], json!({"width": 512, "height": 768}));
        assert_eq!((fal["seed"].clone(), fal["num_inference_steps"].clone()), (json!(7), json!(3)));
        let Err(ApiError::Unprocessable { errors, .. }) = to_request(&json!({"prompt": "a", "n": 9})) else {
            panic!("n out of range")
        };
        assert_eq!(errors[0].field, "n");
        assert!(to_request(&json!({"prompt": "a", "size": "big"})).is_err());
        assert!(to_request(&json!({"prompt": "a", "response_format": "png"})).is_err());
    }
}
