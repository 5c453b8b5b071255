//! Storage routes: fal's `/rest/storage/…` and CDN upload flows (see [`crate::uploads`]) and the
//! `/files/` downloads.

use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::api::{detail, json_response, Call};
use crate::files::url_path;
use crate::server::Server;
use crate::uploads::UploadError;

const CDN_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// `GET` (or `HEAD`) `/files/{key}/{name}`.
pub async fn serve_file(call: Call, key: &str, name: &str) -> Response {
    let Some(file) = call.server.files.get(key, name) else {
        return detail(StatusCode::NOT_FOUND, format!("no file {}", url_path(key, name)));
    };
    let bytes = match tokio::fs::read(&file.path).await {
        Ok(bytes) => bytes,
        Err(e) => return detail(StatusCode::NOT_FOUND, format!("file {} is gone: {e}", url_path(key, name))),
    };
    let content_type = HeaderValue::from_str(&file.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    // Uploads carry the uploader's content type: on the API's origin a `text/html` or SVG file
    // would run as a page. Browsers must not sniff, and anything but a raster image downloads.
    let disposition = if is_raster_image(&file.content_type) {
        HeaderValue::from_static("inline")
    } else {
        HeaderValue::from_static("attachment")
    };
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::CONTENT_DISPOSITION, disposition),
    ];
    // HEAD gets the same headers; hyper leaves the body out.
    (StatusCode::OK, headers, bytes).into_response()
}

/// Image types a browser renders without running anything (SVG is a document, not one of them).
fn is_raster_image(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(essence.as_str(), "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "image/avif" | "image/bmp")
}

async fn json_body(call: &mut Call) -> Result<Value, Response> {
    call.require_json()?;
    let limit = call.server.config.max_request_bytes;
    let bytes = call.read_body(limit, "--max-request-bytes").await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"detail": [{"loc": ["body"], "msg": format!("malformed JSON: {e}"), "type": "value_error.jsondecode"}]}),
        )
    })
}

/// `POST /rest/storage/upload/initiate[-multipart]` with `{content_type, file_name}`: both flows
/// start the same way (a multipart upload then sends numbered parts to `upload_url`).
pub async fn initiate(mut call: Call) -> Response {
    let body = match json_body(&mut call).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let content_type = body.get("content_type").and_then(Value::as_str).unwrap_or("application/octet-stream");
    let file_name = body.get("file_name").and_then(Value::as_str).unwrap_or("upload.bin");
    let (id, key, name) = call.server.uploads.begin(file_name, content_type);
    json_response(
        StatusCode::OK,
        json!({
            "upload_url": format!("{}/uploads/{id}", call.base),
            "file_url": format!("{}{}", call.base, url_path(&key, &name)),
        }),
    )
}

