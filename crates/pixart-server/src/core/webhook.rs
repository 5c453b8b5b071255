//! Webhook delivery: a POST of fal's webhook payload when a request with `fal_webhook` ends.
//!
//! Deliveries run on a pool of threads (blocking HTTP, retried with the server's
//! [`RetryPolicy`] where that cannot duplicate them), so a slow receiver holds up neither
//! generation nor other receivers; on shutdown the threads drain what is left before the server
//! exits. They reach the store through the runtime's handle.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use backon::BlockingRetryable;

use super::retry::RetryPolicy;
use super::store::{JobStore, PendingWebhook};
use super::webhook_target::PolicyResolver;

/// Deliveries that may be in flight at once: a slow receiver holds up at most one of them.
pub const CONCURRENT_DELIVERIES: usize = 8;

/// Hands deliveries to a pool of sender threads.
#[derive(Debug)]
pub struct WebhookSender {
    queue: mpsc::Sender<PendingWebhook>,
    /// Deliveries queued or being sent by this process: one handed over again (a shared store's
    /// orphan sweep) is not queued twice.
    in_flight: Arc<Mutex<HashSet<i64>>>,
}

/// The sender threads; joining waits until every queued delivery was attempted.
#[derive(Debug)]
pub struct WebhookThreads(Vec<JoinHandle<()>>);

impl WebhookThreads {
    /// Waits for every sender thread (call after dropping the [`WebhookSender`]).
    pub fn join(self) {
        for thread in self.0 {
            let _ = thread.join();
        }
    }
}

impl WebhookSender {
    /// Starts [`CONCURRENT_DELIVERIES`] delivery threads. Connections resolve through
    /// [`PolicyResolver`] (only public addresses unless `allow_private`), and redirects are not
    /// followed.
    /// Each delivery, once attempted to completion, is marked done in `store`; one the process
    /// did not get to stays pending there and is sent by the next start.
    pub fn start(
        store: Arc<dyn JobStore>,
        retries: RetryPolicy,
        timeout: Duration,
        allow_private: bool,
    ) -> std::io::Result<(Self, WebhookThreads)> {
        let runtime = tokio::runtime::Handle::current();
        let (queue, deliveries) = mpsc::channel::<PendingWebhook>();
        let deliveries = Arc::new(Mutex::new(deliveries));
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .redirects(0)
            .resolver(PolicyResolver { allow_private })
            .build();
        let in_flight = Arc::new(Mutex::new(HashSet::new()));
        let mut threads = Vec::with_capacity(CONCURRENT_DELIVERIES);
        for i in 0..CONCURRENT_DELIVERIES {
            let (deliveries, agent, store) = (deliveries.clone(), agent.clone(), store.clone());
            let (in_flight, runtime) = (in_flight.clone(), runtime.clone());
            threads.push(std::thread::Builder::new().name(format!("pixart-webhooks-{i}")).spawn(move || loop {
                // Hold the lock only to take the next delivery, not while sending it.
                let next = deliveries.lock().unwrap_or_else(|e| e.into_inner()).recv();
                match next {
                    Ok(delivery) => {
                        // It may have waited here a while: its lease starts now.
                        if let Err(e) = runtime.block_on(store.webhook_started(delivery.delivery_id)) {
                            tracing::warn!(request_id = %delivery.job_id, error = %e, "webhook lease not renewed");
                        }
                        deliver(&agent, &delivery, retries);
                        if let Err(e) = runtime.block_on(store.webhook_done(delivery.delivery_id)) {
                            tracing::warn!(request_id = %delivery.job_id, error = %e, "webhook not marked as sent; it may be sent again after a restart");
                        }
                        in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&delivery.delivery_id);
                    }
                    Err(_) => return, // the sender was dropped and the queue is empty
                }
            })?);
        }
        Ok((Self { queue, in_flight }, WebhookThreads(threads)))
    }

    /// Queues a delivery (unless this process already has it queued or in flight).
    pub fn send(&self, delivery: PendingWebhook) {
        if !self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(delivery.delivery_id) {
            return;
        }
        if self.queue.send(delivery).is_err() {
            tracing::error!("webhook threads are gone; the webhook stays pending for the next start");
        }
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
