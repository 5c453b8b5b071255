//! `pixart serve`.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pixart_server::{QueueBackend, Storage};

use crate::job_args::{parse_duration, parse_retention, JobArgs, Retention};
use crate::model_args::ModelArgs;

/// Arguments of `pixart serve`. Every flag can also be set by the environment variable shown.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    jobs: JobArgs,
    /// How long finished results and their images stay available: e.g. 30m, 24h, 7d, or
    /// "forever" (never deleted).
    #[arg(long, env = "PIXART_RESULT_RETENTION", default_value = "24h", value_parser = parse_retention)]
    result_retention: Retention,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, env = "PIXART_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, env = "PIXART_PORT", default_value_t = 8000)]
    port: u16,
    /// The app id clients call (`owner/alias`).
    #[arg(long, env = "PIXART_APP_ID", default_value = "fal-ai/pixart-sigma")]
    app_id: String,
    /// Require `Authorization: Key <API_KEY>` on every API call (the clients send their FAL_KEY).
    #[arg(long, env = "PIXART_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most requests waiting in the queue; more get 429 (which the fal clients retry).
    #[arg(long, env = "PIXART_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Largest JSON request body, in bytes.
    #[arg(long, env = "PIXART_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    max_request_bytes: usize,
    /// Largest uploaded file, in bytes.
    #[arg(long, env = "PIXART_MAX_UPLOAD_BYTES", default_value_t = 100 << 20)]
    max_upload_bytes: usize,
    /// Keep nothing across restarts: a temporary folder removed on exit; on shutdown queued
    /// requests fail (ServerShutdown) instead of waiting for the next start.
    #[arg(long, env = "PIXART_TEMPORARY_STORAGE", value_parser = clap::builder::FalseyValueParser::new(), conflicts_with = "storage_dir")]
    temporary_storage: bool,
    /// Browser origins allowed to call the API (CORS), e.g. `https://app.example.com`; repeat the
    /// flag or separate with commas; * allows any. Default: none (no CORS headers).
    #[arg(long, env = "PIXART_CORS_ORIGIN", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Longest a client may take to send a request's headers (slowloris defence).
    #[arg(long, env = "PIXART_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Refuse (408) and close a request whose body pauses this long between chunks.
    #[arg(long, env = "PIXART_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Refuse (408) a request whose whole JSON body has not arrived within this long (a body
    /// trickled a byte at a time holds no memory for longer); uploads are bounded by
    /// --idle-timeout only.
    #[arg(long, env = "PIXART_BODY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    body_timeout: Duration,
    /// Most connections open at once (with --max-request-bytes, a bound on the memory bodies
    /// can take); further clients wait in the listen queue until one closes.
    #[arg(long, env = "PIXART_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Bytes all JSON bodies being received may hold together (at least --max-request-bytes);
    /// a body that would go past it gets 503 (fal's clients retry it).
    #[arg(long, env = "PIXART_MAX_BODY_MEMORY", default_value_t = 64 << 20)]
    max_body_memory: usize,
    /// The queue, shared with other fronts and workers: redis://HOST:PORT[/DB]. Default: an
    /// embedded one in the storage folder (this server only).
    #[arg(long, env = "PIXART_QUEUE")]
    queue: Option<String>,
    /// Generation workers in this process: 1, or 0 for an HTTP front only (with --queue; the
    /// jobs are run by `pixart worker` processes). The model is not loaded with 0.
    #[arg(long, env = "PIXART_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    workers: u8,
}

/// The queue the flags name.
pub fn queue_backend(queue: Option<&str>) -> QueueBackend {
    queue.map_or(QueueBackend::Embedded, |url| QueueBackend::Redis(url.to_string()))
}

/// The async runtime a server or worker runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Logs to stderr at RUST_LOG's level (info by default).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs `pixart serve` until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    let storage = if args.temporary_storage { Some(Storage::Temporary) } else { None };
    let mut config = args.jobs.config(storage);
    config.app_id.clone_from(&args.app_id);
    config.max_queue = args.max_queue;
    config.max_request_bytes = args.max_request_bytes;
    config.max_upload_bytes = args.max_upload_bytes;
    config.api_key.clone_from(&args.api_key);
    config.cors_origins.clone_from(&args.cors_origin);
    config.header_read_timeout = args.header_read_timeout;
    config.idle_timeout = args.idle_timeout;
    config.body_timeout = args.body_timeout;
    config.max_connections = args.max_connections;
    config.max_body_memory = args.max_body_memory;
    config.queue = queue_backend(args.queue.as_deref());
    config.retention = args.result_retention.0;
    // Bad settings, or a folder another server holds, fail now, not after loading gigabytes of
    // weights; the folder stays held from here.
    let claim = pixart_server::check_storage(&config)?;
    if args.workers == 0 && config.queue == QueueBackend::Embedded {
        anyhow::bail!("--workers 0 needs a shared queue (--queue redis://HOST:PORT): nothing would run the jobs");
    }
    init_logging();

    let options = args.jobs.load_options(&args.model)?;
    runtime()?.block_on(async move {
        // Bind first: a taken port fails at once, not after loading gigabytes of weights.
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let pipeline = if args.workers > 0 {
            tracing::info!(model = %args.model.model, "loading the model");
            Some(args.model.load_pipeline(&options)?)
        } else {
            None
        };
        let address = listener.local_addr()?;
        let stop = shutdown_signal();
        tracing::info!(app = %config.app_id, "listening on http://{address}");
        crate::emit(&format!("pixart serve: listening on http://{address}"))?;
        let report =
            pixart_server::serve(pipeline, args.model.model.clone(), config, Some(claim), listener, stop).await?;
        tracing::info!(requests = ?report.counters, "server stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called (not when the
/// future is first polled), so call it before announcing readiness: a signal sent right after
/// `listening on` stops the process gracefully rather than with the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let (mut interrupt, mut terminate) = signals;
            let interrupted = async {
                match interrupt.as_mut() {
                    Some(s) => drop(s.recv().await),
                    None => std::future::pending::<()>().await,
                }
            };
            let terminated = async {
                match terminate.as_mut() {
                    Some(s) => drop(s.recv().await),
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = interrupted => {},
                () = terminated => {},
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
