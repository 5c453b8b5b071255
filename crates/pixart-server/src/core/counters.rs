//! Request counters (`/health`, `/metrics`).

use super::job::{FailureKind, Outcome};

/// Request counters: since a process started, or of every process sharing a store.
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
    /// Generations started by this process' worker.
    pub started: u64,
}

impl Counters {
    /// One request ended this way.
    pub fn ended(outcome: &Outcome) -> Self {
        match outcome.failure().map(|f| f.kind) {
            None => Self { succeeded: 1, ..Self::default() },
            Some(FailureKind::Cancelled) => Self { cancelled: 1, ..Self::default() },
            Some(_) => Self { failed: 1, ..Self::default() },
        }
    }

    /// `n` requests failed.
    pub fn failed(n: usize) -> Self {
        Self { failed: n as u64, ..Self::default() }
    }

    /// Adds `other` to these.
    pub fn add(&mut self, other: &Counters) {
        self.accepted += other.accepted;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.started += other.started;
    }
}
