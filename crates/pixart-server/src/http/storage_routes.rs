//! Storage routes: fal's `/rest/storage/…` and CDN upload flows (see
//! [`crate::core::uploads`]) and the `/files/` downloads. Uploaded bytes go to disk as they
//! arrive.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::body::{json_object, spool, upload_error};
use super::errors::{json_response, ApiError};
use super::file_url_path as url_path;
use super::request_info::BaseUrl;
use crate::core::uploads::{Spooled, UploadError};
use crate::state::{blocking, AppState};

/// `GET` (or `HEAD`) `/files/{key}/{name}`: served by tower-http's `ServeFile` (streamed from
/// disk, `Range` requests, `If-Modified-Since`/`Last-Modified`), with the stored content type.
pub async fn serve_file(
    State(state): State<Arc<AppState>>,
    Path((key, name)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let files = state.files.clone();
    let (k, n) = (key.clone(), name.clone());
    let Some(file) = blocking(move || files.get(&k, &n)).await.map_err(internal)? else {
        return Err(ApiError::NotFound(format!("no file {}", url_path(&key, &name))));
    };
    let mime: mime::Mime = file.content_type.parse().unwrap_or(mime::APPLICATION_OCTET_STREAM);
    let served = ServeFile::new_with_mime(&file.path, &mime).oneshot(request).await.map_err(internal)?;
    if served.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::NotFound(format!("file {} is gone", url_path(&key, &name))));
    }
    let mut response = served.map(Body::new);
    // Uploads carry the uploader's content type: on the API's origin a `text/html` or SVG file
    // would run as a page. Browsers must not sniff, and anything but a raster image downloads.
    let disposition = if is_raster_image(&file.content_type) { "inline" } else { "attachment" };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(disposition));
    Ok(response)
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("storage: {error}"))
}

/// Image types a browser renders without running anything (SVG is a document, not one of them).
fn is_raster_image(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(essence.as_str(), "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "image/avif" | "image/bmp")
}

/// `POST /rest/storage/upload/initiate[-multipart]` with `{content_type, file_name}`: both flows
/// start the same way (a multipart upload then sends numbered parts to `upload_url`).
pub async fn initiate(
    State(state): State<Arc<AppState>>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(&headers, body).await?;
    let content_type = body.get("content_type").and_then(Value::as_str).unwrap_or("application/octet-stream");
    let file_name = body.get("file_name").and_then(Value::as_str).unwrap_or("upload.bin");
    let (uploads, file_name, content_type) = (state.uploads.clone(), file_name.to_string(), content_type.to_string());
    let (id, key, name) =
        blocking(move || uploads.begin(&file_name, &content_type)).await.map_err(internal)?.map_err(upload_error)?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "upload_url": format!("{base}/uploads/{id}"),
            "file_url": format!("{base}{}", url_path(&key, &name)),
        }),
    ))
}

/// Moves a finished spool file into the served files; returns its absolute URL.
async fn store(state: &AppState, base: &str, target: (&str, &str, &str), file: Spooled) -> Result<String, ApiError> {
    let (key, name, content_type) = (target.0.to_string(), target.1.to_string(), target.2.to_string());
    let files = state.files.clone();
    let k = key.clone();
    let stored = blocking(move || {
        let stored = files.put_file(&k, &name, &content_type, &file.path);
        if stored.is_err() {
            let _ = std::fs::remove_file(&file.path);
        }
        stored
    })
    .await
    .map_err(internal)?;
    stored
        .map(|name| format!("{base}{}", url_path(&key, &name)))
        .map_err(|e| ApiError::Internal(format!("storing the upload: {e}")))
}

/// The body of an upload call, spooled to disk within `--max-upload-bytes`.
async fn spool_body(state: &AppState, body: Body) -> Result<Spooled, ApiError> {
    let file = state.uploads.spool_file(state.config.max_upload_bytes).await.map_err(upload_error)?;
    spool(body, file).await
}

/// `Uploads` work on the blocking pool.
async fn uploads<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&crate::core::uploads::Uploads) -> Result<T, UploadError> + Send + 'static,
) -> Result<T, ApiError> {
    let uploads = state.uploads.clone();
    blocking(move || work(&uploads)).await.map_err(internal)?.map_err(upload_error)
}

/// `PUT /uploads/{id}`: the bytes of a single-part upload.
pub async fn put_upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let upload = uploads(&state, move |u| u.take(&id)).await?;
    let file = spool_body(&state, body).await?;
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or(&upload.content_type);
    let url = store(&state, &base, (&upload.key, &upload.name, content_type), file).await?;
    Ok(json_response(StatusCode::OK, json!({"file_url": url})))
}

