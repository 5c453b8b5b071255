//! `pixart serve`: fal's queue API served locally over the PixArt-Σ pipeline, so the official
//! clients (`@fal-ai/client`, `fal-client`) work unmodified against `http://HOST:PORT`.
//!
//! Routes (fal's queue protocol as its clients speak it):
//!
//! | route | what |
//! |---|---|
//! | `POST /{owner}/{alias}[?fal_webhook=URL]` | submit → `{request_id, status_url, response_url, cancel_url, queue_position}` |
//! | `GET …/requests/{id}/status[?logs=1]` | 202 `IN_QUEUE` (`queue_position`) / `IN_PROGRESS` (`logs`), 200 `COMPLETED` |
//! | `GET …/requests/{id}/status/stream` | server-sent events, one per change, closed after `COMPLETED` |
//! | `GET …/requests/{id}` | the output (or the error, e.g. 422 `{"detail": […]}`), `x-fal-request-id` header |
//! | `PUT …/requests/{id}/cancel` | 202 `CANCELLATION_REQUESTED`, 400 `ALREADY_COMPLETED`, 404 |
//! | `POST /run/{owner}/{alias}` | synchronous run |
//! | `/rest/storage/…`, `/cdn/files/upload…`, `/uploads/…` | the clients' upload flows |
//! | `GET /files/{key}/{name}` | generated images and uploads |
//! | `GET /health`, `GET /metrics` | queue length, counters; Prometheus text format |
//!
//! Any call carrying `x-fal-target-url` is routed by that URL (the JS client's `proxyUrl` mode).
//! One worker thread per process runs the pipeline; the queue is bounded and `queue_position`
//! is exact.
//!
//! Layout: [`core`] is the queue (jobs, the async [`core::JobStore`] trait with its SQLite and
//! Redis implementations, the worker thread, files, uploads, webhooks) and knows nothing of HTTP
//! (no status codes, no routes); `http` maps it to fal's routes; `server` wires them and runs a
//! process's life ([`serve`] with HTTP, [`work`] without). No call blocks the async runtime: store
//! calls are async (SQLite on the blocking pool, Redis through an async connection), file work
//! runs on the blocking pool, and the generation runs on a thread of its own whose step loop never
//! waits on the store. Requests, results, logs, images and pending webhooks survive a restart,
//! graceful or not: in the storage folder ([`Storage`]) with the embedded queue, in Redis and a
//! shared storage folder with [`QueueBackend::Redis`], where any number of fronts and workers
//! share one queue.
//!
//! Embedding it (what `pixart serve` does):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pixart_pipeline::{LoadOptions, Pipeline};
//! use pixart_server::{check_storage, serve, ServerConfig};
//!
//! let mut config = ServerConfig::default(); // storage: the per-user data folder
//! config.api_key = Some("secret".into());
//! // Settings checked and the storage folder held before the long model load.
//! let claim = check_storage(&config)?;
//! let pipeline = Pipeline::load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", &LoadOptions::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! // Serves until the future resolves, then shuts down gracefully.
//! let stop = tokio::time::sleep(std::time::Duration::from_secs(3600));
//! let report = serve(Some(pipeline), "PixArt-Sigma-XL-2-1024-MS".into(), config, Some(claim), listener, stop).await?;
//! println!("{:?}", report.counters);
//! # Ok(())
//! # }
//! ```

mod config;
pub mod core;
mod http;
mod server;
mod state;

pub use crate::core::webhook_target;
pub use crate::core::Counters;
pub use config::{QueueBackend, ServerConfig, Storage};
pub use server::{check_storage, serve, work, ServeReport, StorageClaim};

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is out of range, or the storage folder cannot be used.
    #[error("server setting {0}")]
    Config(String),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] crate::core::StoreError),
    /// Binding, the storage folder or the HTTP server failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
