//! [`Queue`]: the job store plus what belongs to one process: wake-ups for the worker and for
//! status streams, the stop flags of the jobs this process runs, counters, latency histograms,
//! the webhook sender, and the progress of running jobs on its way to the store.
//!
//! Every store call is async. The worker's step loop never waits on the store: its log lines and
//! step durations go through a channel to [`Queue::write_progress`], a task that writes them in
//! batches (and retries them through a store outage), and a cancel made elsewhere reaches its stop
//! flag through a watcher task, so a GPU never waits on Redis between steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use backon::Retryable;
use pixart_fal::GenerateRequest;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::ballast::Ballast;
use super::counters::Counters;
use super::job::{Failure, JobView, LogLine, NewJob, Outcome, StopFlag, StopReason};
use super::metrics::{Latencies, Latency};
use super::retry::RetryPolicy;
use super::store::{CancelResult, JobStore, PendingWebhook, QueueStats, Recovery, StoreError, SubmitError};
use super::webhook::WebhookSender;

/// Starts allowed for a job that keeps being interrupted (server killed while running it)
/// before it fails with [`super::job::FailureKind::Interrupted`].
pub const MAX_ATTEMPTS: u32 = 3;

/// How often a job running here asks a shared store whether it was cancelled elsewhere.
const STOP_POLL: Duration = Duration::from_millis(500);

/// Why a submit was refused.
#[derive(Debug, thiserror::Error)]
pub enum RefusedSubmit {
    /// Queue full or store failure.
    #[error(transparent)]
    Store(#[from] SubmitError),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The store cannot record requests now (see [`Queue::problem`]).
    #[error("requests cannot be recorded now: {0}")]
    StoreProblem(String),
}

/// A job this process is running.
#[derive(Debug)]
pub struct WorkItem {
    /// The request id.
    pub id: String,
    /// The claim's token (see [`super::store::Claimed::token`]).
    pub token: String,
    /// Its input.
    pub request: GenerateRequest,
    /// Which start this is (more than 1 after restarts).
    pub attempt: u32,
    /// Set when it should stop.
    pub stop: Arc<StopFlag>,
    /// `scheme://host` it was submitted on.
    pub base_url: String,
    submitted: SystemTime,
}

/// What the compute thread reports, written to the store by [`Queue::write_progress`].
#[derive(Debug)]
pub enum Progress {
    /// A job started here; its next log line has number `next_line`.
    Started {
        /// The request id.
        id: String,
        /// The claim's token.
        token: String,
        /// Lines it already has.
        next_line: usize,
    },
    /// A log line of a job running here.
    Log {
        /// The request id.
        id: String,
        /// The line.
        line: LogLine,
    },
    /// A latency observation.
    Observe(Latency, Duration),
    /// Answered once everything sent before it for the job is stored (or given up on); the
    /// job's log is then closed.
    Flush {
        /// The request id.
        id: String,
        /// Answered when done.
        done: oneshot::Sender<()>,
    },
}

#[derive(Debug, Default)]
struct Local {
    counters: Counters,
    latencies: Latencies,
    /// Jobs this process runs: their stop flags and claim tokens.
    running: HashMap<String, (Arc<StopFlag>, String)>,
}

/// The queue as this process sees it.
#[derive(Debug)]
pub struct Queue {
    store: Arc<dyn JobStore>,
    max_queue: usize,
    closed: AtomicBool,
    local: Mutex<Local>,
    work: Notify,
    changes: watch::Sender<u64>,
    webhooks: Mutex<Option<WebhookSender>>,
    progress: mpsc::UnboundedSender<Progress>,
    /// What keeps the store from recording requests now (its file gone, the disk full): while
    /// set, health is unhealthy and submits are refused.
    problem: Mutex<Option<String>>,
    /// Space held for the store on its disk, given up when it cannot record a job's end.
    ballast: std::sync::OnceLock<Ballast>,
}

impl Queue {
    /// A queue over `store` whose webhooks go out through `webhooks`; at most `max_queue` jobs
    /// wait. The receiver is for [`Queue::write_progress`], which must run for as long as jobs
    /// do. Call [`Queue::recover`] once before serving.
    pub fn new(
        store: Arc<dyn JobStore>,
        max_queue: usize,
        webhooks: WebhookSender,
    ) -> (Self, mpsc::UnboundedReceiver<Progress>) {
        let (progress, reports) = mpsc::unbounded_channel();
        let queue = Self {
            store,
            max_queue,
            closed: AtomicBool::new(false),
            local: Mutex::new(Local::default()),
            work: Notify::new(),
            changes: watch::channel(0).0,
            webhooks: Mutex::new(Some(webhooks)),
            progress,
            problem: Mutex::new(None),
            ballast: std::sync::OnceLock::new(),
        };
        (queue, reports)
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requeues or fails what was running when the store was last used, and resends the
    /// webhooks that were not delivered.
    pub async fn recover(&self) -> Result<Recovery, StoreError> {
        let recovery = self.store.recover(MAX_ATTEMPTS).await?;
        for hook in self.store.pending_webhooks().await? {
            self.send_webhook(hook);
        }
        Ok(recovery)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    /// A receiver that sees every change of any job.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn send_webhook(&self, hook: PendingWebhook) {
        match &*self.webhooks.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(sender) => sender.send(hook),
            // Still pending in the store: the next start delivers it.
            None => tracing::warn!(request_id = %hook.job_id, "webhook left for the next start"),
        }
    }

