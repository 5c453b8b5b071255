//! [`SqliteStore`]: the embedded, durable [`JobStore`] (one SQLite file, WAL journal).
//!
//! Every call is one transaction, committed before it returns: a server killed at any point
//! (`kill -9`) finds on restart every job it had accepted, in the state last committed. With
//! `synchronous=NORMAL` a commit survives the process dying; only a power loss may take back the
//! last commits.
//!
//! SQLite is a blocking library: each call runs on Tokio's blocking pool, never on the async
//! runtime. Writes go through one connection; reads (status, health, streams) through a pool of
//! read connections, which WAL lets run while a write is in progress.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::fal_format::webhook_payload;
use super::job::{
    from_unix_ms, unix_ms, Failure, FailureKind, JobKind, JobState, JobView, LogLine, NewJob, Outcome, StopReason,
};
use super::store::{
    read_stored_request, CancelResult, Claimed, Ended, Finished, JobStore, PendingWebhook, QueueStats, Recovery,
    StoreError, SubmitError, Submitted,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    app TEXT NOT NULL,
    base_url TEXT NOT NULL,
    webhook TEXT,
    priority INTEGER NOT NULL,
    deadline_ms INTEGER,
    request TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    outcome TEXT,
    submitted_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs(finished_ms) WHERE state = 'completed';
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
";

/// Jobs in one SQLite database file; cheap to clone (the clones share the database).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    db: Arc<Db>,
}

/// The database and its connections; every method blocks (the store runs them on the blocking
/// pool).
#[derive(Debug)]
pub struct Db {
    path: PathBuf,
    /// The file's identity (device, inode) when it was opened.
    identity: Option<(u64, u64)>,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

/// Opens a connection with the store's settings.
/// A file's device and inode (where the platform has them).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// A connection to the database at `path`, which is created only with `create` (a reader must
/// not make a new, empty database where the store's file was deleted).
fn connect(path: &Path, create: bool) -> Result<Connection, StoreError> {
    let mut flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path, true)?;
        // WAL: readers do not wait for the writer; NORMAL: a commit is in the OS once it returns.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        // A database made before claims carried a token.
        let has_owner = conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'owner'")?.exists([])?;
        if !has_owner {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN owner TEXT")?;
        }
        let identity = file_identity(path);
        let db = Db { path: path.to_path_buf(), identity, writer: Mutex::new(conn), readers: Mutex::new(Vec::new()) };
        Ok(Self { db: Arc::new(db) })
    }

    /// The database, for blocking use (tests, tools).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Runs `call` on the blocking pool.
    async fn run<T, E>(&self, call: impl FnOnce(&Db) -> Result<T, E> + Send + 'static) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || call(&db))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string()).into()))
    }
}

impl Db {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic elsewhere while holding the connection leaves no transaction open (rusqlite
        // rolls back on drop), so the connection stays usable.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a read on a pooled read connection (a new one when none is free).
    fn read<T>(&self, call: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => connect(&self.path, false)?,
        };
        let result = call(&conn);
        self.readers.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        result
    }
}

fn kind_text(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Queued => "queued",
        JobKind::Run => "run",
    }
}

