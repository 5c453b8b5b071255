//! What the queue holds: jobs, their states and outcomes, log lines and stop requests. Plain
//! data; nothing here knows about HTTP.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pixart_fal::{FieldError, GenerateRequest, GenerateResponse};
use serde::{Deserialize, Serialize};

/// How a job was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Through the queue API: kept after it ends (for the retention) for status and result calls.
    Queued,
    /// Synchronous (`/run/`): answered to the caller that waits for it, then forgotten. Not
    /// resumed after a restart (its caller is gone).
    Run,
}

/// Queue priority: every normal job starts before any low one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// The default.
    Normal,
    /// `x-fal-queue-priority: low`.
    Low,
}

impl Priority {
    /// Sort key: lower starts first.
    pub fn rank(self) -> i64 {
        match self {
            Priority::Normal => 0,
            Priority::Low => 1,
        }
    }
}

/// A job as submitted.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The request id (a UUID).
    pub id: String,
    /// Queue or run.
    pub kind: JobKind,
    /// `owner/alias` it was submitted to.
    pub app: String,
    /// `scheme://host` it came in on: result URLs (webhook payloads too) are built on it.
    pub base_url: String,
    /// Where to POST the result.
    pub webhook: Option<String>,
    /// Queue priority.
    pub priority: Priority,
    /// A job still queued at this time fails with [`FailureKind::Timeout`].
    pub start_deadline: Option<SystemTime>,
    /// The validated input, or the failure of invalid input: such a job is recorded as finished
    /// at once and never queued (nor counted against the queue limit; its input is not kept).
    pub input: Result<GenerateRequest, Failure>,
}

impl NewJob {
    /// A normal-priority job with a fresh id, no webhook and no deadline.
    pub fn new(kind: JobKind, app: &str, base_url: &str, input: Result<GenerateRequest, Failure>) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            app: app.to_string(),
            base_url: base_url.to_string(),
            webhook: None,
            priority: Priority::Normal,
            start_deadline: None,
            input,
        }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The input does not validate ([`Failure::fields`] says where).
    InvalidInput,
    /// Cancelled by its client (or a `/run/` caller that went away).
    Cancelled,
    /// The server stopped before (or while) running it and its storage does not outlive it.
    Shutdown,
    /// Still queued at its start deadline (`x-fal-request-timeout`).
    Timeout,
    /// The pipeline failed.
    Generation,
    /// The images could not be stored.
    Storage,
    /// It was running when the server died, more times than allowed.
    Interrupted,
    /// A bug (a panic in the pipeline).
    Internal,
}

/// How a failed job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The category.
    pub kind: FailureKind,
    /// A sentence for people.
    pub message: String,
    /// For [`FailureKind::InvalidInput`]: each field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

impl Failure {
    /// A failure without field details.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), fields: Vec::new() }
    }

    /// The failure of invalid input.
    pub fn invalid(errors: &[FieldError]) -> Self {
        let fields = errors.to_vec();
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        Self { kind: FailureKind::InvalidInput, message, fields }
    }

    /// The failure of a job stopped for `reason`; `started` tells whether it had begun.
    pub fn stopped(reason: StopReason, started: bool) -> Self {
        match reason {
            StopReason::Shutdown if started => {
                Self::new(FailureKind::Shutdown, "The server shut down while this request was running")
            }
            StopReason::Shutdown => {
                Self::new(FailureKind::Shutdown, "The server shut down before this request started")
            }
            _ => Self::new(FailureKind::Cancelled, "Request was cancelled"),
        }
    }

    /// The failure of a job still queued at its start deadline.
    pub fn timed_out() -> Self {
        Self::new(FailureKind::Timeout, "Request timed out before it started (x-fal-request-timeout)")
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The model's output; stored image URLs are paths (`/files/…`), made absolute when served.
    Succeeded {
        /// fal's response body.
        response: GenerateResponse,
        /// Seconds of model time.
        inference_time: f64,
    },
    /// It failed.
    Failed(Failure),
}

impl Outcome {
    /// The failure, if it failed.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Outcome::Succeeded { .. } => None,
            Outcome::Failed(failure) => Some(failure),
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting; `position` is its exact 0-based place in the queue.
    Queued {
        /// Jobs that start before it.
        position: usize,
    },
    /// Being generated.
    Running,
    /// Ended.
    Completed(Outcome),
}

/// One log line, as fal's status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// `INFO`, `WARN` or `ERROR`.
    pub level: String,
    /// The text.
    pub message: String,
    /// When it was written (RFC 3339, milliseconds).
    pub timestamp: String,
}

impl LogLine {
    /// A line stamped now.
    pub fn new(level: &str, message: impl Into<String>) -> Self {
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
        Self { level: level.to_string(), message: message.into(), timestamp }
    }
}

/// What a status call sees of a job.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The request id.
    pub id: String,
    /// Queue or run.
    pub kind: JobKind,
    /// `owner/alias`.
    pub app: String,
    /// Where it is.
    pub state: JobState,
    /// Log lines from the asked offset on.
    pub logs: Vec<LogLine>,
    /// How many log lines it has in all.
    pub log_count: usize,
}

/// Why a running job should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Still allowed to run.
    None = 0,
    /// Cancelled by its client.
    Cancelled = 1,
    /// The server is shutting down.
    Shutdown = 2,
}

/// A flag the worker checks after every denoising step.
#[derive(Debug, Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    /// Asks the run to stop (the first reason wins).
    pub fn request(&self, reason: StopReason) {
        let _ = self.0.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The reason given, if any.
    pub fn reason(&self) -> StopReason {
        match self.0.load(Ordering::SeqCst) {
            1 => StopReason::Cancelled,
            2 => StopReason::Shutdown,
            _ => StopReason::None,
        }
    }
}

/// Milliseconds since the Unix epoch (what the stores persist).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
