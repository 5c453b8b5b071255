//! The periodic work of a server or worker process, on its own thread: start deadlines (every
//! 100 ms, so slots free up and webhooks go out on time), leases and orphaned webhooks of shared
//! stores, retention of finished requests and their files, stale uploads and tokens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::cdn_tokens::CdnTokens;
use super::files::FileStore;
use super::queue::Queue;
use super::uploads::Uploads;

/// What one sweeper looks after.
#[derive(Debug, Clone, Copy)]
pub struct Sweeper<'a> {
    /// The jobs.
    pub queue: &'a Queue,
    /// Generated images and uploads.
    pub files: &'a FileStore,
    /// Uploads in flight (an HTTP front's).
    pub uploads: Option<&'a Uploads>,
    /// Upload tokens (an HTTP front's).
    pub cdn_tokens: Option<&'a CdnTokens>,
    /// How long finished requests are kept; `None`: for ever.
    pub retention: Option<Duration>,
    /// How often leases are extended and dead workers' jobs taken back (a third of the
    /// visibility timeout).
    pub maintain_every: Duration,
}

/// How long an unfinished upload is kept.
const UPLOAD_LIFETIME: Duration = Duration::from_secs(3600);

impl Sweeper<'_> {
    /// Sweeps until `stop` is set.
    pub fn run(&self, stop: &AtomicBool) {
        let retain_every = self
            .retention
            .map_or(Duration::from_secs(60), |r| (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)));
        let (mut maintained, mut retained) = (Instant::now(), Instant::now());
        self.maintain();
        self.retain();
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if let Err(e) = self.queue.expire_deadlines() {
                tracing::warn!(error = %e, "expiring start deadlines");
            }
            if maintained.elapsed() >= self.maintain_every {
                maintained = Instant::now();
                self.maintain();
            }
            if retained.elapsed() >= retain_every {
                retained = Instant::now();
                self.retain();
            }
        }
    }

    fn maintain(&self) {
        if let Err(e) = self.queue.maintain() {
            tracing::warn!(error = %e, "extending leases / taking back dead workers' jobs");
        }
    }

    fn retain(&self) {
        if let Some(retention) = self.retention {
            match self.queue.expire_finished(retention) {
                Ok(ids) => ids.iter().for_each(|id| self.files.remove_key(id)),
                Err(e) => tracing::warn!(error = %e, "expiring finished requests"),
            }
            // Uploads, and images of requests that are gone (a `/run/` answered long ago).
            let queue = self.queue;
            self.files.expire(retention, |key| queue.contains(key).unwrap_or(true));
        }
        if let Some(uploads) = self.uploads {
            uploads.expire(UPLOAD_LIFETIME);
        }
        if let Some(tokens) = self.cdn_tokens {
            tokens.expire();
        }
    }
}
