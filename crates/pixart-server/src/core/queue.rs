//! [`Queue`]: the job store plus what belongs to one process: wake-ups for the worker and for
//! status streams, the stop flags of the jobs this process runs, counters, latency histograms
//! and the webhook sender.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use pixart_fal::GenerateRequest;
use tokio::sync::watch;

use super::counters::Counters;
use super::job::{Failure, JobView, LogLine, NewJob, Outcome, StopFlag, StopReason};
use super::metrics::{Latencies, Latency};
use super::store::{CancelResult, JobStore, PendingWebhook, QueueStats, Recovery, StoreError, SubmitError};
use super::webhook::WebhookSender;

/// Starts allowed for a job that keeps being interrupted (server killed while running it)
/// before it fails with [`super::job::FailureKind::Interrupted`].
pub const MAX_ATTEMPTS: u32 = 3;

/// Why a submit was refused.
#[derive(Debug, thiserror::Error)]
pub enum RefusedSubmit {
    /// Queue full or store failure.
    #[error(transparent)]
    Store(#[from] SubmitError),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
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
    submitted: SystemTime,
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
    wakeups: Mutex<u64>,
    work: Condvar,
    changes: watch::Sender<u64>,
    webhooks: Mutex<Option<WebhookSender>>,
}

impl Queue {
    /// A queue over `store` whose webhooks go out through `webhooks`; at most `max_queue` jobs
    /// wait. Call [`Queue::recover`] once before serving.
    pub fn new(store: Arc<dyn JobStore>, max_queue: usize, webhooks: WebhookSender) -> Self {
        Self {
            store,
            max_queue,
            closed: AtomicBool::new(false),
            local: Mutex::new(Local::default()),
            wakeups: Mutex::new(0),
            work: Condvar::new(),
            changes: watch::channel(0).0,
            webhooks: Mutex::new(Some(webhooks)),
        }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requeues or fails what was running when the store was last used, and resends the
    /// webhooks that were not delivered.
    pub fn recover(&self) -> Result<Recovery, StoreError> {
        let recovery = self.store.recover(MAX_ATTEMPTS)?;
        for hook in self.store.pending_webhooks()? {
            self.send_webhook(hook);
        }
        Ok(recovery)
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
    pub fn submit(&self, job: NewJob) -> Result<Option<usize>, RefusedSubmit> {
        if self.is_closed() {
            return Err(RefusedSubmit::ShuttingDown);
        }
        let invalid = job.input.as_ref().err().cloned();
        let submitted = self.store.submit(job, self.max_queue)?;
        {
            let mut delta = Counters { accepted: 1, ..Counters::default() };
            if let Some(failure) = invalid {
                delta.add(&Counters::ended(&Outcome::Failed(failure)));
            }
            self.count(&delta);
        }
        if let Some(hook) = submitted.webhook {
            self.send_webhook(hook);
        }
        self.wake_worker();
        self.changed();
        Ok(submitted.position)
    }

    /// Blocks until a job can start (returns it) or the queue is closed (`None`). Also looks
    /// every 250 ms, for jobs that other processes sharing the store queued.
    pub fn next_work(&self) -> Option<WorkItem> {
        loop {
            if self.is_closed() {
                return None;
            }
            // Taken before looking, so a submit that lands while the store is being asked (the
            // lock is not held then: a shared store is a network round trip away) still wakes us.
            let seen = *self.wakeups.lock().unwrap_or_else(|e| e.into_inner());
            match self.store.claim(SystemTime::now()) {
                Ok(Some(claimed)) => {
                    let stop = Arc::new(StopFlag::default());
                    self.local().running.insert(claimed.id.clone(), (stop.clone(), claimed.token.clone()));
                    self.count(&Counters { started: 1, ..Counters::default() });
                    self.changed();
                    return Some(WorkItem {
                        id: claimed.id,
                        token: claimed.token,
                        request: claimed.request,
                        attempt: claimed.attempt,
                        stop,
                        submitted: claimed.submitted,
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "taking the next request failed; retrying"),
            }
            let wakeups = self.wakeups.lock().unwrap_or_else(|e| e.into_inner());
            if *wakeups == seen && !self.is_closed() {
                drop(self.work.wait_timeout(wakeups, Duration::from_millis(250)).unwrap_or_else(|e| e.into_inner()));
            }
        }
    }

    /// Wakes the worker waiting in [`Queue::next_work`].
    fn wake_worker(&self) {
        *self.wakeups.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.work.notify_all();
    }

    /// Appends a log line to a job this process runs (a store failure is logged, not fatal to
    /// the generation).
    pub fn log(&self, item: &WorkItem, line: LogLine) {
        if let Err(e) = retry_while_unavailable(|| self.store.append_log(&item.id, &item.token, &line)) {
            tracing::warn!(request_id = %item.id, error = %e, "log line not stored");
        }
        self.changed();
    }

    /// Records the duration of one denoising step.
    pub fn observe_step(&self, duration: Duration) {
        self.observe(Latency::Step, duration);
    }

    fn observe(&self, which: Latency, value: Duration) {
        self.local().latencies.observe(which, value);
        if let Err(e) = self.store.observe(which, value) {
            tracing::warn!(error = %e, "shared latency not recorded");
        }
    }

    /// Whether the job should stop after this step: cancelled here or through the store (by
    /// another front), or the server is stopping.
    pub fn stop_reason(&self, item: &WorkItem) -> StopReason {
        let reason = item.stop.reason();
        if reason != StopReason::None {
            return reason;
        }
        // A cancel handled by this process set the flag already; only a shared store can carry
        // one from elsewhere.
        if self.store.is_shared() && self.store.stop_requested(&item.id, &item.token).unwrap_or(false) {
            item.stop.request(StopReason::Cancelled);
        }
        item.stop.reason()
    }

    /// Records how a job this process ran ended and sends its webhook.
    pub fn finish(&self, item: &WorkItem, outcome: Outcome) -> Result<(), StoreError> {
        // A store that is down for a moment (Redis restarting) must not lose a finished
        // generation.
        let finished = retry_while_unavailable(|| self.store.finish(&item.id, &item.token, &outcome));
        self.local().running.remove(&item.id);
        self.changed();
        let finished = finished?;
        if !finished.applied {
            // Ended meanwhile (its lease ran out and it went to another worker, or it was
            // forgotten): that end stands, this one is not counted.
            tracing::warn!(request_id = %item.id, "the request had already ended elsewhere; this result is dropped");
            return Ok(());
        }
        self.observe(Latency::Request, SystemTime::now().duration_since(item.submitted).unwrap_or_default());
        self.count(&Counters::ended(&outcome));
        if let Some(hook) = finished.webhook {
            self.send_webhook(hook);
        }
        Ok(())
    }

    /// Keeps this process' claims alive and picks up what dead processes left (stores shared
    /// by several processes): extends the leases of the jobs running here, gives back or fails
    /// jobs whose worker stopped answering, and sends webhooks whose sender died. Call it more
    /// often than the lease (the visibility timeout) runs out.
    pub fn maintain(&self) -> Result<(), StoreError> {
        let running: Vec<(String, String)> =
            self.local().running.iter().map(|(id, (_, token))| (id.clone(), token.clone())).collect();
        self.store.heartbeat(&running)?;
        let ended = self.store.reap(MAX_ATTEMPTS)?;
        if ended.count > 0 {
            let cancelled = ended.cancelled as u64;
            self.count(&Counters { cancelled, ..Counters::failed(ended.count - ended.cancelled) });
            self.changed();
        }
        for hook in ended.webhooks.into_iter().chain(self.store.orphaned_webhooks()?) {
            self.send_webhook(hook);
        }
        Ok(())
    }

    /// Gives a job this process was running back to the queue (graceful shutdown of a durable
    /// server: it runs again after the restart).
    pub fn release(&self, item: &WorkItem) -> Result<(), StoreError> {
        self.local().running.remove(&item.id);
        self.changed();
        self.store.release(&item.id, &item.token)
    }

    /// Cancels a job: a queued one ends at once, a running one stops after its current step.
    pub fn cancel(&self, id: &str) -> Result<CancelResult, StoreError> {
        let result = self.store.cancel(id)?;
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
    pub fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
        self.store.view(id, logs_from)
    }

    /// A job's base URL.
    pub fn base_url(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.store.base_url(id)
    }

    /// Forgets a job (a synchronous one, once answered).
    pub fn forget(&self, id: &str) -> Result<(), StoreError> {
        self.store.forget(id)
    }

    /// Whether a job is known.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        self.store.contains(id)
    }

    /// Fails queued jobs past their start deadline (their slots free up, their webhooks go).
    pub fn expire_deadlines(&self) -> Result<usize, StoreError> {
        let ended = self.store.expire_deadlines(SystemTime::now())?;
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
    pub fn expire_finished(&self, retention: Duration) -> Result<Vec<String>, StoreError> {
        let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        self.store.expire_finished(cutoff)
    }

    /// Refuses new jobs from now on. With `fail_queued` (storage that does not outlive the
    /// process) every queued job fails with [`super::job::FailureKind::Shutdown`]; otherwise they stay
    /// queued for the next start.
    pub fn close(&self, fail_queued: bool) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::SeqCst);
        let result = if fail_queued {
            self.store.fail_queued(&Failure::stopped(StopReason::Shutdown, false)).map(|ended| {
                self.count(&Counters::failed(ended.count));
                for hook in ended.webhooks {
                    self.send_webhook(hook);
                }
            })
        } else {
            Ok(())
        };
        self.wake_worker();
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

    /// Counts events here and, for a shared store, where every process sees them.
    fn count(&self, delta: &Counters) {
        self.local().counters.add(delta);
        if let Err(e) = self.store.add_counts(delta) {
            tracing::warn!(error = %e, "shared counters not updated");
        }
    }

    /// Counters: of every process sharing the store (since the store was created) when it keeps
    /// them, else of this process since it started.
    pub fn counters(&self) -> Counters {
        match self.store.counters() {
            Ok(Some(shared)) => shared,
            _ => self.local().counters,
        }
    }

    /// This process' counters since it started.
    pub fn local_counters(&self) -> Counters {
        self.local().counters
    }

    /// Latency histograms: of every process sharing the store when it keeps them, else of
    /// this process.
    pub fn latencies(&self) -> Latencies {
        match self.store.latencies() {
            Ok(Some(shared)) => shared,
            _ => self.local().latencies.clone(),
        }
    }

    /// Queue length and running jobs (every process sharing the store).
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        self.store.stats()
    }
}

/// Runs `call` again while the store is unavailable (Redis restarting), for up to a minute, so
/// a short outage loses neither a finished generation nor its log lines: the worker waits.
fn retry_while_unavailable<T>(mut call: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let mut wait = Duration::from_millis(100);
    loop {
        match call() {
            Err(StoreError::Unavailable(_)) if std::time::Instant::now() < until => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}