fn queued_count(tx: &Connection) -> Result<usize, StoreError> {
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM jobs WHERE state = 'queued'", [], |r| r.get(0))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Ends a job that has not ended; returns its webhook (now pending) if it has one.
fn complete(tx: &Transaction<'_>, id: &str, outcome: &Outcome) -> Result<Option<PendingWebhook>, StoreError> {
    let row: Option<(Option<String>, String)> = tx
        .query_row("SELECT webhook, base_url FROM jobs WHERE id = ?1 AND state != 'completed'", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((webhook, base_url)) = row else { return Ok(None) };
    let text = serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "UPDATE jobs SET state = 'completed', outcome = ?2, request = NULL, finished_ms = ?3, stop_requested = 0
         WHERE id = ?1",
        params![id, text, unix_ms(SystemTime::now())],
    )?;
    let Some(url) = webhook else { return Ok(None) };
    let payload = webhook_payload(id, &base_url, outcome).to_string();
    tx.execute(
        "INSERT INTO webhooks (job_id, url, payload, created_ms) VALUES (?1, ?2, ?3, ?4)",
        params![id, url, payload, unix_ms(SystemTime::now())],
    )?;
    Ok(Some(PendingWebhook { delivery_id: tx.last_insert_rowid(), job_id: id.to_string(), url, payload }))
}

/// Ends every job the query selects (ids) with `outcome`.
fn complete_all(tx: &Transaction<'_>, ids: Vec<String>, outcome: &Outcome) -> Result<Ended, StoreError> {
    let cancelled = outcome.failure().is_some_and(|f| f.kind == FailureKind::Cancelled);
    let count = ids.len();
    let mut ended = Ended { count, cancelled: if cancelled { count } else { 0 }, webhooks: Vec::new() };
    for id in ids {
        ended.webhooks.extend(complete(tx, &id, outcome)?);
    }
    Ok(ended)
}

fn ids(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<String>, StoreError> {
    let mut statement = tx.prepare(sql)?;
    let rows = statement.query_map(params, |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Db {
    /// [`JobStore::submit`], blocking.
    pub fn submit(&self, job: NewJob, max_queue: usize) -> Result<Submitted, SubmitError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(StoreError::from)?;
        // Invalid input counts against the limit too: a full queue takes nothing, so a flood of
        // bad requests cannot grow the store while it is full.
        if queued_count(&tx)? >= max_queue {
            return Err(SubmitError::QueueFull(max_queue));
        }
        let request = match &job.input {
            Ok(request) => Some(serde_json::to_string(request).map_err(|e| StoreError::Corrupt(e.to_string()))?),
            Err(_) => None,
        };
        tx.execute(
            "INSERT INTO jobs (id, kind, app, base_url, webhook, priority, deadline_ms, request, state, submitted_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', ?9)",
            params![
                job.id,
                kind_text(job.kind),
                job.app,
                job.base_url,
                job.webhook,
                job.priority.rank(),
                job.start_deadline.map(unix_ms),
                request,
                unix_ms(SystemTime::now()),
            ],
        )
        .map_err(StoreError::from)?;
        let submitted = match job.input {
            Ok(_) => {
                let seq = tx.last_insert_rowid();
                Submitted { position: Some(position(&tx, job.priority.rank(), seq)?), webhook: None }
            }
            Err(failure) => Submitted { position: None, webhook: complete(&tx, &job.id, &Outcome::Failed(failure))? },
        };
        tx.commit().map_err(StoreError::from)?;
        Ok(submitted)
    }

    /// [`JobStore::check`], blocking: the file is still there and the same, and takes a write.
    pub fn check(&self) -> Result<(), StoreError> {
        let lost = |what: &str| {
            StoreError::Lost(format!(
                "{} {what} while the server was running: jobs recorded from now on would be lost at the next \
                 start; stop the server, put the file back (or accept starting over) and start it again",
                self.path.display()
            ))
        };
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(lost("was deleted")),
            Err(e) => return Err(StoreError::Io(e)),
            Ok(_) if file_identity(&self.path) != self.identity => return Err(lost("was replaced")),
            Ok(_) => {}
        }
        let now = unix_ms(SystemTime::now());
        self.conn().execute("INSERT OR REPLACE INTO probe (k, at_ms) VALUES (1, ?1)", [now])?;
        Ok(())
    }

    /// [`JobStore::claim`], blocking.
    pub fn claim(&self, now: SystemTime) -> Result<Option<Claimed>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        loop {
            let next: Option<(i64, String, Option<String>, u32, i64, String)> = tx
                .query_row(
                    "SELECT seq, id, request, attempts, submitted_ms, base_url FROM jobs
                     WHERE state = 'queued' AND (deadline_ms IS NULL OR deadline_ms > ?1)
                     ORDER BY priority, seq LIMIT 1",
                    [unix_ms(now)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .optional()?;
            let Some((seq, id, request, attempts, submitted, base_url)) = next else {
                tx.commit()?;
                return Ok(None);
            };
            match read_stored_request(request.as_deref()) {
                Ok(request) => {
                    let token = uuid::Uuid::new_v4().simple().to_string();
                    tx.execute(
                        "UPDATE jobs SET state = 'running', attempts = attempts + 1, owner = ?2 WHERE seq = ?1",
                        params![seq, token],
                    )?;
                    let log_count: i64 =
                        tx.query_row("SELECT COUNT(*) FROM logs WHERE job_id = ?1", [&id], |r| r.get(0))?;
                    tx.commit()?;
                    return Ok(Some(Claimed {
                        id,
                        token,
                        request,
                        attempt: attempts + 1,
                        submitted: from_unix_ms(submitted),
                        log_count: usize::try_from(log_count).unwrap_or(0),
                        base_url,
                    }));
                }
                Err(failure) => {
                    complete(&tx, &id, &Outcome::Failed(failure))?;
                }
            }
        }
    }

    /// [`JobStore::append_logs`], blocking.
    pub fn append_logs(&self, id: &str, token: &str, from: usize, lines: &[LogLine]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // A job forgotten meanwhile, or no longer the caller's, takes no more lines from it; a
        // line already stored under its number (a retried call) is not added again.
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO logs (job_id, n, level, message, timestamp)
                 SELECT ?1, ?2, ?3, ?4, ?5 FROM jobs WHERE id = ?1 AND owner = ?6",
            )?;
            for (i, line) in lines.iter().enumerate() {
                let n = i64::try_from(from + i).unwrap_or(i64::MAX);
                insert.execute(params![id, n, line.level, line.message, line.timestamp, token])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// [`JobStore::finish`], blocking.
    pub fn finish(&self, id: &str, token: &str, outcome: &Outcome) -> Result<Finished, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held = tx
            .prepare_cached("SELECT 1 FROM jobs WHERE id = ?1 AND state = 'running' AND owner = ?2")?
            .exists(params![id, token])?;
        if !held {
            return Ok(Finished::default());
        }
        let webhook = complete(&tx, id, outcome)?;
        tx.commit()?;
        Ok(Finished { applied: true, webhook })
    }

    /// [`JobStore::cancel`], blocking.
    pub fn cancel(&self, id: &str) -> Result<CancelResult, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let state: Option<String> =
            tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let result = match state.as_deref() {
            None => CancelResult::NotFound,
            Some("completed") => CancelResult::AlreadyCompleted,
            Some("running") => {
                tx.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ?1", [id])?;
                CancelResult::StopRequested
            }
            Some(_) => {
                let outcome = Outcome::Failed(Failure::stopped(StopReason::Cancelled, false));
                CancelResult::Dequeued(complete(&tx, id, &outcome)?)
            }
        };
        tx.commit()?;
        Ok(result)
    }

    /// [`JobStore::release`], blocking.
    pub fn release(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), owner = NULL
             WHERE id = ?1 AND state = 'running' AND owner = ?2",
            params![id, token],
        )?;
        Ok(())
    }

    /// [`JobStore::stop_requested`], blocking.
    pub fn stop_requested(&self, id: &str, token: &str) -> Result<bool, StoreError> {
        let held: Option<bool> = self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT stop_requested = 0 AND state = 'running' AND owner = ?2 FROM jobs WHERE id = ?1",
                )?
                .query_row(params![id, token], |r| r.get(0))
                .optional()?)
        })?;
        // Gone (forgotten), cancelled or not the caller's any more: stop.
        Ok(!held.unwrap_or(false))
    }

    /// [`JobStore::view`], blocking.
    pub fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
        self.read(|conn| view(conn, id, logs_from))
    }

    /// [`JobStore::base_url`], blocking.
    pub fn base_url(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT base_url FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?)
        })
    }

    /// [`JobStore::expire_deadlines`], blocking.
    pub fn expire_deadlines(&self, now: SystemTime) -> Result<Ended, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let late = ids(
            &tx,
            "SELECT id FROM jobs WHERE state = 'queued' AND deadline_ms IS NOT NULL AND deadline_ms <= ?1",
            [unix_ms(now)],
        )?;
        let hooks = complete_all(&tx, late, &Outcome::Failed(Failure::timed_out()))?;
        tx.commit()?;
        Ok(hooks)
    }

    /// [`JobStore::fail_queued`], blocking.
    pub fn fail_queued(&self, failure: &Failure) -> Result<Ended, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let queued = ids(&tx, "SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority, seq", [])?;
        let hooks = complete_all(&tx, queued, &Outcome::Failed(failure.clone()))?;
        tx.commit()?;
        Ok(hooks)
    }

    /// [`JobStore::expire_finished`], blocking.
    pub fn expire_finished(&self, cutoff: SystemTime) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old = ids(&tx, "SELECT id FROM jobs WHERE state = 'completed' AND finished_ms < ?1", [unix_ms(cutoff)])?;
        tx.execute("DELETE FROM jobs WHERE state = 'completed' AND finished_ms < ?1", [unix_ms(cutoff)])?;
        tx.commit()?;
        Ok(old)
    }

    /// [`JobStore::forget`], blocking.
    pub fn forget(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        Ok(())
    }

    /// [`JobStore::contains`], blocking.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT 1 FROM jobs WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some()))
    }

    /// [`JobStore::pending_webhooks`], blocking.
    pub fn pending_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare("SELECT id, job_id, url, payload FROM webhooks ORDER BY id")?;
        let rows = statement.query_map([], |r| {
            Ok(PendingWebhook { delivery_id: r.get(0)?, job_id: r.get(1)?, url: r.get(2)?, payload: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// [`JobStore::webhook_done`], blocking.
    pub fn webhook_done(&self, delivery_id: i64) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM webhooks WHERE id = ?1", [delivery_id])?;
        Ok(())
    }

    /// [`JobStore::stats`], blocking.
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        self.read(|conn| {
            let count = |state: &str| -> Result<usize, StoreError> {
                let n: i64 = conn.query_row("SELECT COUNT(*) FROM jobs WHERE state = ?1", [state], |r| r.get(0))?;
                Ok(usize::try_from(n).unwrap_or(0))
            };
            Ok(QueueStats { queued: count("queued")?, running: count("running")? })
        })
    }

    /// [`JobStore::recover`], blocking.
    pub fn recover(&self, max_attempts: u32) -> Result<Recovery, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // A synchronous job's caller went away with the old process.
        let dropped = tx.execute("DELETE FROM jobs WHERE kind = 'run' AND state != 'completed'", [])?;
        let mut recovery = Recovery { dropped, ..Recovery::default() };
        let running: Vec<(String, u32, bool)> = {
            let mut statement = tx.prepare("SELECT id, attempts, stop_requested FROM jobs WHERE state = 'running'")?;
            let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, attempts, stop_requested) in running {
            let failure = if stop_requested {
                Some(Failure::stopped(StopReason::Cancelled, true))
            } else if attempts >= max_attempts {
                Some(Failure::new(
                    FailureKind::Interrupted,
                    format!("the server stopped while this request was running, {attempts} times; not retried again"),
                ))
            } else {
                None
            };
            match failure {
                Some(failure) => {
                    complete(&tx, &id, &Outcome::Failed(failure))?;
                    recovery.failed += 1;
                }
                None => {
                    tx.execute("UPDATE jobs SET state = 'queued' WHERE id = ?1", [&id])?;
                    recovery.requeued += 1;
                }
            }
        }
        recovery.queued = queued_count(&tx)?;
        let webhooks: i64 = tx.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?;
        recovery.webhooks = usize::try_from(webhooks).unwrap_or(0);
        tx.commit()?;
        Ok(recovery)
    }
}

