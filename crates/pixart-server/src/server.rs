//! A server's life: open its storage, recover what the last run left, serve, shut down
//! gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pixart_pipeline::Pipeline;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::{QueueBackend, ServerConfig};
use crate::core::ballast::Ballast;
use crate::core::cdn_tokens::CdnTokens;
use crate::core::files::FileStore;
use crate::core::image_source::{ImageRules, ImageSource};
use crate::core::lora_source::{LoraRules, LoraSource};
use crate::core::remote_file::FetchRules;
use crate::core::retry::RetryPolicy;
use crate::core::sweeper::Sweeper;
use crate::core::uploads::Uploads;
use crate::core::webhook::{WebhookSender, WebhookThreads};
use crate::core::worker::WorkerContext;
use crate::core::{Counters, JobStore, Progress, Queue, Recovery, RedisStore, SqliteStore, StopReason};
use crate::state::AppState;
use crate::ServerError;

/// What happened over the server's life.
#[derive(Debug, Clone, Copy)]
pub struct ServeReport {
    /// This process' request counters at exit.
    pub counters: Counters,
    /// What was found in the storage folder (or the shared queue) at start.
    pub recovery: Recovery,
}

/// Serves fal's API on `listener` until `shutdown` resolves, generating with `pipeline` (`None`:
/// an HTTP front only, for a shared queue whose jobs `pixart worker` processes run), then shuts
/// down gracefully: new requests are refused (503), the one being generated gets
/// `config.shutdown_grace` to finish, and the webhooks due get as long again to be delivered
/// (those left stay pending for the next start).
///
/// With durable storage (the default, see [`crate::Storage`]) or a shared queue, queued requests
/// stay queued and a request stopped at the end of the grace period is queued again: both run
/// after the next start (or on another worker), as do requests that were running when a
/// previous server was killed. With [`crate::Storage::Temporary`] they fail with
/// `ServerShutdown` instead.
///
/// `claim` is [`check_storage`]'s for this `config` (taken before the model was loaded); `None`
/// claims the folder here.
pub async fn serve(
    pipeline: Option<Pipeline>,
    model: String,
    config: ServerConfig,
    claim: Option<StorageClaim>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeReport, ServerError> {
    let local_addr = listener.local_addr()?;
    run(pipeline, model, config, claim, Some(listener), local_addr, shutdown).await
}

/// Works jobs of a shared queue ([`crate::QueueBackend::Redis`]) without serving HTTP, until
/// `shutdown` resolves; then the running job gets `config.shutdown_grace` to finish, else goes
/// back to the queue for another worker.
pub async fn work(
    pipeline: Pipeline,
    model: String,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeReport, ServerError> {
    if config.queue == QueueBackend::Embedded {
        return Err(ServerError::Config(
            "queue: a worker without HTTP needs a shared queue (--queue redis://HOST:PORT)".into(),
        ));
    }
    run(Some(pipeline), model, config, None, None, SocketAddr::from(([0, 0, 0, 0], 0)), shutdown).await
}

/// How long a webhook delivery may take, all attempts and pauses included, before another
/// process may take it over.
fn webhook_lease(config: &ServerConfig) -> Duration {
    let retries = RetryPolicy::webhook(config.webhook_attempts);
    config.webhook_timeout * (retries.retries as u32 + 1) + retries.total_pause() + Duration::from_secs(5)
}

/// The storage folder, the job store on it (or on Redis) and, for the embedded store, the
/// folder's lock.
async fn open_store(
    config: &ServerConfig,
    claim: Option<StorageClaim>,
) -> Result<(PathBuf, Arc<dyn JobStore>, Option<StorageLock>), ServerError> {
    let storage = config.storage.clone();
    let root = crate::state::blocking(move || storage.create()).await??;
    match &config.queue {
        QueueBackend::Embedded => {
            let lock = match claim.and_then(|claim| claim.lock) {
                Some(lock) if lock.root == root => lock,
                _ => {
                    let folder = root.clone();
                    crate::state::blocking(move || StorageLock::acquire(&folder)).await??
                }
            };
            let path = root.join("jobs.sqlite3");
            let store = crate::state::blocking(move || SqliteStore::open(&path)).await??;
            Ok((root, Arc::new(store), Some(lock)))
        }
        QueueBackend::Redis(url) => {
            let store = RedisStore::open(url, config.visibility_timeout, webhook_lease(config)).await?;
            Ok((root, Arc::new(store), None))
        }
    }
}

/// The server's shared state over its store, with what the last run left recovered, and the
/// webhook sender's threads.
async fn start_state(
    config: ServerConfig,
    model: String,
    root: &Path,
    store: Arc<dyn JobStore>,
    local_addr: SocketAddr,
) -> Result<(Arc<AppState>, mpsc::UnboundedReceiver<Progress>, Recovery, WebhookThreads), ServerError> {
    let durable = config.storage.is_durable() || config.queue != QueueBackend::Embedded;
    let folder = root.join("files");
    let files = crate::state::blocking(move || FileStore::open(&folder)).await??;
    tracing::info!(folder = %root.display(), queue = ?config.queue, durable, "storing requests, generated images and uploads");
    let retries = RetryPolicy::webhook(config.webhook_attempts);
    let (webhooks, threads) =
        WebhookSender::start(store.clone(), retries, config.webhook_timeout, config.allow_private_webhooks)?;
    let (queue, progress) = Queue::new(store, config.max_queue, webhooks);
    if config.queue == QueueBackend::Embedded {
        let ballast = Ballast::new(&root.join("reserve.bin"));
        match crate::state::blocking(move || ballast.ensure().map(|_| ballast)).await? {
            Ok(ballast) => queue.keep_ballast(ballast),
            Err(e) => tracing::warn!(error = %e, "the storage folder's reserve file could not be written"),
        }
    }
    let recovery = queue.recover().await?;
    if recovery != Recovery::default() {
        tracing::info!(?recovery, "resuming what was left");
    }
    let rules = LoraRules {
        local_dir: config.lora_dir.clone(),
        any_local_path: false,
        allow_private: config.allow_private_webhooks,
        max_bytes: config.max_lora_bytes,
        timeout: config.lora_timeout,
    };
    let files = Arc::new(files);
    let loras = Arc::new(LoraSource::new(rules, Some(files.clone()), Some(root.join("loras"))));
    let fetch = FetchRules {
        allow_private: config.allow_private_webhooks,
        max_bytes: config.max_image_bytes,
        timeout: config.image_timeout,
    };
    let rules = ImageRules { any_local_path: false, fetch, decode: pixart_fal::DecodeLimits::default() };
    let images = Arc::new(ImageSource::new(rules, Some(files.clone())));
    let config_body_memory = config.max_body_memory;
    let state = Arc::new(AppState {
        local_addr,
        loras,
        images,
        uploads: Arc::new(Uploads::new(root.join(".upload-parts"))),
        cdn_tokens: Arc::new(CdnTokens::new(root.join(".cdn-tokens"))),
        config,
        model,
        queue: Arc::new(queue),
        files,
        started: Instant::now(),
        body_memory: Arc::new(tokio::sync::Semaphore::new(config_body_memory)),
    });
    Ok((state, progress, recovery, threads))
}

/// The generation worker, on a thread of its own (the pipeline is blocking compute).
fn spawn_worker(pipeline: Pipeline, state: &Arc<AppState>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let durable = state.config.storage.is_durable() || state.config.queue != QueueBackend::Embedded;
    let (state, runtime) = (state.clone(), tokio::runtime::Handle::current());
    std::thread::Builder::new().name("pixart-worker".into()).spawn(move || {
        let context = WorkerContext {
            runtime,
            queue: &state.queue,
            files: &state.files,
            file_url: crate::http::file_url_path,
            loras: &state.loras,
            images: &state.images,
            durable,
        };
        crate::core::worker::run(&pipeline, &context);
    })
}

/// The sweeper task; an HTTP front also sweeps uploads and tokens, and expires results.
fn spawn_sweeper(state: &Arc<AppState>, http: bool, stop: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    let sweeper = Sweeper {
        queue: state.queue.clone(),
        files: state.files.clone(),
        uploads: http.then(|| (state.uploads.clone(), state.cdn_tokens.clone())),
        // Fronts expire results (and their images) for everyone: one retention, theirs.
        retention: if http { state.config.retention } else { None },
        maintain_every: (state.config.visibility_timeout / 3).max(Duration::from_millis(300)),
    };
    tokio::spawn(sweeper.run(stop))
}

/// Serves HTTP on `listener` until the returned sender is used (or dropped).
fn spawn_http(listener: TcpListener, state: &Arc<AppState>) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let router = crate::http::router(state.clone());
    let limits = crate::http::connections::ConnectionLimits {
        header_read_timeout: state.config.header_read_timeout,
        max_connections: state.config.max_connections,
    };
    let stopped = async move {
        let _ = http_stopped.await;
    };
    let task =
        tokio::spawn(crate::http::connections::serve(listener, router, limits, stopped, Duration::from_secs(10)));
    (stop_http, task)
}

/// What runs until the shutdown: the worker thread, the sweeper and HTTP tasks, the webhook
/// threads.
struct Running {
    worker: Option<std::thread::JoinHandle<()>>,
    sweeper: tokio::task::JoinHandle<()>,
    stop_sweeping: Arc<Notify>,
    webhooks: WebhookThreads,
    http: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

/// The graceful shutdown: refuse new requests, let the running one finish within the grace
/// period (else stop it), stop the sweeper, deliver every webhook due, close HTTP.
async fn shut_down(state: &AppState, running: Running, durable: bool) {
    tracing::info!(durable, "shutting down: refusing new requests");
    if let Err(e) = state.queue.close(!durable).await {
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
    if let Some(worker) = running.worker {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    running.stop_sweeping.notify_one();
    let _ = running.sweeper.await;
    // Close the webhook queue and give the deliveries the grace period; what is left stays
    // pending in the store for the next start.
    drop(state.queue.stop_webhooks());
    let (webhooks, grace) = (running.webhooks, state.config.shutdown_grace);
    let _ = tokio::task::spawn_blocking(move || webhooks.join(grace)).await;
    if let Some((stop_http, task)) = running.http {
        let _ = stop_http.send(());
        // `connections::serve` waits at most 10 s for open connections itself.
        let _ = task.await;
    }
}

async fn run(
    pipeline: Option<Pipeline>,
    model: String,
    config: ServerConfig,
    claim: Option<StorageClaim>,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeReport, ServerError> {
    config.validate()?;
    let (root, store, lock) = open_store(&config, claim).await?;
    // Whether queued and interrupted jobs outlive this process.
    let durable = config.storage.is_durable() || config.queue != QueueBackend::Embedded;
    let (state, progress, recovery, webhooks) = start_state(config, model, &root, store, local_addr).await?;
    let writer = {
        let queue = state.queue.clone();
        tokio::spawn(async move { queue.write_progress(progress).await })
    };
    let stop_sweeping = Arc::new(Notify::new());
    let running = Running {
        worker: pipeline.map(|pipeline| spawn_worker(pipeline, &state)).transpose()?,
        sweeper: spawn_sweeper(&state, listener.is_some(), stop_sweeping.clone()),
        stop_sweeping,
        webhooks,
        http: listener.map(|listener| spawn_http(listener, &state)),
    };
    shutdown.await;
    shut_down(&state, running, durable).await;
    writer.abort();
    let counters = state.queue.local_counters();
    drop(lock);
    if !state.config.storage.is_durable() {
        let (uploads, root) = (state.uploads.clone(), root.clone());
        let _ = crate::state::blocking(move || {
            uploads.cleanup();
            let _ = std::fs::remove_dir_all(&root);
        })
        .await;
    }
    tracing::info!(?counters, "stopped");
    Ok(ServeReport { counters, recovery })
}

/// Checks, before a long model load, that [`serve`] will be able to open its storage: the
/// settings are valid, the folder can be created and, with the embedded queue, no other server
/// holds it. The folder is then held from here: pass the claim to [`serve`], which keeps it
/// until it stops (another server started meanwhile is refused at once, not after its load).
pub fn check_storage(config: &ServerConfig) -> Result<StorageClaim, ServerError> {
    config.validate()?;
    config.storage.resolve()?;
    let lock = if config.queue == QueueBackend::Embedded && config.storage.is_durable() {
        Some(StorageLock::acquire(&config.storage.create()?)?)
    } else {
        None
    };
    Ok(StorageClaim { lock })
}

/// A storage folder held by this process, from [`check_storage`] to the end of [`serve`].
#[derive(Debug)]
pub struct StorageClaim {
    lock: Option<StorageLock>,
}

/// An exclusive lock on a storage folder: two servers on one folder would both take its
/// queued requests and each restart the other's running one.
#[derive(Debug)]
struct StorageLock {
    _file: std::fs::File,
    root: PathBuf,
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
        // An advisory lock (flock on Unix, LockFileEx on Windows), released when the process ends.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
                let holder = if holder.is_empty() { "pid not written yet".to_string() } else { holder };
                return Err(ServerError::Config(format!(
                    "storage folder {} is in use by another pixart serve ({}); give each server its own --storage-dir",
                    root.display(),
                    holder
                )));
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(ServerError::Config(format!("storage folder {}: cannot lock it: {e}", root.display())));
            }
        }
        // The holder's pid, written in place: the file is never empty while a holder runs
        // (a refused server reads it at any moment). A stale pid left behind is harmless:
        // the lock, released when the process ends, is what decides.
        // Fixed width: a shorter pid over a longer stale one leaves no stray digits.
        let pid = format!("pid {:>10}", std::process::id());
        let write = || -> std::io::Result<()> {
            use std::io::{Seek, Write};
            let mut handle = &file;
            handle.seek(std::io::SeekFrom::Start(0))?;
            handle.write_all(pid.as_bytes())?;
            file.set_len(pid.len() as u64)
        };
        let _ = write();
        Ok(Self { _file: file, root: root.to_path_buf() })
    }
}
