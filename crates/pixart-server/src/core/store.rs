//! The [`JobStore`] trait: where jobs, their logs, outcomes and pending webhooks live.
//!
//! A store is the queue's single source of truth; [`crate::core::Queue`] adds what belongs to one
//! process (wake-ups, stop flags of the jobs it runs, counters). [`crate::core::SqliteStore`] is
//! the embedded, durable implementation, [`crate::core::RedisStore`] the shared one.
//!
//! Every method is async and never blocks the runtime: the SQLite store runs its transactions
//! on the blocking pool, the Redis store talks through an async connection manager.

use std::time::SystemTime;

use pixart_fal::GenerateRequest;

use super::job::{Failure, JobView, LogLine, NewJob, Outcome};

/// A store failed (disk, database); the operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record could not be read back.
    #[error("job store: a stored record is unreadable: {0}")]
    Corrupt(String),
    /// The store's folder could not be used.
    #[error("job store: {0}")]
    Io(#[from] std::io::Error),
    /// The store cannot be reached now (Redis down or unreachable): worth retrying.
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error.
    #[error("job store (redis): {0}")]
    Redis(String),
    /// The task running a blocking store call failed (a bug: it panicked).
    #[error("job store task failed: {0}")]
    Task(String),
    /// The store's file was deleted or replaced under the running server: what it records now
    /// would be lost at the next start.
    #[error("job store lost: {0}")]
    Lost(String),
}

/// Why a submit was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue holds its limit of waiting jobs.
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted submit.
#[derive(Debug)]
pub struct Submitted {
    /// 0-based queue position; `None` when the job ended at once (invalid input).
    pub position: Option<usize>,
    /// The webhook of a job that ended at once.
    pub webhook: Option<PendingWebhook>,
}

/// A job handed to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The request id.
    pub id: String,
    /// Its input.
    pub request: GenerateRequest,
    /// The claim's own token: the calls of the worker holding it (log, finish, release,
    /// heartbeat) are refused once the job went to someone else (its lease ran out).
    pub token: String,
    /// How many times it has been started, this time included (more than 1 after a restart).
    pub attempt: u32,
    /// When it was submitted.
    pub submitted: SystemTime,
    /// Log lines the job already has (from earlier attempts): the number of its next line.
    pub log_count: usize,
    /// `scheme://host` the job was submitted on (its URLs, its own files' URLs, are on it).
    pub base_url: String,
}

/// The answer to a cancel.
#[derive(Debug)]
pub enum CancelResult {
    /// No such job.
    NotFound,
    /// It had already ended.
    AlreadyCompleted,
    /// It was queued: it ended as cancelled (with this webhook, if it has one).
    Dequeued(Option<PendingWebhook>),
    /// It is running: its worker is asked to stop after the current step.
    StopRequested,
}

/// A webhook waiting to be delivered (kept in the store until it was attempted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWebhook {
    /// The store's id of this delivery.
    pub delivery_id: i64,
    /// The job it reports.
    pub job_id: String,
    /// Where to POST.
    pub url: String,
    /// The JSON body.
    pub payload: String,
}

/// What a finish did.
#[derive(Debug, Default)]
pub struct Finished {
    /// Whether the outcome was recorded (not when the job had ended, was forgotten or went to
    /// another worker).
    pub applied: bool,
    /// Its webhook, now pending.
    pub webhook: Option<PendingWebhook>,
}

/// Jobs a sweep ended.
#[derive(Debug, Default)]
pub struct Ended {
    /// How many.
    pub count: usize,
    /// How many of them as cancelled (the others failed).
    pub cancelled: usize,
    /// Their webhooks, now pending.
    pub webhooks: Vec<PendingWebhook>,
}

/// What a store did when it was opened after a stop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Jobs that were running when the server stopped and are queued again.
    pub requeued: usize,
    /// Jobs that were running and had used their attempts (or were being cancelled): failed.
    pub failed: usize,
    /// Synchronous jobs whose caller is gone: dropped.
    pub dropped: usize,
    /// Jobs still queued.
    pub queued: usize,
    /// Webhooks still to deliver.
    pub webhooks: usize,
}

/// Queue length and jobs running, across every worker sharing the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs being generated.
    pub running: usize,
}

/// Where jobs live. Every method is one atomic step; implementations are shared by the HTTP
/// front, the workers and the sweeper (`Send + Sync`).
#[async_trait::async_trait]
pub trait JobStore: Send + Sync + std::fmt::Debug {
    /// Adds a job: queued behind every job of its priority or higher, or, with invalid input,
    /// recorded as ended; refused when `max_queue` jobs wait, whatever its input.
    async fn submit(&self, job: NewJob, max_queue: usize) -> Result<Submitted, SubmitError>;

    /// Takes the next job whose start deadline has not passed and marks it running; `None` when
    /// nothing waits. Jobs past their deadline are left for [`JobStore::expire_deadlines`].
    async fn claim(&self, now: SystemTime) -> Result<Option<Claimed>, StoreError>;

    /// Appends log lines to a job the caller holds (claim `token`), the first being line number
    /// `from` of the job; lines the store already has (a retried call) are not added again, and
    /// a job the caller does not hold takes none.
    async fn append_logs(&self, id: &str, token: &str, from: usize, lines: &[LogLine]) -> Result<(), StoreError>;

