//! The job table: the bounded queue, the request being generated and the finished ones.
//!
//! One mutex guards it; the worker thread waits on a condition variable for work, and every
//! change bumps a watch channel so status streams and `/run/` callers wake up.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pixart_pipeline::{GenerateRequest, GenerateResponse};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::webhook::Delivery;

/// Why a request stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Still allowed to run.
    None = 0,
    /// `PUT …/cancel`, or a `/run/` caller that went away.
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

/// How a request was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Through the queue API: kept after it finishes (retention) for status and result calls.
    Queued,
    /// Through `/run/`: answered on the same connection, then forgotten.
    Run,
}

/// One log line, as fal's status sends it.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The text.
    pub message: String,
    /// `INFO`, `WARN` or `ERROR`.
    pub level: &'static str,
    /// When it was written (RFC 3339).
    pub timestamp: String,
}

impl LogLine {
    /// A line stamped now.
    pub fn new(level: &'static str, message: impl Into<String>) -> Self {
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
        Self { message: message.into(), level, timestamp }
    }
    /// fal's JSON form.
    pub fn to_json(&self) -> Value {
        json!({"message": self.message, "level": self.level, "source": "USER", "timestamp": self.timestamp})
    }
}

/// The body of a finished request.
#[derive(Debug, Clone)]
pub enum OutcomeBody {
    /// The model's output; image URLs that start with `/` are made absolute when served.
    Output(GenerateResponse),
    /// An error body (`{"detail": …}`).
    Error(Value),
}

/// How a request ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The HTTP status of the result.
    pub status: u16,
    /// The result body.
    pub body: OutcomeBody,
    /// For failed requests: a message for status' `error`.
    pub error: Option<String>,
    /// For failed requests: status' `error_type`.
    pub error_type: Option<&'static str>,
    /// Seconds of model time, for status' `metrics.inference_time`.
    pub inference_time: Option<f64>,
    /// Whether the result carries `x-fal-request-timeout-type: user` (start timeout expired).
    pub user_timeout: bool,
}

impl Outcome {
    /// A successful generation.
    pub fn output(response: GenerateResponse, inference_time: f64) -> Self {
        Self {
            status: 200,
            body: OutcomeBody::Output(response),
            error: None,
            error_type: None,
            inference_time: Some(inference_time),
            user_timeout: false,
        }
    }
    /// A failure with body `{"detail": detail, "error_type": error_type}`.
    pub fn failure(status: u16, error_type: &'static str, detail: Value, message: impl Into<String>) -> Self {
        let body = json!({"detail": detail, "error_type": error_type});
        Self::with_body(status, error_type, body, message)
    }
    /// A failure whose result body is exactly `body` (fal's 422 is `{"detail": […]}` alone).
    pub fn with_body(status: u16, error_type: &'static str, body: Value, message: impl Into<String>) -> Self {
        Self {
            status,
            body: OutcomeBody::Error(body),
            error: Some(message.into()),
            error_type: Some(error_type),
            inference_time: None,
            user_timeout: false,
        }
    }
    /// Whether the request failed.
    pub fn is_error(&self) -> bool {
        self.status >= 400
    }

    /// The result body as JSON, with stored image paths made absolute on `base_url`.
    pub fn body_json(&self, base_url: &str) -> Value {
        match &self.body {
            OutcomeBody::Output(response) => {
                let mut response = response.clone();
                for image in &mut response.images {
                    if image.url.starts_with('/') {
                        image.url = format!("{base_url}{}", image.url);
                    }
                }
                serde_json::to_value(response).unwrap_or(Value::Null)
            }
            OutcomeBody::Error(body) => body.clone(),
        }
    }
}

/// Where a request is.
#[derive(Debug, Clone)]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Being generated.
    InProgress,
    /// Finished (done, failed or cancelled).
    Completed(Arc<Outcome>),
}

/// One request.
#[derive(Debug)]
pub struct Job {
    /// The request id (a UUID).
    pub id: String,
    /// Queue or run.
    pub kind: JobKind,
    /// `owner/alias` it was submitted to.
    pub app: String,
    /// The validated input, set by [`JobTable::submit`] (invalid input finishes there with 422
    /// and never queues).
    pub request: Option<GenerateRequest>,
    /// `scheme://host` the submit came in on: webhook payload URLs are built from it.
    pub base_url: String,
    /// Where to POST the result.
    pub webhook: Option<String>,
    /// Low priority requests queue behind every normal one.
    pub low_priority: bool,
    /// Start deadline (`x-fal-request-timeout`): a request still queued then fails with 504.
    pub start_deadline: Option<Instant>,
    /// Where it is.
    pub state: JobState,
    /// Progress lines.
    pub logs: Vec<LogLine>,
    /// Checked by the worker after every step.
    pub stop: Arc<StopFlag>,
    /// When it finished.
    pub finished_at: Option<Instant>,
    /// When it was submitted.
    pub submitted_at: Instant,
}