    /// Accepts a job; returns its queue position (`None`: ended at once, invalid input).
    pub async fn submit(&self, job: NewJob) -> Result<Option<usize>, RefusedSubmit> {
        if self.is_closed() {
            return Err(RefusedSubmit::ShuttingDown);
        }
        if let Some(problem) = self.problem() {
            return Err(RefusedSubmit::StoreProblem(problem));
        }
        let invalid = job.input.as_ref().err().cloned();
        let submitted = self.store.submit(job, self.max_queue).await?;
        let mut delta = Counters { accepted: 1, ..Counters::default() };
        if let Some(failure) = invalid {
            delta.add(&Counters::ended(&Outcome::Failed(failure)));
        }
        self.count(&delta);
        if let Some(hook) = submitted.webhook {
            self.send_webhook(hook);
        }
        self.work.notify_one();
        self.changed();
        Ok(submitted.position)
    }

    /// Holds `ballast` for the store (given up when the store cannot record a job's end).
    pub fn keep_ballast(&self, ballast: Ballast) {
        let _ = self.ballast.set(ballast);
    }

    /// The store's ballast, if it has one.
    pub fn ballast(&self) -> Option<&Ballast> {
        self.ballast.get()
    }

    /// What keeps the store from recording requests now, if anything.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks the store (and takes `disk`, a problem of the storage disk found by the caller):
    /// sets or clears [`Queue::problem`], with a log line whenever it changes.
    pub async fn check_store(&self, disk: Option<String>) {
        let store = match self.store.check().await {
            Ok(()) | Err(StoreError::Unavailable(_)) => None,
            Err(e) => Some(e.to_string()),
        };
        let now = match (store, disk) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        let mut problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if *problem != now {
            match &now {
                Some(text) => {
                    tracing::error!(problem = %text, "the job store cannot record requests: unhealthy, refusing submits")
                }
                None => tracing::info!("the job store records requests again: healthy"),
            }
            *problem = now;
            drop(problem);
            self.changed();
        }
    }

