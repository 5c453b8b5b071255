//! The server's shared state and its life: start, serve, shut down gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pixart_pipeline::Pipeline;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::files::FileStore;
use crate::jobs::{Counters, JobTable, StopReason};
use crate::uploads::Uploads;
use crate::webhook::{Delivery, WebhookSender};
use crate::ServerError;

/// Everything the HTTP handlers and the worker share.
#[derive(Debug)]
pub struct Server {
    /// Settings.
    pub config: ServerConfig,
    /// The model being served (for `/health`).
    pub model: String,
    /// The address the server listens on (base URL when a request has no Host header).
    pub local_addr: SocketAddr,
    /// Requests.
    pub table: JobTable,
    /// Served files.
    pub files: FileStore,
    /// Uploads in flight.
    pub uploads: Uploads,
    /// CDN upload tokens handed out by `/rest/storage/auth/token`, with their expiry.
    pub cdn_tokens: Mutex<HashMap<String, Instant>>,
    webhooks: Mutex<Option<WebhookSender>>,
    /// When the server started.
    pub started: Instant,
}

impl Server {
    /// Queues a webhook delivery.
    pub fn send_webhook(&self, delivery: Delivery) {
        match &*self.webhooks.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(sender) => sender.send(delivery),
            None => tracing::error!(request_id = %delivery.request_id, "webhook after shutdown was not sent"),
        }
    }
}

/// What happened over the server's life.
#[derive(Debug, Clone, Copy)]
pub struct ServeReport {
    /// Request counters at exit.
    pub counters: Counters,
}

/// Serves `pipeline` on `listener` until `shutdown` resolves, then shuts down gracefully:
/// new requests are refused (503), queued ones fail with `ServerShutdown`, the one being
/// generated gets `config.shutdown_grace` to finish (then stops at its next step and fails
/// with `ServerShutdown`), and every webhook is delivered before the function returns.
pub async fn serve(
    pipeline: Pipeline,
    model: String,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeReport, ServerError> {
    config.validate()?;
    let local_addr = listener.local_addr().map_err(ServerError::Io)?;
    let files = FileStore::open(config.storage_dir.as_deref()).map_err(ServerError::Io)?;
    tracing::info!(folder = %files.root().display(), "storing generated images and uploads");
    // Parts of multipart uploads in flight are spooled here, not kept in memory.
    let spool = files.root().join(".upload-parts");
    let (webhooks, webhook_thread) =
        WebhookSender::start(config.webhook_attempts, config.webhook_timeout, config.allow_private_webhooks)?;
    let server = Arc::new(Server {
        table: JobTable::new(config.max_queue),
        config,
        model,
        local_addr,
        files,
        uploads: Uploads::new(spool),
        cdn_tokens: Mutex::new(HashMap::new()),
        webhooks: Mutex::new(Some(webhooks)),
        started: Instant::now(),
    });

    let worker = {
        let server = server.clone();
        std::thread::Builder::new()
            .name("pixart-worker".into())
            .spawn(move || crate::worker::run(pipeline, server))
            .map_err(ServerError::Io)?
    };
    let sweeper = tokio::spawn(sweep(server.clone()));

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let router = crate::api::router(server.clone());
    let limits = crate::connections::ConnectionLimits { header_read_timeout: server.config.header_read_timeout };
    let http = tokio::spawn(crate::connections::serve(
        listener,
        router,
        limits,
        async move {
            let _ = http_stopped.await;
        },
        Duration::from_secs(10),
    ));

    shutdown.await;
    tracing::info!("shutting down: refusing new requests, failing queued ones");
    for delivery in server.table.close() {
        server.send_webhook(delivery);
    }
    // Wait for the running request on the table's change notifications, up to the grace period.
    let mut changes = server.table.subscribe();
    let finished = async {
        while server.table.busy() {
            if changes.changed().await.is_err() {
                break;
            }
        }
    };
    if tokio::time::timeout(server.config.shutdown_grace, finished).await.is_err() {
        tracing::warn!("the running request did not finish within the grace period: stopping it");
        server.table.stop_running(StopReason::Shutdown);
    }
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    // Close the webhook queue and wait until every delivery was attempted.
    drop(server.webhooks.lock().unwrap_or_else(|e| e.into_inner()).take());
    let _ = tokio::task::spawn_blocking(move || webhook_thread.join()).await;
    sweeper.abort();

    let _ = stop_http.send(());
    // `connections::serve` waits at most 10 s for open connections itself.
    let _ = http.await;
    server.uploads.cleanup();
    server.files.cleanup();
    let counters = server.table.lock().counters;
    tracing::info!(?counters, "stopped");
    Ok(ServeReport { counters })
}

/// Fails queued requests past their start deadline (every 100 ms, so their slots free up and
/// their webhooks go out on time), forgets finished requests and their files after the retention
/// period, and unfinished uploads and CDN tokens after an hour.
async fn sweep(server: Arc<Server>) {
    let deadlines = {
        let server = server.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                for delivery in server.table.expire_deadlines() {
                    server.send_webhook(delivery);
                }
            }
        }
    };
    tokio::join!(deadlines, sweep_retained(server));
}

async fn sweep_retained(server: Arc<Server>) {
    let period = server
        .config
        .retention
        .map_or(Duration::from_secs(60), |r| (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if let Some(retention) = server.config.retention {
            for id in server.table.expire(retention) {
                server.files.remove_key(&id);
            }
            let table = &server.table;
            server.files.expire(retention, |key| table.lock().jobs.contains_key(key));
        }
        server.uploads.expire(Duration::from_secs(3600));
        server.cdn_tokens.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, expiry| *expiry > Instant::now());
    }
}
