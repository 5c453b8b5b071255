//! A server's life: open its storage, recover what the last run left, serve, shut down
//! gracefully.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pixart_pipeline::Pipeline;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::core::cdn_tokens::CdnTokens;
use crate::core::files::FileStore;
use crate::core::uploads::Uploads;
use crate::core::webhook::WebhookSender;
use crate::core::worker::WorkerContext;
use crate::core::{Counters, JobStore, Queue, Recovery, SqliteStore, StopReason};
use crate::state::AppState;
use crate::ServerError;

/// What happened over the server's life.
#[derive(Debug, Clone, Copy)]
pub struct ServeReport {
    /// Request counters at exit.
    pub counters: Counters,
    /// What was found in the storage folder at start.
    pub recovery: Recovery,
}

/// Serves `pipeline` on `listener` until `shutdown` resolves, then shuts down gracefully: new
/// requests are refused (503), the one being generated gets `config.shutdown_grace` to finish,
/// and every webhook due is delivered before the function returns.
///
/// With durable storage (the default, see [`crate::Storage`]) queued requests stay queued and a
/// request stopped at the end of the grace period is queued again: both run after the next
/// start, as do requests that were running when a previous server was killed. With
/// [`crate::Storage::Temporary`] they fail with `ServerShutdown` instead.
pub async fn serve(
    pipeline: Pipeline,
    model: String,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeReport, ServerError> {
    config.validate()?;
    let durable = config.storage.is_durable();
    let root = config.storage.resolve()?;
    std::fs::create_dir_all(&root)
        .map_err(|e| ServerError::Config(format!("storage folder {}: {e}", root.display())))?;
    let lock = StorageLock::acquire(&root)?;
    let store: Arc<dyn JobStore> = Arc::new(SqliteStore::open(&root.join("jobs.sqlite3"))?);
    let files = FileStore::open(&root.join("files"))?;
    tracing::info!(folder = %root.display(), durable, "storing requests, generated images and uploads");
    let (webhooks, webhook_threads) = WebhookSender::start(
        store.clone(),
        config.webhook_attempts,
        config.webhook_timeout,
        config.allow_private_webhooks,
    )?;
    let queue = Queue::new(store, config.max_queue, webhooks);
    let recovery = queue.recover()?;
    if recovery != Recovery::default() {
        tracing::info!(?recovery, "resuming what the last run left");
    }
    let state = Arc::new(AppState {
        local_addr: listener.local_addr()?,
        uploads: Uploads::new(root.join(".upload-parts")),
        config,
        model,
        queue,
        files,
        cdn_tokens: CdnTokens::new(root.join(".cdn-tokens")),
        started: Instant::now(),
    });

    let worker = {
        let state = state.clone();
        std::thread::Builder::new().name("pixart-worker".into()).spawn(move || {
            let context = WorkerContext { queue: &state.queue, files: &state.files, durable };
            crate::core::worker::run(&pipeline, context)
        })?
    };
    let sweeper = tokio::spawn(sweep(state.clone()));

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let router = crate::http::router(state.clone());
    let limits = crate::http::connections::ConnectionLimits { header_read_timeout: state.config.header_read_timeout };
    let http = tokio::spawn(crate::http::connections::serve(
        listener,
        router,
        limits,
        async move {
            let _ = http_stopped.await;
        },
        Duration::from_secs(10),
    ));

    shutdown.await;
    tracing::info!(durable, "shutting down: refusing new requests");
    if let Err(e) = state.queue.close(!durable) {
        tracing::error!(error = %e, "failing the queued requests");
    }
    // Wait for the running request on the queue's change notifications, up to the grace period.
    let mut changes = state.queue.subscribe();
    let finished = async {
        while state.queue.busy() {
            if changes.changed().await.is_err() {
                break;
            }
        }
    };
    if tokio::time::timeout(state.config.shutdown_grace, finished).await.is_err() {
        tracing::warn!("the running request did not finish within the grace period: stopping it");
        state.queue.stop_running(StopReason::Shutdown);
    }
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    // Close the webhook queue and wait until every delivery was attempted.
    drop(state.queue.stop_webhooks());
    let _ = tokio::task::spawn_blocking(move || webhook_threads.join()).await;
    sweeper.abort();

    let _ = stop_http.send(());
    // `connections::serve` waits at most 10 s for open connections itself.
    let _ = http.await;
    state.uploads.cleanup();
    let counters = state.queue.counters();
    drop(lock);
    if !durable {
        let _ = std::fs::remove_dir_all(&root);
    }
    tracing::info!(?counters, "stopped");
    Ok(ServeReport { counters, recovery })
}

/// Fails queued requests past their start deadline (every 100 ms, so their slots free up and
/// their webhooks go out on time), forgets finished requests and their files after the retention
/// period, and unfinished uploads and CDN tokens after an hour.
async fn sweep(state: Arc<AppState>) {
    let deadlines = {
        let state = state.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Err(e) = state.queue.expire_deadlines() {
                    tracing::error!(error = %e, "expiring start deadlines");
                }
            }
        }
    };
    tokio::join!(deadlines, sweep_retained(state));
}

async fn sweep_retained(state: Arc<AppState>) {
    let period = state
        .config
        .retention
        .map_or(Duration::from_secs(60), |r| (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if let Some(retention) = state.config.retention {
            match state.queue.expire_finished(retention) {
                Ok(ids) => ids.iter().for_each(|id| state.files.remove_key(id)),
                Err(e) => tracing::error!(error = %e, "expiring finished requests"),
            }
            // Uploads, and images of requests that are gone (a `/run/` answered long ago).
            let queue = &state.queue;
            state.files.expire(retention, |key| queue.contains(key).unwrap_or(true));
        }
        state.uploads.expire(Duration::from_secs(3600));
        state.cdn_tokens.expire();
    }
}

/// An exclusive lock on a storage folder: two servers on one folder would both take its
/// queued requests and each restart the other's running one.
#[derive(Debug)]
struct StorageLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl StorageLock {
    fn acquire(root: &Path) -> Result<Self, ServerError> {
        let path = root.join("server.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| ServerError::Config(format!("storage folder {}: {e}", root.display())))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is passed.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if !locked {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(ServerError::Config(format!(
                    "storage folder {} is in use by another pixart serve ({}); give each server its own --storage-dir",
                    root.display(),
                    holder.trim()
                )));
            }
        }
        let _ = std::fs::write(&path, format!("pid {}", std::process::id()));
        Ok(Self { _file: file, path })
    }
}

impl Drop for StorageLock {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, "");
    }
}
