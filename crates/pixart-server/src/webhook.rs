//! Webhook delivery: a POST of fal's webhook payload when a request with `fal_webhook` ends.
//!
//! Deliveries run on a pool of threads (blocking HTTP, retried with backoff where that cannot
//! duplicate them), so a slow receiver holds up neither generation nor other receivers; on
//! shutdown the threads drain what is left before the server exits.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::jobs::Outcome;
use crate::webhook_target::PolicyResolver;

/// One webhook to send.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The request it reports.
    pub request_id: String,
    /// Where to POST.
    pub url: String,
    /// `scheme://host` for the image URLs in the payload.
    pub base_url: String,
    /// How the request ended.
    pub outcome: Arc<Outcome>,
}

impl Delivery {
    /// fal's webhook body: `{request_id, gateway_request_id, status: OK|ERROR, payload, error}`.
    pub fn payload(&self) -> Value {
        let body = self.outcome.body_json(&self.base_url);
        if self.outcome.is_error() {
            let error = self.outcome.error.clone().unwrap_or_else(|| format!("HTTP {}", self.outcome.status));
            json!({"request_id": self.request_id, "gateway_request_id": self.request_id,
                   "status": "ERROR", "payload": body, "error": error})
        } else {
            json!({"request_id": self.request_id, "gateway_request_id": self.request_id,
                   "status": "OK", "payload": body, "error": null})
        }
    }
}

/// Deliveries that may be in flight at once: a slow receiver holds up at most one of them.
pub const CONCURRENT_DELIVERIES: usize = 8;

/// Hands deliveries to a pool of sender threads.
#[derive(Debug)]
pub struct WebhookSender {
    queue: mpsc::Sender<Delivery>,
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
    pub fn start(attempts: u32, timeout: Duration, allow_private: bool) -> std::io::Result<(Self, WebhookThreads)> {
        let (queue, deliveries) = mpsc::channel::<Delivery>();
        let deliveries = Arc::new(Mutex::new(deliveries));
        let agent =
            ureq::AgentBuilder::new().timeout(timeout).redirects(0).resolver(PolicyResolver { allow_private }).build();
        let mut threads = Vec::with_capacity(CONCURRENT_DELIVERIES);
        for i in 0..CONCURRENT_DELIVERIES {
            let (deliveries, agent) = (deliveries.clone(), agent.clone());
            threads.push(std::thread::Builder::new().name(format!("pixart-webhooks-{i}")).spawn(move || loop {
                // Hold the lock only to take the next delivery, not while sending it.
                let next = deliveries.lock().unwrap_or_else(|e| e.into_inner()).recv();
                match next {
                    Ok(delivery) => deliver(&agent, &delivery, attempts),
                    Err(_) => return, // the sender was dropped and the queue is empty
                }
            })?);
        }
        Ok((Self { queue }, WebhookThreads(threads)))
    }

    /// Queues a delivery.
    pub fn send(&self, delivery: Delivery) {
        if self.queue.send(delivery).is_err() {
            tracing::error!("webhook threads are gone; a webhook was not sent");
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

fn deliver(agent: &ureq::Agent, delivery: &Delivery, attempts: u32) {
    let body = delivery.payload().to_string();
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=attempts {
        let sent = agent.post(&delivery.url).set("Content-Type", "application/json").send_string(&body);
        match sent {
            Ok(response) if (300..400).contains(&response.status()) => {
                // Following it would let the receiver point the server anywhere.
                tracing::warn!(request_id = %delivery.request_id, status = response.status(), "webhook receiver answered a redirect; not followed");
                return;
            }
            Ok(response) => {
                tracing::info!(request_id = %delivery.request_id, status = response.status(), "webhook delivered");
                return;
            }
            Err(e) if !retryable(&e) => {
                tracing::warn!(request_id = %delivery.request_id, url = %delivery.url, error = %e, "webhook not delivered (not retried: the receiver refused it, timed out after receiving it, or the target is not allowed)");
                return;
            }
            Err(e) => {
                tracing::warn!(request_id = %delivery.request_id, attempt, error = %e, "webhook delivery failed");
                if attempt < attempts {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
            }
        }
    }
    tracing::error!(request_id = %delivery.request_id, url = %delivery.url, "webhook not delivered after {attempts} attempts");
}
