//! `pixart worker`: runs jobs of a shared queue, without HTTP.

use anyhow::Result;
use clap::Args;

use crate::job_args::JobArgs;
use crate::model_args::ModelArgs;
use crate::serve::{init_logging, queue_backend, runtime, shutdown_signal};

/// Arguments of `pixart worker`. Every flag can also be set by the environment variable shown.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    jobs: JobArgs,
    /// The shared queue: redis://HOST:PORT[/DB].
    #[arg(long, env = "PIXART_QUEUE")]
    queue: String,
}

/// Runs `pixart worker` until Ctrl-C or SIGTERM.
pub fn run(args: WorkerArgs) -> Result<()> {
    let mut config = args.jobs.config(None);
    config.queue = queue_backend(Some(&args.queue));
    // A worker holds no folder lock (the queue is shared): this checks the settings.
    drop(pixart_server::check_storage(&config)?);
    init_logging();
    let options = args.jobs.load_options(&args.model)?;
    runtime()?.block_on(async move {
        tracing::info!(model = %args.model.model, "loading the model");
        let pipeline = args.model.load_pipeline(&options)?;
        let stop = shutdown_signal();
        crate::emit(&format!("pixart worker: working jobs of {}", args.queue))?;
        let report = pixart_server::work(pipeline, args.model.model.clone(), config, stop).await?;
        tracing::info!(requests = ?report.counters, "worker stopped");
        Ok(())
    })
}
