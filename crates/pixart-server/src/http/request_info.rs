//! What handlers read off a request besides its body: the base URL it came in on, the app it
//! names, query parameters.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::errors::ApiError;
use crate::state::AppState;

/// `scheme://host[:port]` the request came in on: `x-forwarded-proto`/`x-forwarded-host` when a
/// proxy set them, the Host header, else the listening address. Result URLs are built on it.
#[derive(Debug, Clone)]
pub struct BaseUrl(pub String);

impl FromRequestParts<Arc<AppState>> for BaseUrl {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let get = |name: &str| {
            parts.headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or(v).trim())
        };
        let scheme = get("x-forwarded-proto").filter(|s| matches!(*s, "http" | "https")).unwrap_or("http");
        let host = get("x-forwarded-host")
            .or_else(|| get("host"))
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c)))
            .map(str::to_string)
            .unwrap_or_else(|| state.local_addr.to_string());
        Ok(Self(format!("{scheme}://{host}")))
    }
}

/// The served app id when `owner/alias` names it, else 404 naming both.
pub fn check_app<'a>(state: &'a AppState, owner: &str, alias: &str) -> Result<&'a str, ApiError> {
    let app = state.config.app_id.as_str();
    if app.split_once('/') == Some((owner, alias)) {
        Ok(app)
    } else {
        Err(ApiError::NotFound(format!("application '{owner}/{alias}' not found (this server runs '{app}')")))
    }
}

/// A query parameter, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}