    /// Waits until a job can start (returns it) or the queue is closed (`None`). Also looks
    /// every 250 ms, for jobs that other processes sharing the store queued.
    pub async fn next_work(&self) -> Option<WorkItem> {
        loop {
            if self.is_closed() {
                return None;
            }
            // Registered before looking, so a submit that lands while the store is being asked
            // still wakes us.
            let woken = self.work.notified();
            match self.store.claim(SystemTime::now()).await {
                Ok(Some(claimed)) => {
                    let stop = Arc::new(StopFlag::default());
                    self.local().running.insert(claimed.id.clone(), (stop.clone(), claimed.token.clone()));
                    let started = Progress::Started {
                        id: claimed.id.clone(),
                        token: claimed.token.clone(),
                        next_line: claimed.log_count,
                    };
                    let _ = self.progress.send(started);
                    self.count(&Counters { started: 1, ..Counters::default() });
                    self.changed();
                    if self.store.is_shared() {
                        tokio::spawn(watch_stop(
                            self.store.clone(),
                            claimed.id.clone(),
                            claimed.token.clone(),
                            stop.clone(),
                        ));
                    }
                    return Some(WorkItem {
                        id: claimed.id,
                        token: claimed.token,
                        request: claimed.request,
                        attempt: claimed.attempt,
                        stop,
                        base_url: claimed.base_url,
                        submitted: claimed.submitted,
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "taking the next request failed; retrying"),
            }
            if !self.is_closed() {
                let _ = tokio::time::timeout(Duration::from_millis(250), woken).await;
            }
        }
    }

    /// Adds a log line to a job this process runs. Never waits: the line is stored by
    /// [`Queue::write_progress`].
    pub fn log(&self, item: &WorkItem, line: LogLine) {
        let _ = self.progress.send(Progress::Log { id: item.id.clone(), line });
    }

    /// Records the duration of one denoising step. Never waits.
    pub fn observe_step(&self, duration: Duration) {
        self.local().latencies.observe(Latency::Step, duration);
        if self.store.is_shared() {
            let _ = self.progress.send(Progress::Observe(Latency::Step, duration));
        }
    }

    /// Writes what running jobs report (log lines in batches, latencies) to the store until the
    /// queue is dropped. A batch the store refuses while unavailable is retried through the
    /// outage ([`RetryPolicy::store_outage`]); log lines carry their numbers, so a retried batch
    /// adds no line twice.
    pub async fn write_progress(&self, mut reports: mpsc::UnboundedReceiver<Progress>) {
        // Per running job: claim token, number of the next line to store, lines not yet stored.
        let mut logs: HashMap<String, (String, usize, Vec<LogLine>)> = HashMap::new();
        while let Some(first) = reports.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = reports.try_recv() {
                batch.push(more);
            }
            let mut flushed = Vec::new();
            for report in batch {
                match report {
                    Progress::Started { id, token, next_line } => {
                        logs.insert(id, (token, next_line, Vec::new()));
                    }
                    Progress::Log { id, line } => {
                        if let Some((_, _, pending)) = logs.get_mut(&id) {
                            pending.push(line);
                        }
                    }
                    Progress::Observe(which, value) => {
                        if let Err(e) = self.store.observe(which, value).await {
                            tracing::warn!(error = %e, "shared latency not recorded");
                        }
                    }
                    Progress::Flush { id, done } => flushed.push((id, done)),
                }
            }
            for (id, (token, next, pending)) in &mut logs {
                if pending.is_empty() {
                    continue;
                }
                let write = || self.store.append_logs(id, token, *next, pending);
                let stored = write
                    .retry(RetryPolicy::store_outage().backoff())
                    .when(|e| matches!(e, StoreError::Unavailable(_)))
                    .await;
                if let Err(e) = stored {
                    tracing::warn!(request_id = %id, error = %e, lines = pending.len(), "log lines not stored");
                }
                *next += pending.len();
                pending.clear();
            }
            for (id, done) in flushed {
                logs.remove(&id);
                let _ = done.send(());
            }
            self.changed();
        }
    }

    /// Waits until every line a job running here has reported is stored.
    async fn flush(&self, id: &str) {
        let (done, stored) = oneshot::channel();
        if self.progress.send(Progress::Flush { id: id.to_string(), done }).is_ok() {
            let _ = stored.await;
        }
    }

    /// Whether the job should stop after this step: cancelled here or through the store (by
    /// another front, seen by the job's watcher), or the server is stopping. Never waits.
    pub fn stop_reason(&self, item: &WorkItem) -> StopReason {
        item.stop.reason()
    }

    /// Records how a job this process ran ended (after its log lines) and sends its webhook.
    /// Returns `false` when the store refused that outcome (a full disk) and the job was ended
    /// as failed instead (its files should go).
    pub async fn finish(&self, item: &WorkItem, outcome: Outcome) -> Result<bool, StoreError> {
        self.flush(&item.id).await;
        // A store that is down for a moment (Redis restarting) must not lose a finished
        // generation.
        let finish = || self.store.finish(&item.id, &item.token, &outcome);
        let finished =
            finish.retry(RetryPolicy::store_outage().backoff()).when(|e| matches!(e, StoreError::Unavailable(_))).await;
        let (finished, outcome, as_given) = match finished {
            Err(e) if !matches!(e, StoreError::Unavailable(_)) => {
                // The store refused the outcome (a full disk, a result too large): end the job
                // as failed, a small record, retried until the store takes it.
                tracing::error!(request_id = %item.id, error = %e, "the result could not be recorded; ending the request as failed");
                if let Some(ballast) = self.ballast.get() {
                    if ballast.release().await {
                        tracing::warn!("gave up the storage folder's reserve file to record the end");
                    }
                }
                let message = match outcome.failure() {
                    Some(failure) => format!("{} (and recording it failed: {e})", failure.message),
                    None => format!("the result could not be recorded: {e}"),
                };
                let failed = Outcome::Failed(Failure::new(super::job::FailureKind::Storage, message));
                let finish = || self.store.finish(&item.id, &item.token, &failed);
                (finish.retry(RetryPolicy::store_outage().backoff()).await, failed, false)
            }
            finished => (finished, outcome, true),
        };
        self.local().running.remove(&item.id);
        self.changed();
        let finished = finished?;
        if !finished.applied {
            // Ended meanwhile (its lease ran out and it went to another worker, or it was
            // forgotten): that end stands, this one is not counted.
            tracing::warn!(request_id = %item.id, "the request had already ended elsewhere; this result is dropped");
            return Ok(true);
        }
        self.observe(Latency::Request, SystemTime::now().duration_since(item.submitted).unwrap_or_default()).await;
        self.count(&Counters::ended(&outcome));
        if let Some(hook) = finished.webhook {
            self.send_webhook(hook);
        }
        Ok(as_given)
    }

    async fn observe(&self, which: Latency, value: Duration) {
        self.local().latencies.observe(which, value);
        if let Err(e) = self.store.observe(which, value).await {
            tracing::warn!(error = %e, "shared latency not recorded");
        }
    }

    /// Keeps this process' claims alive and picks up what dead processes left (stores shared
    /// by several processes): extends the leases of the jobs running here, gives back or fails
    /// jobs whose worker stopped answering, and sends webhooks whose sender died. Call it more
    /// often than the lease (the visibility timeout) runs out.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        let running: Vec<(String, String)> =
            self.local().running.iter().map(|(id, (_, token))| (id.clone(), token.clone())).collect();
        self.store.heartbeat(&running).await?;
        let ended = self.store.reap(MAX_ATTEMPTS).await?;
        if ended.count > 0 {
            let cancelled = ended.cancelled as u64;
            self.count(&Counters { cancelled, ..Counters::failed(ended.count - ended.cancelled) });
            self.changed();
        }
        for hook in ended.webhooks.into_iter().chain(self.store.orphaned_webhooks().await?) {
            self.send_webhook(hook);
        }
        // Deliveries waiting here behind a slow host keep their leases, so no other process
        // takes them over as orphaned.
        if self.store.is_shared() {
            let waiting = self.webhooks.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(WebhookSender::waiting);
            for delivery in waiting.unwrap_or_default() {
                self.store.webhook_started(delivery).await?;
            }
        }
        Ok(())
    }

