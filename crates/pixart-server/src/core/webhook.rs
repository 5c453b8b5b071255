//! Webhook delivery: a POST of fal's webhook payload when a request with `fal_webhook` ends.
//!
//! Deliveries run on a pool of threads (blocking HTTP, retried with the server's
//! [`RetryPolicy`] where that cannot duplicate them), so a slow receiver holds up neither
//! generation nor other receivers: at most [`DELIVERIES_PER_HOST`] of the pool's
//! [`CONCURRENT_DELIVERIES`] threads work for one host at a time, and a delivery to a host that
//! has its share waits while the others go. Each attempt is bounded (connect and whole request
//! within `--webhook-timeout`), so each delivery is too. On shutdown the threads get a grace
//! period to finish; what is left stays pending in the store for the next start. They reach
//! the store through the runtime's handle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::BlockingRetryable;

use super::retry::RetryPolicy;
use super::store::{JobStore, PendingWebhook};
use super::webhook_target::PolicyResolver;

/// Deliveries that may be in flight at once.
pub const CONCURRENT_DELIVERIES: usize = 8;

/// Deliveries to one host that may be in flight at once (whatever the port; an IPv4 address in
/// an IPv6 form counts as that IPv4 address): a receiver that holds its connections ties up no
/// more than this many threads.
pub const DELIVERIES_PER_HOST: usize = 2;

/// Deliveries waiting and in flight, shared by the sender and its threads.
#[derive(Debug, Default)]
struct Dispatch {
    waiting: VecDeque<PendingWebhook>,
    /// Deliveries queued or being sent (one handed over again, by a shared store's orphan
    /// sweep, is not queued twice).
    known: HashSet<i64>,
    per_host: HashMap<String, usize>,
    /// No more deliveries come: threads return once nothing they may send waits.
    closed: bool,
    /// The grace period is over: threads return without taking another delivery.
    abandoned: bool,
    /// Threads still running.
    threads: usize,
}

#[derive(Debug, Default)]
struct Shared {
    dispatch: Mutex<Dispatch>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Dispatch> {
        self.dispatch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next delivery whose host has room, counted as in flight; `None` when the thread
    /// should stop.
    fn take(&self) -> Option<(PendingWebhook, String)> {
        let mut dispatch = self.lock();
        loop {
            if dispatch.abandoned || (dispatch.closed && dispatch.waiting.is_empty()) {
                return None;
            }
            let ready = dispatch
                .waiting
                .iter()
                .position(|d| dispatch.per_host.get(&host_of(&d.url)).copied().unwrap_or(0) < DELIVERIES_PER_HOST);
            if let Some(delivery) = ready.and_then(|i| dispatch.waiting.remove(i)) {
                let host = host_of(&delivery.url);
                *dispatch.per_host.entry(host.clone()).or_default() += 1;
                return Some((delivery, host));
            }
            dispatch = self.changed.wait(dispatch).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self, delivery_id: i64, host: &str) {
        let mut dispatch = self.lock();
        dispatch.known.remove(&delivery_id);
        if let Some(n) = dispatch.per_host.get_mut(host) {
            *n -= 1;
            if *n == 0 {
                dispatch.per_host.remove(host);
            }
        }
        self.changed.notify_all();
    }
}

/// The key deliveries are limited by: the URL's host, without the port, an IP address in one
/// spelling.
fn host_of(url: &str) -> String {
    let Some(host) = url::Url::parse(url).ok().and_then(|u| u.host().map(|h| h.to_owned())) else {
        return String::new();
    };
    match host {
        url::Host::Ipv6(v6) => v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        url::Host::Ipv4(v4) => v4.to_string(),
        url::Host::Domain(name) => name.trim_end_matches('.').to_ascii_lowercase(),
    }
}

/// Hands deliveries to a pool of sender threads.
#[derive(Debug)]
pub struct WebhookSender {
    shared: Arc<Shared>,
}

/// The sender threads.
#[derive(Debug)]
pub struct WebhookThreads {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl WebhookThreads {
    /// Waits up to `grace` for the threads to attempt every queued delivery (call after
    /// dropping the [`WebhookSender`]); returns whether they did. Past it, no thread takes
    /// another delivery, deliveries still in flight are left to their own time limit, and
    /// every delivery not attempted to completion stays pending in the store for the next start.
    pub fn join(self, grace: Duration) -> bool {
        let until = Instant::now() + grace;
        let mut dispatch = self.shared.lock();
        dispatch.closed = true;
        self.shared.changed.notify_all();
        while dispatch.threads > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (waiting, in_flight) = (dispatch.waiting.len(), dispatch.per_host.values().sum::<usize>());
                dispatch.abandoned = true;
                self.shared.changed.notify_all();
                tracing::warn!(
                    waiting,
                    in_flight,
                    "webhooks not delivered within the shutdown grace period; they stay pending for the next start"
                );
                return false;
            }
            dispatch = self.shared.changed.wait_timeout(dispatch, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(dispatch);
        for thread in self.threads {
            let _ = thread.join();
        }
        true
    }
}

impl WebhookSender {
    /// Starts [`CONCURRENT_DELIVERIES`] delivery threads. Connections resolve through
    /// [`PolicyResolver`] (only public addresses unless `allow_private`), connect and complete
    /// within `timeout`, and redirects are not followed.
    /// Each delivery, once attempted to completion, is marked done in `store`; one the process
    /// did not get to stays pending there and is sent by the next start.
    pub fn start(
        store: Arc<dyn JobStore>,
        retries: RetryPolicy,
        timeout: Duration,
        allow_private: bool,
    ) -> std::io::Result<(Self, WebhookThreads)> {
        let runtime = tokio::runtime::Handle::current();
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .redirects(0)
            .resolver(PolicyResolver { allow_private })
            .build();
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::with_capacity(CONCURRENT_DELIVERIES);
        for i in 0..CONCURRENT_DELIVERIES {
            let (agent, store, runtime) = (agent.clone(), store.clone(), runtime.clone());
            shared.lock().threads += 1;
            let mine = shared.clone();
            let thread = std::thread::Builder::new().name(format!("pixart-webhooks-{i}")).spawn(move || {
                // Counts the thread out however it ends (a panic included), so `join` never waits
                // for a thread that is gone.
                let _running = Running(mine.clone());
                let shared = mine;
                while let Some((delivery, host)) = shared.take() {
                    let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        // It may have waited here a while: its lease starts now.
                        if let Err(e) = runtime.block_on(store.webhook_started(delivery.delivery_id)) {
                            tracing::warn!(request_id = %delivery.job_id, error = %e, "webhook lease not renewed");
                        }
                        deliver(&agent, &delivery, retries);
                        if shared.lock().abandoned {
                            // The server is gone or going: the delivery stays pending in the
                            // store (sent again by the next start: at least once).
                            return false;
                        }
                        if let Err(e) = runtime.block_on(store.webhook_done(delivery.delivery_id)) {
                            tracing::warn!(request_id = %delivery.job_id, error = %e, "webhook not marked as sent; it may be sent again after a restart");
                        }
                        true
                    }));
                    shared.done(delivery.delivery_id, &host);
                    if !matches!(sent, Ok(true)) {
                        break;
                    }
                }
            });
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    shared.lock().threads -= 1;
                    return Err(e);
                }
            }
        }
        Ok((Self { shared: shared.clone() }, WebhookThreads { shared, threads }))
    }

    /// The deliveries waiting here for a thread (their leases in a shared store must be kept).
    pub fn waiting(&self) -> Vec<i64> {
        self.shared.lock().waiting.iter().map(|d| d.delivery_id).collect()
    }

    /// Queues a delivery (unless this process already has it queued or in flight).
    pub fn send(&self, delivery: PendingWebhook) {
        let mut dispatch = self.shared.lock();
        if dispatch.closed || !dispatch.known.insert(delivery.delivery_id) {
            return;
        }
        dispatch.waiting.push_back(delivery);
        self.shared.changed.notify_all();
    }
}

