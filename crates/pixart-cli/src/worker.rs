//! `pixart worker`: runs jobs of a shared queue, without HTTP.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pixart_server::{ServerConfig, Storage};

use crate::model_args::ModelArgs;
use crate::serve::{init_logging, parse_duration, parse_retention, queue_backend, shutdown_signal, Retention};

/// Arguments of `pixart worker`. Every flag can also be set by the environment variable shown.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The shared queue: redis://HOST:PORT[/DB].
    #[arg(long, env = "PIXART_QUEUE")]
    queue: String,
    /// The storage folder the HTTP fronts serve images from (the same folder, or a shared file
    /// system across hosts). Default: $XDG_DATA_HOME/pixart/serve, else ~/.local/share/pixart/serve.
    #[arg(long, env = "PIXART_STORAGE_DIR")]
    storage_dir: Option<PathBuf>,
    /// A running job whose worker shows no sign of life for this long is given to another
    /// worker; this worker extends its lease every third of it.
    #[arg(long, env = "PIXART_VISIBILITY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    visibility_timeout: Duration,
    /// How long finished results and their images stay (the same as the fronts').
    #[arg(long, env = "PIXART_RESULT_RETENTION", default_value = "24h", value_parser = parse_retention)]
    result_retention: Retention,
    /// On SIGTERM: how long the running job may take to finish before it goes back to the queue.
    #[arg(long, env = "PIXART_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// How long one webhook POST may take.
    #[arg(long, env = "PIXART_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    webhook_timeout: Duration,
    /// Also POST webhooks to loopback, private and link-local addresses.
    #[arg(long, env = "PIXART_ALLOW_PRIVATE_WEBHOOKS", value_parser = clap::builder::FalseyValueParser::new())]
    allow_private_webhooks: bool,
    /// Prompt encodings kept in memory (repeated prompts skip T5).
    #[arg(long, env = "PIXART_PROMPT_CACHE", default_value_t = 16)]
    prompt_cache: usize,
}

/// Runs `pixart worker` until Ctrl-C or SIGTERM.
pub fn run(args: WorkerArgs) -> Result<()> {
    let config = ServerConfig {
        queue: queue_backend(Some(&args.queue)),
        storage: args.storage_dir.clone().map_or(Storage::UserData, Storage::Dir),
        visibility_timeout: args.visibility_timeout,
        retention: args.result_retention.0,
        shutdown_grace: args.shutdown_grace,
        webhook_timeout: args.webhook_timeout,
        allow_private_webhooks: args.allow_private_webhooks,
        ..ServerConfig::default()
    };
    config.validate()?;
    init_logging();
    let mut options = args.model.load_options()?;
    options.prompt_cache_size = args.prompt_cache;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        tracing::info!(model = %args.model.model, "loading the model");
        let pipeline = args.model.load_pipeline(&options)?;
        crate::emit(&format!("pixart worker: working jobs of {}", args.queue))?;
        let report = pixart_server::work(pipeline, args.model.model.clone(), config, shutdown_signal()).await?;
        tracing::info!(requests = ?report.counters, "worker stopped");
        Ok(())
    })
}