impl Job {
    /// A job in its initial state.
    pub fn new(kind: JobKind, app: String, base_url: String) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            app,
            request: None,
            base_url,
            webhook: None,
            low_priority: false,
            start_deadline: None,
            state: JobState::Queued,
            logs: Vec::new(),
            stop: Arc::new(StopFlag::default()),
            finished_at: None,
            submitted_at: Instant::now(),
        }
    }
}

/// Counters since start, for `/health` and the load test.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    /// Requests accepted (queue and run).
    pub accepted: u64,
    /// Requests that produced an output.
    pub succeeded: u64,
    /// Requests that ended with an error (validation, generation, timeout, shutdown).
    pub failed: u64,
    /// Requests cancelled.
    pub cancelled: u64,
    /// Generations started by the worker.
    pub started: u64,
}

/// A submit that was accepted.
#[derive(Debug)]
pub struct Submitted {
    /// The request id.
    pub id: String,
    /// Its 0-based queue position; None when it finished at once (invalid input).
    pub position: Option<usize>,
    /// The webhook to send for a request that finished at once.
    pub delivery: Option<Delivery>,
}

/// Why a submit was refused.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `max_queue` requests.
    QueueFull(usize),
    /// The server is shutting down.
    ShuttingDown,
}

/// The table itself (behind [`JobTable::lock`]).
#[derive(Debug, Default)]
pub struct Jobs {
    /// Ids waiting, next first.
    pub queue: VecDeque<String>,
    /// Every known request.
    pub jobs: HashMap<String, Job>,
    /// The id being generated.
    pub running: Option<String>,
    /// False once shutdown began.
    pub closed: bool,
    /// Counters.
    pub counters: Counters,
    /// Step and request latency histograms (`/metrics`).
    pub latencies: crate::metrics::Latencies,
}

impl Jobs {
    /// 0-based place in the queue.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.queue.iter().position(|q| q == id)
    }
}

/// What the worker gets to run.
#[derive(Debug)]
pub struct WorkItem {
    /// The request id.
    pub id: String,
    /// The input.
    pub request: GenerateRequest,
    /// Its stop flag.
    pub stop: Arc<StopFlag>,
}

/// The shared job table with its wake-ups.
#[derive(Debug)]
pub struct JobTable {
    jobs: Mutex<Jobs>,
    work: Condvar,
    changes: watch::Sender<u64>,
    max_queue: usize,
}

impl JobTable {
    /// An empty table whose queue holds at most `max_queue` requests.
    pub fn new(max_queue: usize) -> Self {
        Self { jobs: Mutex::new(Jobs::default()), work: Condvar::new(), changes: watch::channel(0).0, max_queue }
    }

    /// The table; a panic elsewhere while holding it does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes the status streams and `/run/` callers.
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Adds a job: queued with its validated request, or recorded as finished with the outcome
    /// of invalid input. Returns the id, the queue position (None when finished) and the webhook
    /// delivery of a job finished at once.
    pub fn submit(&self, mut job: Job, input: Result<GenerateRequest, Outcome>) -> Result<Submitted, SubmitError> {
        let id = job.id.clone();
        let submitted = {
            let mut jobs = self.lock();
            if jobs.closed {
                return Err(SubmitError::ShuttingDown);
            }
            if input.is_ok() && jobs.queue.len() >= self.max_queue {
                return Err(SubmitError::QueueFull(self.max_queue));
            }
            jobs.counters.accepted += 1;
            let low_priority = job.low_priority;
            let outcome = match input {
                Ok(request) => {
                    job.request = Some(request);
                    None
                }
                Err(outcome) => Some(outcome),
            };
            jobs.jobs.insert(id.clone(), job);
            match outcome {
                Some(outcome) => {
                    let delivery = finish_locked(&mut jobs, &id, outcome);
                    Submitted { id, position: None, delivery }
                }
                None => {
                    // Normal priority goes before every low-priority request.
                    let at = if low_priority {
                        jobs.queue.len()
                    } else {
                        let Jobs { queue, jobs: table, .. } = &*jobs;
                        queue.iter().position(|q| table.get(q).is_some_and(|j| j.low_priority)).unwrap_or(queue.len())
                    };
                    jobs.queue.insert(at, id.clone());
                    Submitted { id, position: Some(at), delivery: None }
                }
            }
        };
        self.work.notify_one();
        self.notify();
        Ok(submitted)
    }