    /// Records how a running job the caller holds (claim `token`) ended; returns whether it was
    /// recorded and its webhook (fal's payload, see [`crate::core::fal_format`]), now pending. A
    /// job that had ended, is unknown or went to another worker is left as it is.
    async fn finish(&self, id: &str, token: &str, outcome: &Outcome) -> Result<Finished, StoreError>;

    /// Cancels a job: a queued one ends at once, a running one is flagged (see
    /// [`JobStore::stop_requested`]).
    async fn cancel(&self, id: &str) -> Result<CancelResult, StoreError>;

    /// Puts a running job the caller holds back at its place in the queue without counting
    /// this start (a graceful shutdown of a server whose store outlives it).
    async fn release(&self, id: &str, token: &str) -> Result<(), StoreError>;

    /// Whether the worker holding `token` should stop: the job was cancelled (by a cancel
    /// handled anywhere), is gone, or is no longer its own.
    async fn stop_requested(&self, id: &str, token: &str) -> Result<bool, StoreError>;

    /// A job with its log lines from `logs_from` on; `None` when unknown or expired.
    async fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError>;

    /// A job's base URL (for result URLs), if known.
    async fn base_url(&self, id: &str) -> Result<Option<String>, StoreError>;

    /// Ends (with [`Failure::timed_out`]) every queued job whose start deadline is before `now`;
    /// returns their webhooks.
    async fn expire_deadlines(&self, now: SystemTime) -> Result<Ended, StoreError>;

    /// Ends every queued job with `failure` (shutdown of a store that does not outlive the
    /// process); returns their webhooks.
    async fn fail_queued(&self, failure: &Failure) -> Result<Ended, StoreError>;

    /// Forgets jobs that ended before `cutoff` (their logs and outcomes); returns their ids so
    /// their files can be deleted.
    async fn expire_finished(&self, cutoff: SystemTime) -> Result<Vec<String>, StoreError>;

    /// Forgets one job (a synchronous job once answered).
    async fn forget(&self, id: &str) -> Result<(), StoreError>;

    /// Whether a job is known (files of unknown jobs may be deleted).
    async fn contains(&self, id: &str) -> Result<bool, StoreError>;

    /// Webhooks not yet attempted to completion.
    async fn pending_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError>;

    /// Marks a webhook as attempted (delivered, refused or out of tries).
    async fn webhook_done(&self, delivery_id: i64) -> Result<(), StoreError>;

    /// Queue length and running jobs.
    async fn stats(&self) -> Result<QueueStats, StoreError>;

    /// Called once when a server opens the store: jobs that were running when it last stopped
    /// are queued again, or failed after `max_attempts` starts (their webhooks become pending);
    /// synchronous jobs are dropped.
    async fn recover(&self, max_attempts: u32) -> Result<Recovery, StoreError>;

    /// Checks that the store still works: its file is still the one opened, and it takes a
    /// write. A problem found here makes the server unhealthy and refuse submits until it is
    /// gone.
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether other processes share this store (then a cancel may arrive through the store
    /// rather than this process' own stop flags).
    fn is_shared(&self) -> bool {
        false
    }

    /// Extends the leases of jobs this process is running (stores shared by several processes
    /// hand a job to another worker when its lease runs out). The embedded store has no leases.
    async fn heartbeat(&self, _leases: &[(String, String)]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Gives back to the queue the running jobs whose lease ran out (their worker died), or fails
    /// them after `max_attempts` starts (cancelled ones end cancelled). The embedded store does
    /// this once, in [`JobStore::recover`].
    async fn reap(&self, _max_attempts: u32) -> Result<Ended, StoreError> {
        Ok(Ended::default())
    }

    /// The counters every process sharing the store sees, if it keeps them: a shared store
    /// counts in the same atomic step as the state changes it counts (accepted on submit,
    /// started on claim, each end), so a retried or interrupted call never counts twice.
    async fn counters(&self) -> Result<Option<super::counters::Counters>, StoreError> {
        Ok(None)
    }

    /// Records a latency where every process sharing the store sees it (the embedded store
    /// keeps none: each process has its own histograms).
    async fn observe(&self, _which: super::metrics::Latency, _value: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// The shared latency histograms, if the store keeps them.
    async fn latencies(&self) -> Result<Option<super::metrics::Latencies>, StoreError> {
        Ok(None)
    }

    /// Tells other processes that this one is sending the delivery now (its lease starts
    /// again), so one that waited in this process' queue is not taken over as orphaned.
    async fn webhook_started(&self, _delivery_id: i64) -> Result<(), StoreError> {
        Ok(())
    }

    /// Webhooks whose sender died before attempting them, now claimed by the caller. The
    /// embedded store hands every pending one over once, in [`JobStore::pending_webhooks`].
    async fn orphaned_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError> {
        Ok(Vec::new())
    }
}

/// The accepted input a store kept for a job (`serde_json` of the [`GenerateRequest`]), read
/// back, or the failure to end the job with: a job never runs anything other than what was
/// accepted.
pub fn read_stored_request(text: Option<&str>) -> Result<GenerateRequest, Failure> {
    text.filter(|t| !t.is_empty())
        .ok_or_else(|| "no input stored".to_string())
        .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
        .and_then(|value| {
            GenerateRequest::from_value(&value)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })
        .map_err(|error| {
            Failure::new(
                super::job::FailureKind::Internal,
                format!("the stored input of this request could not be read back: {error}"),
            )
        })
}
