//! The periodic work of a server or worker process, as one task: start deadlines (every
//! 100 ms, so slots free up and webhooks go out on time), leases and orphaned webhooks of shared
//! stores, retention of finished requests and their files, stale uploads and tokens. File-system
//! sweeps run on the blocking pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cdn_tokens::CdnTokens;
use super::files::FileStore;
use super::queue::Queue;
use super::uploads::Uploads;

/// What one sweeper looks after.
#[derive(Debug, Clone)]
pub struct Sweeper {
    /// The jobs.
    pub queue: Arc<Queue>,
    /// Generated images and uploads.
    pub files: Arc<FileStore>,
    /// Uploads in flight and upload tokens (an HTTP front's).
    pub uploads: Option<(Arc<Uploads>, Arc<CdnTokens>)>,
    /// How long finished requests are kept; `None`: for ever.
    pub retention: Option<Duration>,
    /// How often leases are extended and dead workers' jobs taken back (a third of the
    /// visibility timeout).
    pub maintain_every: Duration,
}

/// How often the store and the storage disk are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long an unfinished upload is kept.
const UPLOAD_LIFETIME: Duration = Duration::from_secs(3600);

impl Sweeper {
    /// Sweeps until `stop` is notified.
    pub async fn run(self, stop: Arc<tokio::sync::Notify>) {
        let retain_every = self
            .retention
            .map_or(Duration::from_secs(60), |r| (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)));
        let (mut maintained, mut retained, mut checked) = (Instant::now(), Instant::now(), Instant::now());
        self.check().await;
        self.maintain().await;
        self.retain().await;
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if let Err(e) = self.queue.expire_deadlines().await {
                tracing::warn!(error = %e, "expiring start deadlines");
            }
            if checked.elapsed() >= CHECK_EVERY {
                checked = Instant::now();
                self.check().await;
            }
            if maintained.elapsed() >= self.maintain_every {
                maintained = Instant::now();
                self.maintain().await;
            }
            if retained.elapsed() >= retain_every {
                retained = Instant::now();
                self.retain().await;
            }
        }
    }

    /// The store still there and writable, the disk not full.
    async fn check(&self) {
        let (files, queue) = (self.files.clone(), self.queue.clone());
        let disk = tokio::task::spawn_blocking(move || {
            let full = files.ensure_room(0).err().map(|e| e.to_string());
            if full.is_none() {
                // Room again: take the reserve back.
                if let Some(Err(e)) = queue.ballast().map(|b| b.ensure()) {
                    tracing::warn!(error = %e, "the storage folder's reserve file could not be written");
                }
            }
            full
        })
        .await
        .unwrap_or_default();
        self.queue.check_store(disk).await;
    }

    async fn maintain(&self) {
        if let Err(e) = self.queue.maintain().await {
            tracing::warn!(error = %e, "extending leases / taking back dead workers' jobs");
        }
    }

    async fn retain(&self) {
        if let Some(retention) = self.retention {
            match self.queue.expire_finished(retention).await {
                Ok(ids) => {
                    let files = self.files.clone();
                    let _ = tokio::task::spawn_blocking(move || ids.iter().for_each(|id| files.remove_key(id))).await;
                }
                Err(e) => tracing::warn!(error = %e, "expiring finished requests"),
            }
            // Uploads, and images of requests that are gone (a `/run/` answered long ago).
            self.expire_files(retention).await;
        }
        if let Some((uploads, tokens)) = self.uploads.clone() {
            let _ = tokio::task::spawn_blocking(move || {
                uploads.expire(UPLOAD_LIFETIME);
                tokens.expire();
            })
            .await;
        }
    }

    /// Deletes the files of keys older than `retention` that are no live request's.
    async fn expire_files(&self, retention: Duration) {
        let files = self.files.clone();
        let Ok(old) = tokio::task::spawn_blocking(move || files.old_keys(retention)).await else { return };
        let mut gone = Vec::new();
        for key in old {
            // A key the store cannot answer for is kept (it may be live).
            if let Ok(false) = self.queue.contains(&key).await {
                gone.push(key);
            }
        }
        let files = self.files.clone();
        let _ = tokio::task::spawn_blocking(move || gone.iter().for_each(|key| files.remove_key(key))).await;
    }
}
