//! What the HTTP layer, the worker and the sweeper share.

use std::net::SocketAddr;
use std::time::Instant;

use crate::config::ServerConfig;
use crate::core::cdn_tokens::CdnTokens;
use crate::core::files::FileStore;
use crate::core::uploads::Uploads;
use crate::core::Queue;

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
    pub queue: Queue,
    /// Served files.
    pub files: FileStore,
    /// Uploads in flight.
    pub uploads: Uploads,
    /// CDN upload tokens handed out by `/rest/storage/auth/token`.
    pub cdn_tokens: CdnTokens,
    /// When the server started.
    pub started: Instant,
}
