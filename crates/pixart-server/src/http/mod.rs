//! The HTTP layer: fal's routes over the queue core. Thin: handlers translate requests into
//! [`crate::core`] calls and core answers into fal's responses; every status code is chosen in
//! [`errors`]. Authentication, body limits and `x-fal-target-url` routing are middleware.

mod body;
pub mod connections;
mod deadline;
mod errors;
mod middleware;
mod openai_routes;
mod ops_routes;
mod playground;
mod prometheus;
mod queue_routes;
mod request_info;
mod storage_routes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::state::AppState;
use errors::ApiError;

/// The route of stored files (generated images, uploads).
const FILES_ROUTE: &str = "/files/{key}/{name}";

/// The URL path [`FILES_ROUTE`] serves a stored file at.
pub fn file_url_path(key: &str, name: &str) -> String {
    FILES_ROUTE.replace("{key}", key).replace("{name}", name)
}

/// The server's routes:
///
/// | route | what |
/// |---|---|
/// | `POST /{owner}/{alias}[?fal_webhook=URL]` | submit |
/// | `GET …/requests/{id}/status[?logs=1]`, `…/status/stream` | status, server-sent events |
/// | `GET …/requests/{id}`, `PUT …/requests/{id}/cancel` | result, cancel |
/// | `POST /run/{owner}/{alias}` | synchronous run |
/// | `/rest/storage/…`, `/cdn/files/upload…`, `/uploads/…` | the clients' upload flows |
/// | `GET /files/{key}/{name}` | generated images and uploads |
/// | `GET /`, `/playground/…` | the playground page (see [`playground`]) |
/// | `GET /health`, `GET /metrics` | liveness and Prometheus metrics |
/// | `POST /v1/images/generations`, `GET /v1/models` | OpenAI's images API (see [`openai_routes`]) |
///
/// Layers, outermost first: CORS (only when [`crate::ServerConfig::cors_origins`] names
/// origins), OpenAI's error shape on `/v1/`, `x-fal-target-url` routing, the API key, body limits.
pub fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route("/", get(playground::index))
        .route("/playground/app.js", get(playground::script))
        .route("/playground/app.css", get(playground::style))
        .route("/playground/schema.json", get(playground::schema))
        .route("/health", get(ops_routes::health))
        .route("/metrics", get(ops_routes::metrics))
        .route(FILES_ROUTE, get(storage_routes::serve_file))
        .route(
            "/files/{key}/{name}/multipart/{upload}/{part}",
            put(storage_routes::cdn_multipart_part).post(storage_routes::cdn_multipart_complete),
        )
        .route("/uploads/{upload}", put(storage_routes::put_upload))
        .route("/uploads/{upload}/{part}", put(storage_routes::upload_part).post(storage_routes::upload_complete))
        .route("/rest/storage/upload/initiate", post(storage_routes::initiate))
        .route("/rest/storage/upload/initiate-multipart", post(storage_routes::initiate))
        .route("/rest/storage/auth/token", post(storage_routes::cdn_token))
        .route("/cdn/files/upload", post(storage_routes::cdn_upload))
        .route("/cdn/files/upload/multipart", post(storage_routes::cdn_multipart_begin))
        .route("/v1/images/generations", post(openai_routes::image_generations))
        .route("/v1/models", get(openai_routes::models))
        .route("/run/{owner}/{alias}", post(queue_routes::run))
        .route("/{owner}/{alias}", post(queue_routes::submit))
        .route("/{owner}/{alias}/requests/{id}", get(queue_routes::result))
        .route("/{owner}/{alias}/requests/{id}/status", get(queue_routes::status))
        .route("/{owner}/{alias}/requests/{id}/status/stream", get(queue_routes::stream))
        .route("/{owner}/{alias}/requests/{id}/cancel", put(queue_routes::cancel))
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed("the method this route documents") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::limit_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_api_key))
        .with_state(state.clone());
    // `Router::layer` runs after routing: the target-URL rewrite must wrap the routes from the
    // outside, so the routes are the fallback of an outer router that carries it.
    let outer = Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(middleware::route_by_target_url))
        .layer(axum::middleware::from_fn(openai_routes::openai_errors));
    let origins = &state.config.cors_origins;
    if origins.is_empty() {
        return outer;
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
    outer.layer(cors)
}

/// 404 naming what was asked: an app this server does not run, a path under it that does not
/// exist, or a route that does not exist.
async fn no_route(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: Request,
) -> impl IntoResponse {
    let path = request.uri().path();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let app = state.config.app_id.as_str();
    let reserved = ["health", "metrics", "files", "uploads", "rest", "cdn", "v1", "playground"];
    if segments.first().is_some_and(|s| reserved.contains(s)) {
        return ApiError::NotFound(format!("no route for {path}"));
    }
    let segments = if segments.first() == Some(&"run") { &segments[1..] } else { &segments[..] };
    let n = if matches!(segments.first(), Some(&"workflows" | &"comfy")) { 3 } else { 2 };
    if segments.is_empty() {
        return ApiError::NotFound(format!("this server runs {app}: POST /{app}"));
    }
    if n == 2 && segments.len() >= 2 && app.split('/').eq(segments[..2].iter().copied()) {
        return ApiError::NotFound("this app has no endpoint at that path".into());
    }
    let asked = segments.iter().take(n).copied().collect::<Vec<_>>().join("/");
    ApiError::NotFound(format!("application '{asked}' not found (this server runs '{app}')"))
}