/// `PUT /uploads/{id}/{n}`: one part of a multipart upload.
pub async fn upload_part(
    State(state): State<Arc<AppState>>,
    Path((id, part)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    add_part(&state, &id, &part, body).await
}

/// `POST /uploads/{id}/complete`.
pub async fn upload_complete(
    State(state): State<Arc<AppState>>,
    Path((id, part)): Path<(String, String)>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    complete(&state, &base, &id, &part, &headers, body).await
}

/// `POST /rest/storage/auth/token`: a short-lived token for the CDN upload routes.
pub async fn cdn_token(State(state): State<Arc<AppState>>, BaseUrl(base): BaseUrl) -> Result<Response, ApiError> {
    let tokens = state.cdn_tokens.clone();
    let issued = blocking(move || tokens.issue()).await.map_err(internal)?;
    let token = issued.map_err(|e| ApiError::Internal(format!("issuing an upload token: {e}")))?;
    let expires = chrono::Utc::now() + crate::core::cdn_tokens::LIFETIME;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "token": token,
            "token_type": "Bearer",
            "base_url": format!("{base}/cdn"),
            "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        }),
    ))
}

fn cdn_file(headers: &HeaderMap) -> (String, String) {
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let content_type = text("content-type").unwrap_or("application/octet-stream").to_string();
    let name = text("x-fal-file-name").map(str::to_string).unwrap_or_else(|| {
        let ext = content_type.split('/').nth(1).and_then(|s| s.split([';', '+', '-']).next()).unwrap_or("bin");
        format!("upload.{ext}")
    });
    (content_type, name)
}

/// `POST /cdn/files/upload`: the bytes, named by `X-Fal-File-Name`; answers `{access_url}`.
pub async fn cdn_upload(
    State(state): State<Arc<AppState>>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (content_type, name) = cdn_file(&headers);
    let file = spool_body(&state, body).await?;
    let key = uuid::Uuid::new_v4().simple().to_string();
    let url = store(&state, &base, (&key, &name, &content_type), file).await?;
    Ok(json_response(StatusCode::OK, json!({"access_url": url})))
}

/// `POST /cdn/files/upload/multipart`: starts a multipart upload; answers `{access_url, uploadId}`.
pub async fn cdn_multipart_begin(
    State(state): State<Arc<AppState>>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (content_type, name) = cdn_file(&headers);
    let (id, key, name) = uploads(&state, move |u| u.begin(&name, &content_type)).await?;
    let url = format!("{base}{}", url_path(&key, &name));
    Ok(json_response(StatusCode::OK, json!({"access_url": url, "uploadId": id})))
}

async fn check_target(state: &AppState, id: &str, key: &str, name: &str) -> Result<(), ApiError> {
    let (id, key, name) = (id.to_string(), key.to_string(), name.to_string());
    uploads(state, move |u| match u.target(&id) {
        Some((k, n)) if k == key && n == name => Ok(()),
        _ => Err(UploadError::Unknown),
    })
    .await
}

/// `PUT /files/{key}/{name}/multipart/{id}/{n}` (Python's multipart parts).
pub async fn cdn_multipart_part(
    State(state): State<Arc<AppState>>,
    Path((key, name, id, part)): Path<(String, String, String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    check_target(&state, &id, &key, &name).await?;
    add_part(&state, &id, &part, body).await
}

/// `POST /files/{key}/{name}/multipart/{id}/complete`.
pub async fn cdn_multipart_complete(
    State(state): State<Arc<AppState>>,
    Path((key, name, id, part)): Path<(String, String, String, String)>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_target(&state, &id, &key, &name).await?;
    complete(&state, &base, &id, &part, &headers, body).await
}

async fn add_part(state: &AppState, id: &str, part: &str, body: Body) -> Result<Response, ApiError> {
    let Some(number) = part.parse::<u32>().ok().filter(|n| *n >= 1) else {
        return Err(ApiError::NotFound(format!("no route for part {part:?} (parts are numbered from 1)")));
    };
    let limit = state.config.max_upload_bytes;
    // Unknown uploads are refused before their bytes are read.
    let upload = id.to_string();
    uploads(state, move |u| u.target(&upload).map(|_| ()).ok_or(UploadError::Unknown)).await?;
    let file = spool_body(state, body).await?;
    let upload = id.to_string();
    let etag = uploads(state, move |u| u.add_part(&upload, number, &file, limit)).await?;
    let mut response = json_response(StatusCode::OK, json!({"partNumber": number, "etag": etag}));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

async fn complete(
    state: &AppState,
    base: &str,
    id: &str,
    part: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if part != "complete" {
        return Err(ApiError::MethodNotAllowed("PUT to send a part, POST …/complete to finish"));
    }
    let body = json_object(headers, body).await?;
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
        return Err(ApiError::BadRequest("body must be {\"parts\": [{\"partNumber\": n, \"etag\": \"…\"}]}".into()));
    };
    let upload_id = id.to_string();
    let (upload, joined) = uploads(state, move |u| u.complete(&upload_id, &parts)).await?;
    let (files, spool, target) = (state.files.clone(), state.uploads.clone(), upload.clone());
    let stored = blocking(move || {
        let stored = files.put_file(&target.key, &target.name, &target.content_type, &joined);
        spool.discard(&joined);
        stored
    })
    .await
    .map_err(internal)?;
    let name = stored.map_err(|e| ApiError::Internal(format!("storing the upload: {e}")))?;
    let url = format!("{base}{}", url_path(&upload.key, &name));
    Ok(json_response(StatusCode::OK, json!({"file_url": url, "access_url": url})))
}