/// Held by a sender thread: counts it out when it ends.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().threads -= 1;
        self.0.changed.notify_all();
    }
}

impl Drop for WebhookSender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// Whether a failed attempt may be repeated without risking a duplicate: the receiver cannot
/// have acted on a request that never connected, or that it answered with 5xx, 408 or 429. A
/// timeout may mean the receiver got the body and is slow: not retried.
fn retryable(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Status(code, _) => *code >= 500 || *code == 408 || *code == 429,
        ureq::Error::Transport(t) => {
            let timed_out = t.kind() == ureq::ErrorKind::Io
                && std::error::Error::source(t).and_then(|s| s.downcast_ref::<std::io::Error>()).is_some_and(|io| {
                    matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
                });
            !timed_out && !t.to_string().contains("non-public")
        }
    }
}

fn deliver(agent: &ureq::Agent, delivery: &PendingWebhook, retries: RetryPolicy) {
    let post = || {
        agent
            .post(&delivery.url)
            .set("Content-Type", "application/json")
            .send_string(&delivery.payload)
            .map_err(Box::new)
    };
    let sent = post
        .retry(retries.backoff())
        .sleep(std::thread::sleep)
        .when(|e| retryable(e))
        .notify(|e, pause| {
            tracing::warn!(request_id = %delivery.job_id, error = %e, ?pause, "webhook delivery failed; retrying");
        })
        .call();
    match sent {
        Ok(response) if (300..400).contains(&response.status()) => {
            // Following it would let the receiver point the server anywhere.
            tracing::warn!(request_id = %delivery.job_id, status = response.status(), "webhook receiver answered a redirect; not followed");
        }
        Ok(response) => {
            tracing::info!(request_id = %delivery.job_id, status = response.status(), "webhook delivered");
        }
        Err(e) if !retryable(&e) => {
            tracing::warn!(request_id = %delivery.job_id, url = %delivery.url, error = %e, "webhook not delivered (not retried: the receiver refused it, timed out after receiving it, or the target is not allowed)");
        }
        Err(e) => {
            tracing::error!(request_id = %delivery.job_id, url = %delivery.url, error = %e, "webhook not delivered after {} attempts", retries.retries + 1);
        }
    }
}
