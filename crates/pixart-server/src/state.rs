//! What the HTTP layer, the worker and the sweeper share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ServerConfig;
use crate::core::cdn_tokens::CdnTokens;
use crate::core::files::FileStore;
use crate::core::image_source::ImageSource;
use crate::core::lora_source::LoraSource;
use crate::core::uploads::Uploads;
use crate::core::Queue;

/// Runs blocking file work (the storage folder) on the blocking pool, never on the runtime.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)
}

/// The state of one server.
#[derive(Debug)]
pub struct AppState {
    /// Settings.
    pub config: ServerConfig,
    /// The model being served (for `/health`).
    pub model: String,
    /// The address the server listens on (base URL when a request has no Host header).
    pub local_addr: SocketAddr,
    /// The jobs.
    pub queue: Arc<Queue>,
    /// Served files.
    pub files: Arc<FileStore>,
    /// Uploads in flight.
    pub uploads: Arc<Uploads>,
    /// CDN upload tokens handed out by `/rest/storage/auth/token`.
    pub cdn_tokens: Arc<CdnTokens>,
    /// Where requests' LoRAs are read from.
    pub loras: Arc<LoraSource>,
    /// Where requests' input pictures are read from.
    pub images: Arc<ImageSource>,
    /// When the server started.
    pub started: Instant,
    /// The memory request bodies being received share, one permit per byte
    /// ([`ServerConfig::max_body_memory`]).
    pub body_memory: Arc<tokio::sync::Semaphore>,
}
