//! The server's one retry policy: exponential pauses, doubling from a first pause up to a cap,
//! a bounded number of times. Webhook deliveries, the leases derived from them, and store calls
//! retried through a short outage all use it (through `backon`).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Bounded exponential retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The pause before the first retry.
    pub first_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
    /// Retries after the first try.
    pub retries: usize,
}

impl RetryPolicy {
    /// Most tries of one webhook delivery (`ServerConfig::webhook_attempts`).
    pub const MAX_WEBHOOK_ATTEMPTS: u32 = 10;

    /// A webhook delivery: `attempts` tries (1 to [`Self::MAX_WEBHOOK_ATTEMPTS`]), 1 s, 2 s, 4 s…
    /// apart, no pause over 30 s.
    pub fn webhook(attempts: u32) -> Self {
        let attempts = attempts.clamp(1, Self::MAX_WEBHOOK_ATTEMPTS);
        Self { first_pause: Duration::from_secs(1), max_pause: Duration::from_secs(30), retries: attempts as usize - 1 }
    }

    /// A store call while the store cannot be reached (Redis restarting): 100 ms doubling to 2 s,
    /// 34 retries (a little over a minute), so a short outage loses neither a finished generation
    /// nor its log lines.
    pub fn store_outage() -> Self {
        Self { first_pause: Duration::from_millis(100), max_pause: Duration::from_secs(2), retries: 34 }
    }

    /// The policy for `backon`'s `retry`.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first_pause)
            .with_max_delay(self.max_pause)
            .with_factor(2.0)
            .with_max_times(self.retries)
    }

    /// The pauses between tries, in order.
    pub fn pauses(&self) -> Vec<Duration> {
        self.backoff().build().collect()
    }

    /// All pauses together: with the tries' own time limits, a bound on how long the retries take.
    pub fn total_pause(&self) -> Duration {
        self.pauses().iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_are_bounded() {
        let secs = |p: RetryPolicy| p.pauses().iter().map(Duration::as_secs).collect::<Vec<_>>();
        assert_eq!(secs(RetryPolicy::webhook(3)), [1, 2]);
        assert_eq!(secs(RetryPolicy::webhook(1)), Vec::<u64>::new());
        assert_eq!(secs(RetryPolicy::webhook(10)), [1, 2, 4, 8, 16, 30, 30, 30, 30]);
        // Out-of-range attempts are clamped, never an overflow.
        assert_eq!(RetryPolicy::webhook(u32::MAX), RetryPolicy::webhook(10));
        assert_eq!(RetryPolicy::webhook(0).retries, 0);
        let outage = RetryPolicy::store_outage().total_pause();
        assert!(outage > Duration::from_secs(60) && outage < Duration::from_secs(70), "{outage:?}");
    }
}
