//! The queue core: jobs and their store, the worker, files, uploads and webhook delivery.
//! Nothing here knows about HTTP (no status codes, no axum, no routes); the `http` module maps
//! it to fal's API. It speaks fal's formats where they are stored: results and webhook payloads
//! ([`fal_format`]). No call here blocks the async runtime: store calls are async, file work
//! runs on the blocking pool, and the worker is a thread of its own.
//!
//! Dependencies point one way: `job` ← `fal_format` ← `store` ← `sqlite`/`redis_store`/`queue` ← `worker`;
//! `retry` ← `webhook` ← `queue`; `webhook_target` ← `remote_file` ← `lora_source`/`image_source`
//! ← `worker`; `files` ← `ballast` ← `queue`; `uploads`, `cdn_tokens` and `metrics` stand alone.

pub mod ballast;
pub mod cdn_tokens;
pub mod counters;
pub mod fal_format;
pub mod files;
pub mod image_source;
pub mod job;
pub mod lora_source;
pub mod metrics;
pub mod queue;
pub mod redis_store;
pub mod remote_file;
pub mod retry;
pub mod sqlite;
pub mod store;
pub mod sweeper;
pub mod uploads;
pub mod webhook;
pub mod webhook_target;
pub mod worker;

pub use counters::Counters;
pub use job::{Failure, FailureKind, JobKind, JobState, JobView, LogLine, NewJob, Outcome, Priority, StopReason};
pub use queue::{Progress, Queue, RefusedSubmit};
pub use redis_store::RedisStore;
pub use sqlite::SqliteStore;
pub use store::{CancelResult, JobStore, PendingWebhook, QueueStats, Recovery, StoreError, SubmitError};