    /// Gives a job this process was running back to the queue (graceful shutdown of a durable
    /// server: it runs again after the restart).
    pub async fn release(&self, item: &WorkItem) -> Result<(), StoreError> {
        self.flush(&item.id).await;
        self.local().running.remove(&item.id);
        self.changed();
        self.store.release(&item.id, &item.token).await
    }

    /// Cancels a job: a queued one ends at once, a running one stops after its current step.
    pub async fn cancel(&self, id: &str) -> Result<CancelResult, StoreError> {
        let result = self.store.cancel(id).await?;
        match &result {
            CancelResult::Dequeued(hook) => {
                self.count(&Counters { cancelled: 1, ..Counters::default() });
                if let Some(hook) = hook.clone() {
                    self.send_webhook(hook);
                }
            }
            CancelResult::StopRequested => {
                if let Some((flag, _)) = self.local().running.get(id) {
                    flag.request(StopReason::Cancelled);
                }
            }
            CancelResult::NotFound | CancelResult::AlreadyCompleted => {}
        }
        self.changed();
        Ok(result)
    }

    /// A job with its log lines from `logs_from` on.
    pub async fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
        self.store.view(id, logs_from).await
    }

    /// Forgets a job (a synchronous one, once answered).
    pub async fn forget(&self, id: &str) -> Result<(), StoreError> {
        self.store.forget(id).await
    }