    /// Blocks until a request is queued (returns it, marked in progress) or the table is closed
    /// and empty (returns None). Requests whose start deadline passed are finished with 504 and
    /// their webhooks handed to `on_timeout`.
    pub fn next_work(&self, mut on_timeout: impl FnMut(Delivery)) -> Option<WorkItem> {
        let mut jobs = self.lock();
        loop {
            while let Some(id) = jobs.queue.pop_front() {
                let Some(job) = jobs.jobs.get_mut(&id) else { continue };
                if job.start_deadline.is_some_and(|d| Instant::now() >= d) {
                    if let Some(delivery) = finish_locked(&mut jobs, &id, timed_out()) {
                        on_timeout(delivery);
                    }
                    self.notify();
                    continue;
                }
                let Some(request) = job.request.clone() else {
                    // Submit queues only parsed requests; should that ever not hold, fail the job.
                    let message = "internal error: a queued request has no parsed input";
                    finish_locked(&mut jobs, &id, Outcome::failure(500, "InternalError", json!(message), message));
                    self.notify();
                    continue;
                };
                job.state = JobState::InProgress;
                let item = WorkItem { id: id.clone(), request, stop: job.stop.clone() };
                jobs.running = Some(id);
                jobs.counters.started += 1;
                drop(jobs);
                self.notify();
                return Some(item);
            }
            if jobs.closed {
                return None;
            }
            jobs = self.work.wait(jobs).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Appends a log line to a job.
    pub fn log(&self, id: &str, line: LogLine) {
        if let Some(job) = self.lock().jobs.get_mut(id) {
            job.logs.push(line);
        }
        self.notify();
    }

    /// Records how a job ended; returns its webhook delivery, if it has one.
    pub fn finish(&self, id: &str, outcome: Outcome) -> Option<Delivery> {
        let hook = {
            let mut jobs = self.lock();
            if jobs.running.as_deref() == Some(id) {
                jobs.running = None;
            }
            finish_locked(&mut jobs, id, outcome)
        };
        self.notify();
        hook
    }

    /// Cancels a request: a queued one leaves the queue at once, a running one stops after its
    /// current step.
    pub fn cancel(&self, id: &str, reason: StopReason) -> CancelResult {
        let result = {
            let mut jobs = self.lock();
            let Some(job) = jobs.jobs.get(id) else { return CancelResult::NotFound };
            match &job.state {
                JobState::Completed(_) => return CancelResult::AlreadyCompleted,
                JobState::InProgress => {
                    job.stop.request(reason);
                    CancelResult::Requested(None)
                }
                JobState::Queued => {
                    jobs.queue.retain(|q| q != id);
                    let outcome = stopped_outcome(reason, false);
                    CancelResult::Requested(finish_locked(&mut jobs, id, outcome))
                }
            }
        };
        self.notify();
        result
    }

    /// Stops accepting requests and fails every queued one (they would never start); returns
    /// their webhooks.
    pub fn close(&self) -> Vec<Delivery> {
        let mut hooks = Vec::new();
        {
            let mut jobs = self.lock();
            jobs.closed = true;
            while let Some(id) = jobs.queue.pop_front() {
                hooks.extend(finish_locked(&mut jobs, &id, stopped_outcome(StopReason::Shutdown, false)));
            }
        }
        self.work.notify_all();
        self.notify();
        hooks
    }

    /// Stops the running request, if any, for `reason`.
    pub fn stop_running(&self, reason: StopReason) {
        let jobs = self.lock();
        if let Some(job) = jobs.running.as_ref().and_then(|id| jobs.jobs.get(id)) {
            job.stop.request(reason);
        }
    }

    /// Whether a request is being generated.
    pub fn busy(&self) -> bool {
        self.lock().running.is_some()
    }

    /// The outcome of a finished job.
    pub fn outcome(&self, id: &str) -> Option<Arc<Outcome>> {
        completed(&self.lock(), id)
    }

    /// Forgets a job (a `/run/` request once answered).
    pub fn remove(&self, id: &str) {
        let mut jobs = self.lock();
        jobs.queue.retain(|q| q != id);
        jobs.jobs.remove(id);
    }

    /// Records the duration of one denoising step.
    pub fn observe_step(&self, duration: Duration) {
        self.lock().latencies.step.observe(duration);
    }

    /// Fails every queued request whose start deadline has passed (504, `x-fal-request-timeout`),
    /// freeing its queue slot now rather than when the worker reaches it; returns their webhooks.
    pub fn expire_deadlines(&self) -> Vec<Delivery> {
        let mut jobs = self.lock();
        let now = Instant::now();
        let late: Vec<String> = jobs
            .queue
            .iter()
            .filter(|id| jobs.jobs.get(*id).and_then(|j| j.start_deadline).is_some_and(|d| now >= d))
            .cloned()
            .collect();
        if late.is_empty() {
            return Vec::new();
        }
        jobs.queue.retain(|id| !late.contains(id));
        let deliveries = late.iter().filter_map(|id| finish_locked(&mut jobs, id, timed_out())).collect();
        drop(jobs);
        self.notify();
        deliveries
    }

    /// Forgets finished queue jobs older than `retention`; returns their ids (to delete files).
    pub fn expire(&self, retention: Duration) -> Vec<String> {
        let mut jobs = self.lock();
        let now = Instant::now();
        let old: Vec<String> = jobs
            .jobs
            .values()
            .filter(|j| j.finished_at.is_some_and(|t| now.duration_since(t) >= retention))
            .map(|j| j.id.clone())
            .collect();
        for id in &old {
            jobs.jobs.remove(id);
        }
        old
    }
}

/// The answer to a cancel.
#[derive(Debug)]
pub enum CancelResult {
    /// No such request.
    NotFound,
    /// It already finished.
    AlreadyCompleted,
    /// Cancellation requested; carries the webhook to send when a queued request was dropped.
    Requested(Option<Delivery>),
}

/// The outcome of a request whose start deadline passed while it was queued.
fn timed_out() -> Outcome {
    let mut outcome = Outcome::failure(
        504,
        "RequestTimeout",
        json!("Request timed out before it started (x-fal-request-timeout)"),
        "Request timed out before it started",
    );
    outcome.user_timeout = true;
    outcome
}

/// The outcome of a request stopped before its end.
pub fn stopped_outcome(reason: StopReason, started: bool) -> Outcome {
    match reason {
        StopReason::Shutdown if started => Outcome::failure(
            503,
            "ServerShutdown",
            json!("The server shut down while this request was running"),
            "The server shut down while this request was running",
        ),
        StopReason::Shutdown => Outcome::failure(
            503,
            "ServerShutdown",
            json!("The server shut down before this request started"),
            "The server shut down before this request started",
        ),
        _ => Outcome::failure(400, "RequestCancelled", json!("Request was cancelled"), "Request was cancelled"),
    }
}

fn completed(jobs: &Jobs, id: &str) -> Option<Arc<Outcome>> {
    match &jobs.jobs.get(id)?.state {
        JobState::Completed(outcome) => Some(outcome.clone()),
        _ => None,
    }
}

fn finish_locked(jobs: &mut Jobs, id: &str, outcome: Outcome) -> Option<Delivery> {
    let counters = &mut jobs.counters;
    match outcome.error_type {
        None => counters.succeeded += 1,
        Some("RequestCancelled") => counters.cancelled += 1,
        Some(_) => counters.failed += 1,
    }
    let job = jobs.jobs.get_mut(id)?;
    let waited = job.submitted_at.elapsed();
    let outcome = Arc::new(outcome);
    job.state = JobState::Completed(outcome.clone());
    job.finished_at = Some(Instant::now());
    let delivery = job.webhook.clone().map(|url| Delivery {
        request_id: id.to_string(),
        url,
        base_url: job.base_url.clone(),
        outcome,
    });
    jobs.latencies.request.observe(waited);
    delivery
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(table: &JobTable, low_priority: bool, webhook: bool) -> String {
        let mut job = Job::new(JobKind::Queued, "fal-ai/pixart-sigma".into(), "http://h".into());
        job.low_priority = low_priority;
        job.webhook = webhook.then(|| "http://hook".to_string());
        table.submit(job, Ok(GenerateRequest::new("a cat"))).unwrap().id
    }

    fn positions(table: &JobTable, ids: &[&String]) -> Vec<Option<usize>> {
        let jobs = table.lock();
        ids.iter().map(|id| jobs.position(id)).collect()
    }

    #[test]
    fn positions_are_exact_through_priority_start_and_cancel() {
        let table = JobTable::new(10);
        let low = job(&table, true, false);
        let a = job(&table, false, false);
        let b = job(&table, false, false);
        // Normal requests go before the low-priority one.
        assert_eq!(positions(&table, &[&a, &b, &low]), [Some(0), Some(1), Some(2)]);
        let started = table.next_work(|_| {}).unwrap();
        assert_eq!(started.id, a);
        assert!(table.busy());
        assert_eq!(positions(&table, &[&a, &b, &low]), [None, Some(0), Some(1)]);
        assert!(matches!(table.cancel(&b, StopReason::Cancelled), CancelResult::Requested(None)));
        assert_eq!(positions(&table, &[&low]), [Some(0)]);
        assert_eq!(table.outcome(&b).unwrap().error_type, Some("RequestCancelled"));
        // The running one gets its stop flag; it finishes when the worker says so.
        assert!(matches!(table.cancel(&a, StopReason::Cancelled), CancelResult::Requested(None)));
        assert_eq!(started.stop.reason(), StopReason::Cancelled);
        assert!(table.outcome(&a).is_none());
        table.finish(&a, stopped_outcome(StopReason::Cancelled, true));
        assert!(!table.busy());
        assert!(matches!(table.cancel(&a, StopReason::Cancelled), CancelResult::AlreadyCompleted));
        assert!(matches!(table.cancel("nope", StopReason::Cancelled), CancelResult::NotFound));
        let counters = table.lock().counters;
        assert_eq!((counters.accepted, counters.started, counters.cancelled), (3, 1, 2));
    }

    #[test]
    fn a_full_queue_refuses_and_closing_fails_the_waiting_requests() {
        let table = JobTable::new(2);
        let a = job(&table, false, true);
        let _b = job(&table, false, false);
        let extra = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        assert!(matches!(table.submit(extra, Ok(GenerateRequest::new("c"))), Err(SubmitError::QueueFull(2))));
        assert_eq!(table.lock().counters.accepted, 2);
        let hooks = table.close();
        assert_eq!(hooks.len(), 1, "only requests with a webhook");
        assert_eq!(hooks[0].request_id, a);
        assert_eq!(hooks[0].payload()["status"], "ERROR");
        assert_eq!(table.outcome(&a).unwrap().error_type, Some("ServerShutdown"));
        assert!(table.next_work(|_| {}).is_none(), "closed and empty: the worker exits");
        let late = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        assert!(matches!(table.submit(late, Ok(GenerateRequest::new("d"))), Err(SubmitError::ShuttingDown)));
    }

    #[test]
    fn a_request_past_its_start_deadline_fails_with_a_user_timeout() {
        let table = JobTable::new(4);
        let mut late = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        late.start_deadline = Some(Instant::now());
        let late = table.submit(late, Ok(GenerateRequest::new("a"))).unwrap().id;
        let next = job(&table, false, false);
        let mut hooks = Vec::new();
        assert_eq!(table.next_work(|d| hooks.push(d)).unwrap().id, next);
        let outcome = table.outcome(&late).unwrap();
        assert_eq!((outcome.status, outcome.user_timeout), (504, true));
        assert!(hooks.is_empty(), "no webhook was asked for");
    }

    #[test]
    fn deadlines_expire_while_queued_freeing_slots_and_sending_webhooks() {
        let table = JobTable::new(2);
        let mut late = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        late.webhook = Some("https://hooks.example.com/x".into());
        late.start_deadline = Some(Instant::now());
        let late = table.submit(late, Ok(GenerateRequest::new("a"))).unwrap().id;
        let kept = job(&table, false, false);
        // The queue is full (2) until the sweep runs.
        let extra = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        assert!(matches!(table.submit(extra, Ok(GenerateRequest::new("b"))), Err(SubmitError::QueueFull(2))));
        let hooks = table.expire_deadlines();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].request_id, late);
        assert_eq!(hooks[0].payload()["status"], "ERROR");
        assert_eq!(table.outcome(&late).unwrap().status, 504);
        assert_eq!(table.lock().position(&kept), Some(0), "the slot is free");
        let extra = Job::new(JobKind::Queued, "x/y".into(), "http://h".into());
        assert!(table.submit(extra, Ok(GenerateRequest::new("c"))).is_ok());
        assert!(table.expire_deadlines().is_empty());
    }
}
