//! Webhook delivery: a POST of fal's webhook payload when a request with `fal_webhook` ends.
//!
//! Deliveries run on their own thread (blocking HTTP, retried with backoff), so a slow receiver
//! never holds up generation; on shutdown the thread drains what is left before the server exits.

use std::sync::mpsc;
use std::sync::Arc;
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

/// Hands deliveries to the sender thread.
#[derive(Debug)]
pub struct WebhookSender {
    queue: mpsc::Sender<Delivery>,
}

impl WebhookSender {
    /// Starts the delivery thread. Connections resolve through [`PolicyResolver`] (only public
    /// addresses unless `allow_private`), and redirects are not followed.
    pub fn start(attempts: u32, timeout: Duration, allow_private: bool) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (queue, deliveries) = mpsc::channel::<Delivery>();
        let thread = std::thread::Builder::new().name("pixart-webhooks".into()).spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(timeout)
                .redirects(0)
                .resolver(PolicyResolver { allow_private })
                .build();
            for delivery in deliveries {
                deliver(&agent, &delivery, attempts);
            }
        })?;
        Ok((Self { queue }, thread))
    }

    /// Queues a delivery.
    pub fn send(&self, delivery: Delivery) {
        if self.queue.send(delivery).is_err() {
            tracing::error!("webhook thread is gone; a webhook was not sent");
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
            Err(ureq::Error::Transport(e))
                if e.kind() == ureq::ErrorKind::Dns && e.to_string().contains("non-public") =>
            {
                tracing::error!(request_id = %delivery.request_id, url = %delivery.url, error = %e, "webhook target refused");
                return;
            }
            Err(ureq::Error::Status(code, _)) if (400..500).contains(&code) && code != 408 && code != 429 => {
                tracing::warn!(request_id = %delivery.request_id, status = code, "webhook refused by its receiver");
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