fn upload_error(error: UploadError) -> Response {
    match error {
        UploadError::Unknown => detail(StatusCode::NOT_FOUND, "unknown or finished upload"),
        UploadError::TooLarge(limit) => {
            detail(StatusCode::PAYLOAD_TOO_LARGE, format!("the file is larger than {limit} bytes (--max-upload-bytes)"))
        }
        UploadError::BadParts(message) => detail(StatusCode::BAD_REQUEST, message),
        UploadError::Io(message) => detail(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

fn store(call: &Call, key: &str, name: &str, content_type: &str, bytes: &[u8]) -> Result<String, Response> {
    call.server
        .files
        .put(key, name, content_type, bytes)
        .map(|path| format!("{}{path}", call.base))
        .map_err(|e| detail(StatusCode::INTERNAL_SERVER_ERROR, format!("storing the upload: {e}")))
}

/// `PUT /uploads/{id}`: the bytes of a single-part upload.
pub async fn put_upload(mut call: Call, id: &str) -> Response {
    let upload = match call.server.uploads.take(id) {
        Ok(upload) => upload,
        Err(e) => return upload_error(e),
    };
    let limit = call.server.config.max_upload_bytes;
    let bytes = match call.read_body(limit, "--max-upload-bytes").await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let content_type = call.header("content-type").unwrap_or(&upload.content_type).to_string();
    match store(&call, &upload.key, &upload.name, &content_type, &bytes) {
        Ok(url) => json_response(StatusCode::OK, json!({"file_url": url})),
        Err(response) => response,
    }
}

/// `PUT /uploads/{id}/{n}` (a part) or `POST /uploads/{id}/complete`.
pub async fn upload_part_or_complete(call: Call, id: &str, part: &str) -> Response {
    multipart_step(call, id, part, None).await
}

/// `POST /rest/storage/auth/token`: a short-lived token for the CDN upload routes.
pub fn cdn_token(call: &Call) -> Response {
    let token = uuid::Uuid::new_v4().simple().to_string();
    call.server
        .cdn_tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone(), Instant::now() + CDN_TOKEN_LIFETIME);
    let expires = chrono::Utc::now() + CDN_TOKEN_LIFETIME;
    json_response(
        StatusCode::OK,
        json!({
            "token": token,
            "token_type": "Bearer",
            "base_url": format!("{}/cdn", call.base),
            "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        }),
    )
}

/// Whether `token` came from [`cdn_token`] and has not expired.
pub fn cdn_token_valid(server: &Server, token: &str) -> bool {
    server
        .cdn_tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(token)
        .is_some_and(|expiry| *expiry > Instant::now())
}

fn cdn_file(call: &Call) -> (String, String) {
    let content_type = call.header("content-type").unwrap_or("application/octet-stream").to_string();
    let name = call.header("x-fal-file-name").map(str::to_string).unwrap_or_else(|| {
        let ext = content_type.split('/').nth(1).and_then(|s| s.split([';', '+', '-']).next()).unwrap_or("bin");
        format!("upload.{ext}")
    });
    (content_type, name)
}

/// `POST /cdn/files/upload`: the bytes, named by `X-Fal-File-Name`; answers `{access_url}`.
pub async fn cdn_upload(mut call: Call) -> Response {
    let (content_type, name) = cdn_file(&call);
    let limit = call.server.config.max_upload_bytes;
    let bytes = match call.read_body(limit, "--max-upload-bytes").await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let key = uuid::Uuid::new_v4().simple().to_string();
    match store(&call, &key, &name, &content_type, &bytes) {
        Ok(url) => json_response(StatusCode::OK, json!({"access_url": url})),
        Err(response) => response,
    }
}

/// `POST /cdn/files/upload/multipart`: starts a multipart upload; answers `{access_url, uploadId}`.
pub async fn cdn_multipart_begin(call: Call) -> Response {
    let (content_type, name) = cdn_file(&call);
    let (id, key, name) = call.server.uploads.begin(&name, &content_type);
    json_response(
        StatusCode::OK,
        json!({"access_url": format!("{}{}", call.base, url_path(&key, &name)), "uploadId": id}),
    )
}

/// `PUT /files/{key}/{name}/multipart/{id}/{n}` or `POST …/complete` (Python's multipart).
pub async fn cdn_multipart(call: Call, key: &str, name: &str, id: &str, part: &str) -> Response {
    multipart_step(call, id, part, Some((key, name))).await
}

async fn multipart_step(mut call: Call, id: &str, part: &str, target: Option<(&str, &str)>) -> Response {
    if let Some((key, name)) = target {
        let matches = {
            let pending = call.server.uploads.target(id);
            pending.is_some_and(|(k, n)| k == key && n == name)
        };
        if !matches {
            return upload_error(UploadError::Unknown);
        }
    }
    if part == "complete" {
        if call.method != Method::POST {
            return detail(StatusCode::METHOD_NOT_ALLOWED, "use POST to complete an upload");
        }
        let body = match json_body(&mut call).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let parts: Option<Vec<(u32, String)>> = body.get("parts").and_then(Value::as_array).and_then(|parts| {
            parts
                .iter()
                .map(|p| {
                    let number = p.get("partNumber")?.as_u64().and_then(|n| u32::try_from(n).ok())?;
                    Some((number, p.get("etag")?.as_str()?.to_string()))
                })
                .collect()
        });
        let Some(parts) = parts else {
            return detail(StatusCode::BAD_REQUEST, "body must be {\"parts\": [{\"partNumber\": n, \"etag\": \"…\"}]}");
        };
        let (upload, bytes) = match call.server.uploads.complete(id, &parts) {
            Ok(done) => done,
            Err(e) => return upload_error(e),
        };
        return match store(&call, &upload.key, &upload.name, &upload.content_type, &bytes) {
            Ok(url) => json_response(StatusCode::OK, json!({"file_url": url, "access_url": url})),
            Err(response) => response,
        };
    }
    let Some(number) = part.parse::<u32>().ok().filter(|n| *n >= 1) else {
        return detail(StatusCode::NOT_FOUND, format!("no route for part {part:?} (parts are numbered from 1)"));
    };
    if call.method != Method::PUT {
        return detail(StatusCode::METHOD_NOT_ALLOWED, "use PUT to send a part");
    }
    let limit = call.server.config.max_upload_bytes;
    let bytes = match call.read_body(limit, "--max-upload-bytes").await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    match call.server.uploads.add_part(id, number, &bytes, limit) {
        Ok(etag) => {
            let mut response = json_response(StatusCode::OK, json!({"partNumber": number, "etag": etag}));
            if let Ok(value) = HeaderValue::from_str(&etag) {
                response.headers_mut().insert(header::ETAG, value);
            }
            response
        }
        Err(e) => upload_error(e),
    }
}