#[async_trait::async_trait]

impl JobStore for SqliteStore {
    async fn submit(&self, job: NewJob, max_queue: usize) -> Result<Submitted, SubmitError> {
        self.run(move |db| db.submit(job, max_queue)).await
    }

    async fn claim(&self, now: SystemTime) -> Result<Option<Claimed>, StoreError> {
        self.run(move |db| db.claim(now)).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.run(Db::check).await
    }

    async fn append_logs(&self, id: &str, token: &str, from: usize, lines: &[LogLine]) -> Result<(), StoreError> {
        let id = id.to_string();
        let token = token.to_string();
        let lines = lines.to_vec();
        self.run(move |db| db.append_logs(&id, &token, from, &lines)).await
    }

    async fn finish(&self, id: &str, token: &str, outcome: &Outcome) -> Result<Finished, StoreError> {
        let id = id.to_string();
        let token = token.to_string();
        let outcome = outcome.clone();
        self.run(move |db| db.finish(&id, &token, &outcome)).await
    }

    async fn cancel(&self, id: &str) -> Result<CancelResult, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.cancel(&id)).await
    }

    async fn release(&self, id: &str, token: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let token = token.to_string();
        self.run(move |db| db.release(&id, &token)).await
    }

    async fn stop_requested(&self, id: &str, token: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        let token = token.to_string();
        self.run(move |db| db.stop_requested(&id, &token)).await
    }

    async fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.view(&id, logs_from)).await
    }

    async fn base_url(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.base_url(&id)).await
    }

    async fn expire_deadlines(&self, now: SystemTime) -> Result<Ended, StoreError> {
        self.run(move |db| db.expire_deadlines(now)).await
    }

    async fn fail_queued(&self, failure: &Failure) -> Result<Ended, StoreError> {
        let failure = failure.clone();
        self.run(move |db| db.fail_queued(&failure)).await
    }

    async fn expire_finished(&self, cutoff: SystemTime) -> Result<Vec<String>, StoreError> {
        self.run(move |db| db.expire_finished(cutoff)).await
    }

    async fn forget(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.run(move |db| db.forget(&id)).await
    }

    async fn contains(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.run(move |db| db.contains(&id)).await
    }

    async fn pending_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError> {
        self.run(move |db| db.pending_webhooks()).await
    }

    async fn webhook_done(&self, delivery_id: i64) -> Result<(), StoreError> {
        self.run(move |db| db.webhook_done(delivery_id)).await
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.run(move |db| db.stats()).await
    }

    async fn recover(&self, max_attempts: u32) -> Result<Recovery, StoreError> {
        self.run(move |db| db.recover(max_attempts)).await
    }
}