    /// Whether a job is known.
    pub async fn contains(&self, id: &str) -> Result<bool, StoreError> {
        self.store.contains(id).await
    }

    /// Fails queued jobs past their start deadline (their slots free up, their webhooks go).
    pub async fn expire_deadlines(&self) -> Result<usize, StoreError> {
        let ended = self.store.expire_deadlines(SystemTime::now()).await?;
        if ended.count == 0 {
            return Ok(0);
        }
        self.count(&Counters::failed(ended.count));
        for hook in ended.webhooks {
            self.send_webhook(hook);
        }
        self.changed();
        Ok(ended.count)
    }

    /// Forgets jobs that ended more than `retention` ago; returns their ids.
    pub async fn expire_finished(&self, retention: Duration) -> Result<Vec<String>, StoreError> {
        let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        self.store.expire_finished(cutoff).await
    }

    /// Refuses new jobs from now on. With `fail_queued` (storage that does not outlive the
    /// process) every queued job fails with [`super::job::FailureKind::Shutdown`]; otherwise they stay
    /// queued for the next start.
    pub async fn close(&self, fail_queued: bool) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::SeqCst);
        self.work.notify_waiters();
        let result = if fail_queued {
            match self.store.fail_queued(&Failure::stopped(StopReason::Shutdown, false)).await {
                Ok(ended) => {
                    self.count(&Counters::failed(ended.count));
                    for hook in ended.webhooks {
                        self.send_webhook(hook);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        self.work.notify_waiters();
        self.changed();
        result
    }

    /// Whether [`Queue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Asks every job this process runs to stop.
    pub fn stop_running(&self, reason: StopReason) {
        for (flag, _) in self.local().running.values() {
            flag.request(reason);
        }
    }

    /// Whether this process is running a job.
    pub fn busy(&self) -> bool {
        !self.local().running.is_empty()
    }

    /// Stops the webhook sender (pending deliveries it had not taken stay in the store).
    pub fn stop_webhooks(&self) -> Option<WebhookSender> {
        self.webhooks.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Counts events of this process (a shared store counts them itself, with the state change).
    fn count(&self, delta: &Counters) {
        self.local().counters.add(delta);
    }

    /// Counters: of every process sharing the store (since the store was created) when it keeps
    /// them, else of this process since it started.
    pub async fn counters(&self) -> Result<Counters, StoreError> {
        Ok(self.store.counters().await?.unwrap_or_else(|| self.local().counters))
    }

    /// This process' counters since it started.
    pub fn local_counters(&self) -> Counters {
        self.local().counters
    }

    /// Latency histograms: of every process sharing the store when it keeps them, else of
    /// this process.
    pub async fn latencies(&self) -> Result<Latencies, StoreError> {
        Ok(self.store.latencies().await?.unwrap_or_else(|| self.local().latencies.clone()))
    }

    /// Queue length and running jobs (every process sharing the store).
    pub async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.store.stats().await
    }
}

/// Until its job ends here, asks a shared store every [`STOP_POLL`] whether it should stop (a
/// cancel handled by another front, or the job taken over), and sets its stop flag.
async fn watch_stop(store: Arc<dyn JobStore>, id: String, token: String, stop: Arc<StopFlag>) {
    // The flag's only holders are the worker and this task: alone, the job ended here.
    while Arc::strong_count(&stop) > 1 && stop.reason() == StopReason::None {
        tokio::time::sleep(STOP_POLL).await;
        if let Ok(true) = store.stop_requested(&id, &token).await {
            stop.request(StopReason::Cancelled);
        }
    }
}