/// A job with its log lines from `logs_from` on (a read).
fn view(conn: &Connection, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
    type Row = (i64, String, String, String, i64, Option<String>);
    let row: Option<Row> = conn
        .prepare_cached("SELECT seq, kind, app, state, priority, outcome FROM jobs WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .optional()?;
    let Some((seq, kind, app, state, priority, outcome)) = row else { return Ok(None) };
    let state = match state.as_str() {
        "queued" => JobState::Queued { position: position(conn, priority, seq)? },
        "running" => JobState::Running,
        _ => {
            let text = outcome.ok_or_else(|| StoreError::Corrupt(format!("job {id} ended without an outcome")))?;
            JobState::Completed(serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        }
    };
    let log_count: i64 =
        conn.prepare_cached("SELECT COUNT(*) FROM logs WHERE job_id = ?1")?.query_row([id], |r| r.get(0))?;
    let mut statement =
        conn.prepare_cached("SELECT level, message, timestamp FROM logs WHERE job_id = ?1 AND n >= ?2 ORDER BY n")?;
    let logs = statement
        .query_map(params![id, i64::try_from(logs_from).unwrap_or(i64::MAX)], |r| {
            Ok(LogLine { level: r.get(0)?, message: r.get(1)?, timestamp: r.get(2)? })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let kind = if kind == "run" { JobKind::Run } else { JobKind::Queued };
    Ok(Some(JobView { id: id.to_string(), kind, app, state, logs, log_count: usize::try_from(log_count).unwrap_or(0) }))
}

/// Exact 0-based queue position of the queued job (`priority`, `seq`).
fn position(conn: &Connection, priority: i64, seq: i64) -> Result<usize, StoreError> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (priority < ?1 OR (priority = ?1 AND seq < ?2))",
        )?
        .query_row(params![priority, seq], |r| r.get(0))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::job::{JobKind, Priority};
    use pixart_fal::GenerateRequest;
    use std::time::Duration;

    struct Db {
        dir: std::path::PathBuf,
        store: SqliteStore,
    }

    impl Db {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("pixart-store-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let store = SqliteStore::open(&dir.join("jobs.sqlite3")).unwrap();
            Self { dir, store }
        }
        /// The same file opened again, as a restarted server does (the old handle is dropped
        /// without any cleanup, as a killed process leaves it).
        fn reopen(mut self) -> Self {
            let fresh = SqliteStore::open(&self.dir.join("jobs.sqlite3")).unwrap();
            drop(std::mem::replace(&mut self.store, fresh));
            self
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn submit(store: &SqliteStore, priority: Priority, webhook: bool) -> String {
        let mut job =
            NewJob::new(JobKind::Queued, "fal-ai/pixart-sigma", "http://h", Ok(GenerateRequest::new("a cat")));
        job.priority = priority;
        job.webhook = webhook.then(|| "https://hooks.example.com/x".to_string());
        let id = job.id.clone();
        store.db().submit(job, 10).unwrap();
        id
    }

    fn position(store: &SqliteStore, id: &str) -> Option<usize> {
        match store.db().view(id, 0).unwrap()?.state {
            JobState::Queued { position } => Some(position),
            _ => None,
        }
    }

    fn outcome(store: &SqliteStore, id: &str) -> Option<Outcome> {
        match store.db().view(id, 0).unwrap()?.state {
            JobState::Completed(outcome) => Some(outcome),
            _ => None,
        }
    }

    #[test]
    fn positions_are_exact_through_priority_start_and_cancel() {
        let db = Db::new();
        let s = &db.store;
        let low = submit(s, Priority::Low, false);
        let a = submit(s, Priority::Normal, false);
        let b = submit(s, Priority::Normal, false);
        // Normal requests go before the low-priority one.
        let positions = |ids: &[&String]| ids.iter().map(|id| position(s, id)).collect::<Vec<_>>();
        assert_eq!(positions(&[&a, &b, &low]), [Some(0), Some(1), Some(2)]);
        let started = s.db().claim(SystemTime::now()).unwrap().unwrap();
        assert_eq!((started.id.as_str(), started.attempt), (a.as_str(), 1));
        assert_eq!(s.db().stats().unwrap(), QueueStats { queued: 2, running: 1 });
        assert_eq!(positions(&[&a, &b, &low]), [None, Some(0), Some(1)]);
        assert!(matches!(s.db().cancel(&b).unwrap(), CancelResult::Dequeued(None)));
        assert_eq!(positions(&[&low]), [Some(0)]);
        assert_eq!(outcome(s, &b).unwrap().failure().unwrap().kind, FailureKind::Cancelled);
        // A running job is flagged; it ends when its worker says so.
        assert!(matches!(s.db().cancel(&a).unwrap(), CancelResult::StopRequested));
        assert!(s.db().stop_requested(&a, &started.token).unwrap());
        assert!(outcome(s, &a).is_none());
        // Only the claim's holder may end it.
        let stopped = Outcome::Failed(Failure::stopped(StopReason::Cancelled, true));
        assert!(!s.db().finish(&a, "another worker", &stopped).unwrap().applied);
        assert!(s.db().finish(&a, &started.token, &stopped).unwrap().applied);
        assert!(matches!(s.db().cancel(&a).unwrap(), CancelResult::AlreadyCompleted));
        assert!(matches!(s.db().cancel("nope").unwrap(), CancelResult::NotFound));
    }

    #[test]
    fn the_stored_input_reads_back_as_the_accepted_request() {
        let db = Db::new();
        let text = r#"{"prompt": "a fox", "negative_prompt": "blur", "image_size": {"width": 512, "height": 384},
            "num_inference_steps": 7, "guidance_scale": 3.5, "seed": 42, "style": "(No style)",
            "scheduler": "SA-SOLVER", "num_images": 2, "sync_mode": true, "enable_safety_checker": false}"#;
        let request = GenerateRequest::from_json(text).unwrap();
        let job = NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(request.clone()));
        db.store.db().submit(job, 1).unwrap();
        assert_eq!(db.store.db().claim(SystemTime::now()).unwrap().unwrap().request, request);
        let preset = GenerateRequest::from_json(r#"{"prompt": "p", "image_size": "portrait_16_9"}"#).unwrap();
        db.store.db().submit(NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(preset.clone())), 1).unwrap();
        assert_eq!(db.store.db().claim(SystemTime::now()).unwrap().unwrap().request, preset);
    }

    #[test]
    fn a_full_queue_refuses_every_submit_and_invalid_input_takes_no_slot() {
        let db = Db::new();
        let s = &db.store;
        let invalid = || {
            let failure = Failure::invalid(&[pixart_fal::FieldError::missing("prompt")]);
            NewJob::new(JobKind::Queued, "x/y", "http://h", Err(failure))
        };
        // With room, invalid input is recorded as ended without taking a slot.
        let recorded = invalid();
        let id = recorded.id.clone();
        assert!(s.db().submit(recorded, 1).unwrap().position.is_none());
        assert_eq!(outcome(s, &id).unwrap().failure().unwrap().kind, FailureKind::InvalidInput);
        submit(s, Priority::Normal, false);
        // Full: valid and invalid input alike are refused, and nothing is stored.
        let extra = NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(GenerateRequest::new("c")));
        assert!(matches!(s.db().submit(extra, 1), Err(SubmitError::QueueFull(1))));
        let refused = invalid();
        let refused_id = refused.id.clone();
        assert!(matches!(s.db().submit(refused, 1), Err(SubmitError::QueueFull(1))));
        assert!(!s.db().contains(&refused_id).unwrap());
        assert_eq!(s.db().stats().unwrap().queued, 1);
    }

    #[test]
    fn deadlines_end_queued_jobs_with_their_webhooks() {
        let db = Db::new();
        let s = &db.store;
        let mut late = NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(GenerateRequest::new("a")));
        late.webhook = Some("https://hooks.example.com/x".into());
        late.start_deadline = Some(SystemTime::now());
        let late_id = late.id.clone();
        s.db().submit(late, 10).unwrap();
        let kept = submit(s, Priority::Normal, false);
        // Claim skips the late job (the sweep ends it).
        assert_eq!(s.db().claim(SystemTime::now() + Duration::from_millis(1)).unwrap().unwrap().id, kept);
        let ended = s.db().expire_deadlines(SystemTime::now() + Duration::from_millis(1)).unwrap();
        assert_eq!(ended.count, 1);
        assert_eq!(ended.webhooks[0].job_id, late_id);
        let payload: serde_json::Value = serde_json::from_str(&ended.webhooks[0].payload).unwrap();
        assert_eq!(payload["status"], "ERROR");
        assert_eq!(payload["payload"]["error_type"], "RequestTimeout");
        assert_eq!(outcome(s, &late_id).unwrap().failure().unwrap().kind, FailureKind::Timeout);
        assert_eq!(s.db().expire_deadlines(SystemTime::now()).unwrap().count, 0);
    }

    #[test]
    fn a_reopened_store_requeues_the_interrupted_job_and_keeps_everything_else() {
        let db = Db::new();
        let done = submit(&db.store, Priority::Normal, true);
        let running = submit(&db.store, Priority::Normal, true);
        let queued = submit(&db.store, Priority::Low, false);
        let run = NewJob::new(JobKind::Run, "x/y", "http://h", Ok(GenerateRequest::new("sync")));
        let run_id = run.id.clone();
        db.store.db().submit(run, 10).unwrap();
        let first = db.store.db().claim(SystemTime::now()).unwrap().unwrap();
        assert_eq!(first.id, done);
        db.store.db().append_logs(&done, &first.token, 0, &[LogLine::new("INFO", "Done")]).unwrap();
        // A retried call adds nothing twice; a worker not holding the job adds nothing.
        db.store.db().append_logs(&done, &first.token, 0, &[LogLine::new("INFO", "Done")]).unwrap();
        db.store.db().append_logs(&done, "not the holder", 1, &[LogLine::new("INFO", "dropped")]).unwrap();
        let response = pixart_fal::GenerateResponse {
            images: Vec::new(),
            timings: pixart_fal::Timings { inference: 0.5 },
            seed: 7,
            has_nsfw_concepts: Vec::new(),
            prompt: "a cat".into(),
        };
        let succeeded = Outcome::Succeeded { response, inference_time: 0.5 };
        let hook = db.store.db().finish(&done, &first.token, &succeeded).unwrap().webhook.unwrap();
        assert_eq!(db.store.db().claim(SystemTime::now()).unwrap().unwrap().id, running);
        // Killed here: one job running, one queued, a run job queued, a webhook undelivered.
        let db = db.reopen();
        let recovery = db.store.db().recover(3).unwrap();
        assert_eq!(recovery, Recovery { requeued: 1, failed: 0, dropped: 1, queued: 2, webhooks: 1 });
        assert_eq!(db.store.db().pending_webhooks().unwrap(), [hook.clone()]);
        db.store.db().webhook_done(hook.delivery_id).unwrap();
        assert!(db.store.db().pending_webhooks().unwrap().is_empty());
        let view = db.store.db().view(&done, 0).unwrap().unwrap();
        assert!(matches!(view.state, JobState::Completed(Outcome::Succeeded { .. })));
        assert_eq!(view.logs.len(), 1, "a line from a worker not holding the job is dropped");
        assert_eq!(view.logs[0].message, "Done");
        assert!(db.store.db().view(&run_id, 0).unwrap().is_none(), "a run job's caller is gone");
        assert_eq!(position(&db.store, &running), Some(0), "the interrupted job keeps its place");
        assert_eq!(position(&db.store, &queued), Some(1));
        // It is started again; interrupted twice more, it fails with a clear error and its webhook.
        let mut db = db;
        for attempt in 2..=3 {
            let claimed = db.store.db().claim(SystemTime::now()).unwrap().unwrap();
            assert_eq!((claimed.id.as_str(), claimed.attempt), (running.as_str(), attempt));
            db = db.reopen();
            db.store.db().recover(3).unwrap();
        }
        let failure = outcome(&db.store, &running).unwrap().failure().unwrap().clone();
        assert_eq!(failure.kind, FailureKind::Interrupted);
        assert!(failure.message.contains("3 times"), "{}", failure.message);
        assert_eq!(db.store.db().pending_webhooks().unwrap().len(), 1);
        // A graceful stop gives the job back without counting the start.
        let claimed = db.store.db().claim(SystemTime::now()).unwrap().unwrap();
        assert_eq!(claimed.id, queued);
        db.store.db().release(&queued, "not the holder").unwrap();
        assert!(position(&db.store, &queued).is_none(), "only its holder gives a job back");
        db.store.db().release(&queued, &claimed.token).unwrap();
        assert_eq!(db.store.db().claim(SystemTime::now()).unwrap().unwrap().attempt, 1);
    }

    #[test]
    fn retention_forgets_ended_jobs_with_their_logs() {
        let db = Db::new();
        let id = submit(&db.store, Priority::Normal, false);
        let claimed = db.store.db().claim(SystemTime::now()).unwrap().unwrap();
        db.store.db().append_logs(&id, &claimed.token, 0, &[LogLine::new("INFO", "x")]).unwrap();
        db.store.db().finish(&id, &claimed.token, &Outcome::Failed(Failure::timed_out())).unwrap();
        assert!(db.store.db().expire_finished(SystemTime::now() - Duration::from_secs(60)).unwrap().is_empty());
        assert_eq!(db.store.db().expire_finished(SystemTime::now() + Duration::from_secs(1)).unwrap(), [id.clone()]);
        assert!(!db.store.db().contains(&id).unwrap());
        let logs: i64 = db.store.db().conn().query_row("SELECT COUNT(*) FROM logs", [], |r| r.get(0)).unwrap();
        assert_eq!(logs, 0, "logs go with their job");
        db.store.db().append_logs(&id, &claimed.token, 1, &[LogLine::new("INFO", "late")]).unwrap();
        assert!(db.store.db().stop_requested(&id, &claimed.token).unwrap(), "a forgotten job is wanted by no one");
    }
}
