//! [`RedisStore`]: a [`JobStore`] on Redis, shared by any number of HTTP fronts and workers.
//!
//! The pattern is a reliable queue with leases (what BullMQ and Sidekiq's reliable fetch do),
//! not Streams: fal's API needs exact queue positions, two priorities and removal of a queued
//! request on cancel, which a sorted set gives directly (`ZRANK`, score = priority then
//! submission order, `ZREM`), while a stream's consumer group has no order but arrival and no
//! position. Every state change is one Lua script, so it is atomic across processes.
//!
//! Keys (prefix `pixart:`): `seq`; `queue` (zset, id → priority·10¹² + seq); `running` (zset,
//! id → lease expiry in ms); `deadlines` (zset, queued ids with a start deadline); `finished`
//! (zset, id → end time, for the retention sweep); `job:{id}` (hash); `logs:{id}` (list of
//! JSON lines); `webhooks` (zset, delivery id → lease expiry) and `webhook:{n}` (hash).
//!
//! A worker holds a lease on its job and extends it every third of the visibility timeout; a
//! worker that dies (kill -9, lost machine) stops extending it, and when it runs out any
//! process's sweep puts the job back at its place in the queue (attempt + 1), or fails it after
//! the allowed attempts. A finish is accepted once: a worker presumed dead that finishes later
//! finds the job already ended and its answer is dropped. Webhooks are claimed the same way, so
//! a pending one is sent by exactly one process, again by another only if that one died.
//!
//! Needs a standalone Redis (or one behind Sentinel), not Redis Cluster: the scripts build key
//! names. Run it with persistence (`appendonly yes`) so a Redis restart loses nothing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::Retryable;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, Value as RedisValue};

use super::counters::Counters;
use super::fal_format::webhook_payload;
use super::job::{
    from_unix_ms, unix_ms, Failure, FailureKind, JobKind, JobState, JobView, LogLine, NewJob, Outcome, StopReason,
};
use super::metrics::{Histogram, Latencies, Latency};
use super::retry::RetryPolicy;
use super::store::{
    read_stored_request, CancelResult, Claimed, Ended, Finished, JobStore, PendingWebhook, QueueStats, Recovery,
    StoreError, SubmitError, Submitted,
};

const PREFIX: &str = "pixart:";

/// Ends a job: shared by the scripts that end jobs. Returns the new delivery id, 0 without a
/// webhook, -1 when the job is unknown, already ended or not in `want` (when given).
const COMPLETE: &str = r"
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function complete(p, id, want, outcome, payload, now, hook_lease, counter)
  local key = p .. 'job:' .. id
  local state = redis.call('HGET', key, 'state')
  if (not state) or state == 'completed' or (want ~= '' and state ~= want) then return -1 end
  redis.call('HSET', key, 'state', 'completed', 'outcome', outcome, 'finished_ms', now, 'stop_requested', 0)
  redis.call('HINCRBY', p .. 'counters', counter, 1)
  redis.call('HDEL', key, 'request')
  redis.call('ZREM', p .. 'queue', id)
  redis.call('ZREM', p .. 'running', id)
  redis.call('ZREM', p .. 'deadlines', id)
  redis.call('ZADD', p .. 'finished', now, id)
  local hook = redis.call('HGET', key, 'webhook')
  if hook and hook ~= '' and payload ~= '' then
    local n = redis.call('INCR', p .. 'webhook_seq')
    redis.call('HSET', p .. 'webhook:' .. n, 'job_id', id, 'url', hook, 'payload', payload)
    redis.call('ZADD', p .. 'webhooks', hook_lease, n)
    redis.call('HSET', key, 'delivery', n)
    return n
  end
  return 0
end
";

/// Adds a job, unless it reaches Redis after its deadline (`ARGV[16]`, on Redis' clock) or its
/// front withdrew it (the front answered 503 without knowing whether the call got through); a
/// job already there (a retried call) is answered as it is. Invalid input counts against the
/// queue's limit too.
const SUBMIT: &str = r"
local p, id, max, valid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local priority = tonumber(ARGV[5])
if redis_now() > tonumber(ARGV[16]) or redis.call('EXISTS', p .. 'withdrawn:' .. id) == 1 then return {'late', 0} end
local state = redis.call('HGET', p .. 'job:' .. id, 'state')
if state == 'queued' then return {'queued', redis.call('ZRANK', p .. 'queue', id)} end
if state then return {'ended', 0} end
if redis.call('ZCARD', p .. 'queue') >= max then return {'full', 0} end
redis.call('HINCRBY', p .. 'counters', 'accepted', 1)
local seq = redis.call('INCR', p .. 'seq')
local score = priority * 1000000000000 + seq
redis.call('HSET', p .. 'job:' .. id, 'kind', ARGV[6], 'app', ARGV[7], 'base_url', ARGV[8], 'webhook', ARGV[9],
  'deadline_ms', ARGV[10], 'request', ARGV[11], 'state', 'queued', 'attempts', 0, 'stop_requested', 0,
  'submitted_ms', ARGV[12], 'score', score)
if valid then
  redis.call('ZADD', p .. 'queue', score, id)
  if ARGV[10] ~= '' then redis.call('ZADD', p .. 'deadlines', ARGV[10], id) end
  return {'queued', redis.call('ZRANK', p .. 'queue', id)}
end
return {'ended', complete(p, id, '', ARGV[13], ARGV[14], ARGV[12], ARGV[15], 'failed')}
";

/// Takes back a submit its front answered 503 (the call's outcome unknown): a late copy that
/// arrives after this is refused (`withdrawn:{id}`), one that arrived before is removed while it
/// is still queued. Answers the job's state when it was already taken (it runs).
const WITHDRAW: &str = r"
local p, id = ARGV[1], ARGV[2]
redis.call('SET', p .. 'withdrawn:' .. id, 1, 'EX', 3600)
local key = p .. 'job:' .. id
local state = redis.call('HGET', key, 'state')
if not state then return 'absent' end
if state ~= 'queued' then return state end
redis.call('DEL', key)
redis.call('ZREM', p .. 'queue', id)
redis.call('ZREM', p .. 'deadlines', id)
redis.call('HINCRBY', p .. 'counters', 'accepted', -1)
return 'withdrawn'
";

/// Gives back the job a claim took if its answer never reached the worker (`ARGV[2]`, the
/// claim's token): queued again, the start not counted.
const RELEASE_TOKEN: &str = r"
local p, token = ARGV[1], ARGV[2]
for _, id in ipairs(redis.call('ZRANGE', p .. 'running', 0, -1)) do
  local key = p .. 'job:' .. id
  if redis.call('HGET', key, 'state') == 'running' and redis.call('HGET', key, 'owner') == token then
    requeue(p, id, -1)
    redis.call('HINCRBY', p .. 'counters', 'started', -1)
    return 1
  end
end
return 0
";

/// Takes the next job, unless the call reaches Redis after its deadline (`ARGV[5]`).
const CLAIM: &str = r"
local p, now, lease, token = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis_now() > tonumber(ARGV[5]) then return false end
local ids = redis.call('ZRANGE', p .. 'queue', 0, 63)
for _, id in ipairs(ids) do
  local key = p .. 'job:' .. id
  local d = redis.call('HGET', key, 'deadline_ms')
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', p .. 'queue', id)
  elseif (not d) or d == '' or tonumber(d) > now then
    redis.call('ZREM', p .. 'queue', id)
    redis.call('ZREM', p .. 'deadlines', id)
    redis.call('ZADD', p .. 'running', redis_now() + lease, id)
    redis.call('HSET', key, 'state', 'running', 'owner', token)
    local attempts = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HINCRBY', p .. 'counters', 'started', 1)
    return {id, redis.call('HGET', key, 'request') or '', attempts, redis.call('HGET', key, 'submitted_ms'),
            redis.call('LLEN', p .. 'logs:' .. id), redis.call('HGET', key, 'base_url') or ''}
  end
end
return false
";

/// Puts a running job back at its place in the queue.
const REQUEUE_FN: &str = r"
local function requeue(p, id, delta)
  local key = p .. 'job:' .. id
  redis.call('ZREM', p .. 'running', id)
  redis.call('ZADD', p .. 'queue', redis.call('HGET', key, 'score'), id)
  local d = redis.call('HGET', key, 'deadline_ms')
  if d and d ~= '' then redis.call('ZADD', p .. 'deadlines', d, id) end
  redis.call('HSET', key, 'state', 'queued', 'owner', '')
  if delta ~= 0 then redis.call('HINCRBY', key, 'attempts', delta) end
end
";

/// A graceful release by the worker holding the job: back in the queue, the start not counted.
const RELEASE: &str = r"
local p, id, token = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'state') ~= 'running' or redis.call('HGET', key, 'owner') ~= token then return 0 end
requeue(p, id, -1)
return 1
";

/// Takes back a job whose lease ran out, deciding on the state as it is now: still running,
/// lease still expired (on Redis' clock), not started again meanwhile (`ARGV[3]` attempts).
/// Cancelled ones end cancelled, ones out of attempts fail (outcomes and payloads prepared by
/// the caller), others go back to the queue.
const REAP: &str = r"
local p, id, attempts, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. 'job:' .. id
if redis.call('HGET', key, 'state') ~= 'running' then return {'skip', 0} end
local lease = redis.call('ZSCORE', p .. 'running', id)
local now = redis_now()
if (not lease) or tonumber(lease) > now or redis.call('HGET', key, 'attempts') ~= attempts then return {'skip', 0} end
if redis.call('HGET', key, 'stop_requested') == '1' then
  return {'cancelled', complete(p, id, 'running', ARGV[5], ARGV[6], now, now + tonumber(ARGV[9]), 'cancelled')}
end
if tonumber(attempts) >= max then
  return {'failed', complete(p, id, 'running', ARGV[7], ARGV[8], now, now + tonumber(ARGV[9]), 'failed')}
end
requeue(p, id, 0)
return {'requeued', 0}
";

/// Ends a job (held by the claim token `ARGV[8]`, when given). A finish retried after its first
/// try was applied (the answer was lost) is answered as that one was: applied, same delivery.
const FINISH: &str = r"
local key = ARGV[1] .. 'job:' .. ARGV[2]
if ARGV[8] ~= '' then
  if redis.call('HGET', key, 'state') == 'completed' and redis.call('HGET', key, 'finished_by') == ARGV[8] then
    return tonumber(redis.call('HGET', key, 'delivery') or '0')
  end
  if redis.call('HGET', key, 'owner') ~= ARGV[8] then return -1 end
end
local n = complete(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[9])
if n >= 0 and ARGV[8] ~= '' then redis.call('HSET', key, 'finished_by', ARGV[8]) end
return n
";

const CANCEL: &str = r"
local p, id = ARGV[1], ARGV[2]
local key = p .. 'job:' .. id
local state = redis.call('HGET', key, 'state')
if not state then return {'missing', 0} end
if state == 'completed' then return {'completed', 0} end
if state == 'running' then
  redis.call('HSET', key, 'stop_requested', 1)
  return {'stop', 0}
end
return {'dequeued', complete(p, id, 'queued', ARGV[3], ARGV[4], ARGV[5], ARGV[6], 'cancelled')}
";

/// Appends lines numbered from `ARGV[4]` to a job its caller holds; lines already stored (a
/// retried call whose first try reached Redis) are not added again.
const APPEND_LOGS: &str = r"
local p, id, token, from = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', p .. 'job:' .. id, 'owner') ~= token then return 0 end
local have = redis.call('LLEN', p .. 'logs:' .. id)
for i = 5, #ARGV do
  if from + (i - 5) >= have then redis.call('RPUSH', p .. 'logs:' .. id, ARGV[i]) end
end
return 0
";

const CLAIM_WEBHOOKS: &str = r"
local p, lease = ARGV[1], tonumber(ARGV[3])
local now = redis_now()
local ids = redis.call('ZRANGEBYSCORE', p .. 'webhooks', '-inf', now, 'LIMIT', 0, 100)
local out = {}
for _, n in ipairs(ids) do
  redis.call('ZADD', p .. 'webhooks', now + lease, n)
  local h = redis.call('HMGET', p .. 'webhook:' .. n, 'job_id', 'url', 'payload')
  if h[1] then table.insert(out, {n, h[1], h[2], h[3]}) end
end
return out
";

const HEARTBEAT: &str = r"
local p, until_ms = ARGV[1], redis_now() + tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  if redis.call('HGET', p .. 'job:' .. ARGV[i], 'owner') == ARGV[i + 1] then
    redis.call('ZADD', p .. 'running', 'XX', until_ms, ARGV[i])
  end
end
return 0
";

/// The sender is starting the delivery: its lease starts again.
const WEBHOOK_STARTED: &str = r"
redis.call('ZADD', ARGV[1] .. 'webhooks', 'XX', redis_now() + tonumber(ARGV[3]), ARGV[2])
return 0
";

/// Jobs in Redis, reached through one multiplexed async connection (redis' connection manager
/// reconnects it in the background).
pub struct RedisStore {
    url: String,
    conn: ConnectionManager,
    lease: Duration,
    webhook_lease: Duration,
    /// Redis' clock minus this host's, in ms (measured at open and at every sweep).
    clock_offset: Arc<AtomicI64>,
    /// Whether [`RedisStore::clock_offset`] holds a measurement.
    clock_measured: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("lease", &self.lease)
            .field("webhook_lease", &self.webhook_lease)
            .finish_non_exhaustive()
    }
}

/// How long one Redis call may take: a stalled Redis makes calls fail (a 503 for clients, a
/// retry for workers) instead of holding them.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after it was sent a submit or a claim may still take effect: Redis refuses one that
/// reaches it later (judged on its own clock), so a call its caller gave up on after
/// [`CALL_TIMEOUT`] (a stalled Redis that resumes with the call still in its socket) never
/// queues or starts a job behind the caller's back.
pub const CALL_WINDOW: Duration = Duration::from_secs(1);

/// The longest round trip (ms) of a `TIME` call whose answer is trusted to measure Redis' clock.
const CLOCK_SAMPLE_RTT: i64 = 100;

/// The counter an outcome adds to (the shared counters change in the same script as the state).
fn counter_name(outcome: &Outcome) -> &'static str {
    let counted = Counters::ended(outcome);
    if counted.succeeded > 0 {
        "succeeded"
    } else if counted.cancelled > 0 {
        "cancelled"
    } else {
        "failed"
    }
}

/// Runs one of the scripts (with the shared Lua functions) on `conn`.
async fn run_script(conn: &ConnectionManager, body: &str, args: &[String]) -> Result<RedisValue, StoreError> {
    let source = format!("{COMPLETE}\n{REQUEUE_FN}\n{body}");
    let script = Script::new(&source);
    let mut invocation = script.prepare_invoke();
    for arg in args {
        invocation.arg(arg);
    }
    let mut conn = conn.clone();
    invocation.invoke_async::<RedisValue>(&mut conn).await.map_err(error)
}

/// Runs `body` in the background until Redis answers (through an outage of about a minute), for
/// calls whose first outcome is unknown; returns its answer as text.
fn settle_later(conn: &ConnectionManager, body: &'static str, args: Vec<String>, settled: fn(&str, Option<String>)) {
    let conn = conn.clone();
    tokio::spawn(async move {
        let call = || run_script(&conn, body, &args);
        let answer =
            call.retry(RetryPolicy::store_outage().backoff()).when(|e| matches!(e, StoreError::Unavailable(_))).await;
        let subject = args.get(1).cloned().unwrap_or_default();
        match answer {
            Ok(value) => settled(&subject, text(Some(&value))),
            Err(e) => tracing::error!(subject, error = %e, "an interrupted Redis call could not be settled"),
        }
    });
}

/// Milliseconds of a duration, saturated.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Redis answers that mean "not now": loading its data after a restart, a replica or a master
/// going down during a failover, a script running long.
const TRANSIENT: [&str; 6] = ["LOADING", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN"];

fn error(e: redis::RedisError) -> StoreError {
    use redis::RetryMethod;
    let retry = matches!(
        e.retry_method(),
        RetryMethod::WaitAndRetry
            | RetryMethod::RetryImmediately
            | RetryMethod::Reconnect
            | RetryMethod::ReconnectFromInitialConnections
    );
    if retry
        || e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.code().is_some_and(|code| TRANSIENT.contains(&code))
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Redis(e.to_string())
    }
}

fn text(value: Option<&RedisValue>) -> Option<String> {
    match value? {
        RedisValue::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        RedisValue::SimpleString(s) => Some(s.clone()),
        RedisValue::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(value: Option<&RedisValue>) -> Option<i64> {
    match value? {
        RedisValue::Int(n) => Some(*n),
        other => text(Some(other))?.parse().ok(),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("redis: {what}"))
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT[/DB]`, `rediss://` for TLS). `lease` is the
    /// visibility timeout of a running job; `webhook_lease` how long a delivery may take before
    /// another process may send it.
    pub async fn open(url: &str, lease: Duration, webhook_lease: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Redis(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        // Fails at start when Redis cannot be reached, not at the first request.
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(error)?;
        let clock_offset = Arc::new(AtomicI64::new(0));
        let clock_measured = std::sync::atomic::AtomicBool::new(false);
        let store = Self { url: url.to_string(), conn, lease, webhook_lease, clock_offset, clock_measured };
        store.query::<String>(&redis::cmd("PING")).await?;
        store.measure_clock().await?;
        Ok(store)
    }

    /// Measures Redis' clock against this host's (the midpoint of a `TIME` call).
    /// A sample whose round trip took longer than [`CLOCK_SAMPLE_RTT`] is not trusted (the
    /// previous offset stays), unless there is none yet.
    async fn measure_clock(&self) -> Result<(), StoreError> {
        let before = Self::now_ms();
        let (seconds, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await?;
        let after = Self::now_ms();
        let offset = seconds * 1000 + micros / 1000 - (before + after) / 2;
        if after - before <= CLOCK_SAMPLE_RTT || !self.clock_measured.swap(true, Ordering::Relaxed) {
            self.clock_offset.store(offset, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The latest time (on Redis' clock) a submit or claim sent now may take effect.
    fn call_deadline(&self) -> i64 {
        Self::now_ms() + self.clock_offset.load(Ordering::Relaxed) + ms(CALL_WINDOW)
    }

    /// Runs one command.
    async fn query<T: FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        command.query_async(&mut conn).await.map_err(error)
    }

    /// A shared latency histogram.
    async fn histogram(&self, which: Latency) -> Result<Histogram, StoreError> {
        let key = format!("{PREFIX}latency:{}", which.name());
        let fields: std::collections::HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        let get = |name: &str| fields.get(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let counts = (0..which.bounds().len()).map(|i| get(&format!("b{i}")) as u64).collect();
        Ok(Histogram::from_parts(which.bounds(), counts, get("sum"), get("count") as u64))
    }

    /// Runs a pipeline.
    async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(error)
    }

    async fn script(&self, body: &str, args: &[String]) -> Result<RedisValue, StoreError> {
        run_script(&self.conn, body, args).await
    }

    fn now_ms() -> i64 {
        unix_ms(SystemTime::now())
    }

    /// `base_url` and `webhook` of a job, for its webhook payload.
    async fn hook_fields(&self, id: &str) -> Result<(String, String), StoreError> {
        let key = format!("{PREFIX}job:{id}");
        let fields: Vec<Option<String>> =
            self.query(redis::cmd("HMGET").arg(&key).arg("base_url").arg("webhook")).await?;
        let get = |i: usize| fields.get(i).cloned().flatten().unwrap_or_default();
        Ok((get(0), get(1)))
    }

    /// The stored outcome and the webhook payload of ending `id` with `outcome`, with the
    /// job's webhook URL.
    async fn ending(&self, id: &str, outcome: &Outcome) -> Result<(String, String, String), StoreError> {
        let (base_url, webhook) = self.hook_fields(id).await?;
        let payload =
            if webhook.is_empty() { String::new() } else { webhook_payload(id, &base_url, outcome).to_string() };
        let text = serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((text, payload, webhook))
    }

    /// Ends `id` with `outcome` if it is in state `want` (any unended state when empty) and,
    /// with a `token`, held by it. `None`: left as it was.
    async fn complete(
        &self,
        id: &str,
        want: &str,
        token: &str,
        outcome: &Outcome,
    ) -> Result<Option<Option<PendingWebhook>>, StoreError> {
        let (outcome_text, payload, webhook) = self.ending(id, outcome).await?;
        let now = Self::now_ms();
        let args = [
            PREFIX.to_string(),
            id.to_string(),
            want.to_string(),
            outcome_text,
            payload.clone(),
            now.to_string(),
            (now + ms(self.webhook_lease)).to_string(),
            token.to_string(),
            counter_name(outcome).to_string(),
        ];
        let n = number(Some(&self.script(FINISH, &args).await?)).ok_or_else(|| corrupt("finish answered no number"))?;
        Ok(match n {
            -1 => None,
            0 => Some(None),
            n => Some(Some(PendingWebhook { delivery_id: n, job_id: id.to_string(), url: webhook, payload })),
        })
    }

    async fn ids(&self, key: &str, max_score: i64) -> Result<Vec<String>, StoreError> {
        self.query(redis::cmd("ZRANGEBYSCORE").arg(format!("{PREFIX}{key}")).arg("-inf").arg(max_score)).await
    }

    async fn end_all(&self, ids: Vec<String>, want: &str, outcome: &Outcome) -> Result<Ended, StoreError> {
        let mut ended = Ended::default();
        for id in ids {
            if let Some(hook) = self.complete(&id, want, "", outcome).await? {
                ended.count += 1;
                if outcome.failure().is_some_and(|f| f.kind == FailureKind::Cancelled) {
                    ended.cancelled += 1;
                }
                ended.webhooks.extend(hook);
            }
        }
        Ok(ended)
    }
}

#[async_trait::async_trait]
impl JobStore for RedisStore {
    async fn submit(&self, job: NewJob, max_queue: usize) -> Result<Submitted, SubmitError> {
        let request = match &job.input {
            Ok(request) => serde_json::to_string(request).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            Err(_) => String::new(),
        };
        let (outcome, payload) = match &job.input {
            Ok(_) => (String::new(), String::new()),
            Err(failure) => {
                let outcome = Outcome::Failed(failure.clone());
                let payload = match &job.webhook {
                    Some(_) => webhook_payload(&job.id, &job.base_url, &outcome).to_string(),
                    None => String::new(),
                };
                (serde_json::to_string(&outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?, payload)
            }
        };
        let now = Self::now_ms();
        let args = [
            PREFIX.to_string(),
            job.id.clone(),
            max_queue.to_string(),
            if job.input.is_ok() { "1" } else { "0" }.to_string(),
            job.priority.rank().to_string(),
            match job.kind {
                JobKind::Queued => "queued",
                JobKind::Run => "run",
            }
            .to_string(),
            job.app.clone(),
            job.base_url.clone(),
            job.webhook.clone().unwrap_or_default(),
            job.start_deadline.map(|d| unix_ms(d).to_string()).unwrap_or_default(),
            request,
            now.to_string(),
            outcome,
            payload.clone(),
            (now + ms(self.webhook_lease)).to_string(),
            self.call_deadline().to_string(),
        ];
        let answer = match self.script(SUBMIT, &args).await {
            Ok(RedisValue::Array(answer)) => answer,
            Ok(_) => return Err(corrupt("submit answer").into()),
            Err(e @ StoreError::Unavailable(_)) => {
                // The caller hears 503; the call may still reach Redis: make sure it never runs.
                settle_later(&self.conn, WITHDRAW, vec![PREFIX.to_string(), job.id.clone()], withdrawn);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let n = number(answer.get(1)).unwrap_or(0);
        match text(answer.first()).as_deref() {
            Some("full") => Err(SubmitError::QueueFull(max_queue)),
            Some("late") => Err(StoreError::Unavailable(format!(
                "Redis took the request more than {CALL_WINDOW:?} after it was sent; it was not queued"
            ))
            .into()),
            Some("queued") => Ok(Submitted { position: Some(usize::try_from(n).unwrap_or(0)), webhook: None }),
            _ => {
                let webhook = (n > 0).then(|| PendingWebhook {
                    delivery_id: n,
                    job_id: job.id.clone(),
                    url: job.webhook.clone().unwrap_or_default(),
                    payload,
                });
                Ok(Submitted { position: None, webhook })
            }
        }
    }

    async fn claim(&self, now: SystemTime) -> Result<Option<Claimed>, StoreError> {
        loop {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let args = [
                PREFIX.to_string(),
                unix_ms(now).to_string(),
                ms(self.lease).to_string(),
                token.clone(),
                self.call_deadline().to_string(),
            ];
            let fields = match self.script(CLAIM, &args).await {
                Ok(RedisValue::Array(fields)) => fields,
                Ok(_) => return Ok(None),
                Err(e @ StoreError::Unavailable(_)) => {
                    // A claim whose answer was lost leaves its job to no one: give it back.
                    settle_later(&self.conn, RELEASE_TOKEN, vec![PREFIX.to_string(), token], released);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let id = text(fields.first()).ok_or_else(|| corrupt("claim answered no id"))?;
            let request = text(fields.get(1)).unwrap_or_default();
            let attempt = number(fields.get(2)).and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
            let submitted = from_unix_ms(number(fields.get(3)).unwrap_or(0));
            let log_count = number(fields.get(4)).and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
            let base_url = text(fields.get(5)).unwrap_or_default();
            match read_stored_request(Some(&request)) {
                Ok(request) => {
                    return Ok(Some(Claimed { id, token, request, attempt, submitted, log_count, base_url }))
                }
                Err(failure) => {
                    self.complete(&id, "running", &token, &Outcome::Failed(failure)).await?;
                }
            }
        }
    }

    async fn append_logs(&self, id: &str, token: &str, from: usize, lines: &[LogLine]) -> Result<(), StoreError> {
        let mut args = vec![PREFIX.to_string(), id.to_string(), token.to_string(), from.to_string()];
        for line in lines {
            args.push(serde_json::to_string(line).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        self.script(APPEND_LOGS, &args).await.map(|_| ())
    }

    async fn finish(&self, id: &str, token: &str, outcome: &Outcome) -> Result<Finished, StoreError> {
        Ok(match self.complete(id, "running", token, outcome).await? {
            Some(webhook) => Finished { applied: true, webhook },
            None => Finished::default(),
        })
    }

    async fn release(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.script(RELEASE, &[PREFIX.to_string(), id.to_string(), token.to_string()]).await.map(|_| ())
    }

    async fn cancel(&self, id: &str) -> Result<CancelResult, StoreError> {
        loop {
            let outcome = Outcome::Failed(Failure::stopped(StopReason::Cancelled, false));
            let (outcome_text, payload, webhook) = self.ending(id, &outcome).await?;
            let now = Self::now_ms();
            let args = [
                PREFIX.to_string(),
                id.to_string(),
                outcome_text,
                payload.clone(),
                now.to_string(),
                (now + ms(self.webhook_lease)).to_string(),
            ];
            let RedisValue::Array(answer) = self.script(CANCEL, &args).await? else {
                return Err(corrupt("cancel answer"));
            };
            return Ok(match text(answer.first()).as_deref() {
                Some("missing") => CancelResult::NotFound,
                Some("completed") => CancelResult::AlreadyCompleted,
                Some("stop") => CancelResult::StopRequested,
                _ => match number(answer.get(1)) {
                    Some(n) if n > 0 => CancelResult::Dequeued(Some(PendingWebhook {
                        delivery_id: n,
                        job_id: id.to_string(),
                        url: webhook,
                        payload,
                    })),
                    // Claimed by a worker between the two reads: ask again (it now stops it).
                    Some(-1) => continue,
                    _ => CancelResult::Dequeued(None),
                },
            });
        }
    }

    async fn stop_requested(&self, id: &str, token: &str) -> Result<bool, StoreError> {
        let key = format!("{PREFIX}job:{id}");
        let fields: Vec<Option<String>> =
            self.query(redis::cmd("HMGET").arg(&key).arg(&["stop_requested", "state", "owner"])).await?;
        let get = |i: usize| fields.get(i).cloned().flatten();
        let held = get(1).as_deref() == Some("running") && get(2).as_deref() == Some(token);
        // Gone (forgotten), cancelled or taken over by another worker: stop.
        Ok(!held || get(0).as_deref() == Some("1"))
    }

    async fn view(&self, id: &str, logs_from: usize) -> Result<Option<JobView>, StoreError> {
        let key = format!("{PREFIX}job:{id}");
        let logs_key = format!("{PREFIX}logs:{id}");
        let from = isize::try_from(logs_from).unwrap_or(isize::MAX);
        type Answer = (Vec<Option<String>>, Option<i64>, i64, Vec<String>);
        let (fields, rank, log_count, lines): Answer = self
            .pipeline(
                redis::pipe()
                    .cmd("HMGET")
                    .arg(&key)
                    .arg(&["kind", "app", "state", "outcome"])
                    .cmd("ZRANK")
                    .arg(format!("{PREFIX}queue"))
                    .arg(id)
                    .cmd("LLEN")
                    .arg(&logs_key)
                    .cmd("LRANGE")
                    .arg(&logs_key)
                    .arg(from)
                    .arg(-1),
            )
            .await?;
        let get = |i: usize| fields.get(i).cloned().flatten();
        let Some(state) = get(2) else { return Ok(None) };
        let state = match state.as_str() {
            "queued" => JobState::Queued { position: usize::try_from(rank.unwrap_or(0)).unwrap_or(0) },
            "running" => JobState::Running,
            _ => {
                let text = get(3).ok_or_else(|| corrupt("an ended job without an outcome"))?;
                JobState::Completed(serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            }
        };
        let logs = lines
            .iter()
            .map(|l| serde_json::from_str::<LogLine>(l).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(JobView {
            id: id.to_string(),
            kind: if get(0).as_deref() == Some("run") { JobKind::Run } else { JobKind::Queued },
            app: get(1).unwrap_or_default(),
            state,
            logs,
            log_count: usize::try_from(log_count).unwrap_or(0),
        }))
    }

    async fn base_url(&self, id: &str) -> Result<Option<String>, StoreError> {
        let key = format!("{PREFIX}job:{id}");
        self.query(redis::cmd("HGET").arg(&key).arg("base_url")).await
    }

    async fn expire_deadlines(&self, now: SystemTime) -> Result<Ended, StoreError> {
        let late = self.ids("deadlines", unix_ms(now)).await?;
        if late.is_empty() {
            return Ok(Ended::default());
        }
        self.end_all(late, "queued", &Outcome::Failed(Failure::timed_out())).await
    }

    async fn fail_queued(&self, failure: &Failure) -> Result<Ended, StoreError> {
        let queued: Vec<String> = self.query(redis::cmd("ZRANGE").arg(format!("{PREFIX}queue")).arg(0).arg(-1)).await?;
        self.end_all(queued, "queued", &Outcome::Failed(failure.clone())).await
    }

    async fn expire_finished(&self, cutoff: SystemTime) -> Result<Vec<String>, StoreError> {
        let old = self.ids("finished", unix_ms(cutoff) - 1).await?;
        for id in &old {
            self.pipeline::<()>(
                redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(format!("{PREFIX}job:{id}"))
                    .arg(format!("{PREFIX}logs:{id}"))
                    .cmd("ZREM")
                    .arg(format!("{PREFIX}finished"))
                    .arg(id),
            )
            .await?;
        }
        Ok(old)
    }

    async fn forget(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(format!("{PREFIX}job:{id}")).arg(format!("{PREFIX}logs:{id}"));
        for set in ["queue", "running", "deadlines", "finished"] {
            pipe.cmd("ZREM").arg(format!("{PREFIX}{set}")).arg(id);
        }
        self.pipeline::<()>(&pipe).await
    }

    async fn contains(&self, id: &str) -> Result<bool, StoreError> {
        let key = format!("{PREFIX}job:{id}");
        self.query::<i64>(redis::cmd("EXISTS").arg(&key)).await.map(|n| n == 1)
    }

    async fn pending_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError> {
        self.orphaned_webhooks().await
    }

    async fn webhook_done(&self, delivery_id: i64) -> Result<(), StoreError> {
        self.pipeline::<()>(
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(format!("{PREFIX}webhook:{delivery_id}"))
                .cmd("ZREM")
                .arg(format!("{PREFIX}webhooks"))
                .arg(delivery_id),
        )
        .await
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let (queued, running): (usize, usize) = self
            .pipeline(
                redis::pipe().cmd("ZCARD").arg(format!("{PREFIX}queue")).cmd("ZCARD").arg(format!("{PREFIX}running")),
            )
            .await?;
        Ok(QueueStats { queued, running })
    }

    async fn recover(&self, _max_attempts: u32) -> Result<Recovery, StoreError> {
        // Running jobs may belong to live workers: their leases decide (see `reap`).
        let stats = self.stats().await?;
        let webhooks: usize = self.query(redis::cmd("ZCARD").arg(format!("{PREFIX}webhooks"))).await?;
        Ok(Recovery { queued: stats.queued, webhooks, ..Recovery::default() })
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn heartbeat(&self, leases: &[(String, String)]) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut args = vec![PREFIX.to_string(), ms(self.lease).to_string()];
        for (id, token) in leases {
            args.push(id.clone());
            args.push(token.clone());
        }
        self.script(HEARTBEAT, &args).await.map(|_| ())
    }

    async fn reap(&self, max_attempts: u32) -> Result<Ended, StoreError> {
        self.measure_clock().await?;
        let mut ended = Ended::default();
        // Candidates by this host's clock; the script decides on Redis' clock.
        for id in self.ids("running", Self::now_ms() + 1000).await? {
            let key = format!("{PREFIX}job:{id}");
            let attempts: Option<String> = self.query(redis::cmd("HGET").arg(&key).arg("attempts")).await?;
            let Some(attempts) = attempts else { continue };
            let (cancel_text, cancel_payload, _) =
                self.ending(&id, &Outcome::Failed(Failure::stopped(StopReason::Cancelled, true))).await?;
            let failure = Failure::new(
                FailureKind::Interrupted,
                format!("the worker running this request stopped answering, {attempts} times; not retried again"),
            );
            let (fail_text, fail_payload, webhook) = self.ending(&id, &Outcome::Failed(failure)).await?;
            let args = [
                PREFIX.to_string(),
                id.clone(),
                attempts.clone(),
                max_attempts.to_string(),
                cancel_text,
                cancel_payload.clone(),
                fail_text,
                fail_payload.clone(),
                ms(self.webhook_lease).to_string(),
            ];
            let RedisValue::Array(answer) = self.script(REAP, &args).await? else { return Err(corrupt("reap answer")) };
            let delivery = number(answer.get(1)).unwrap_or(0);
            let payload = match text(answer.first()).as_deref() {
                Some("requeued") => {
                    tracing::warn!(request_id = %id, attempts, "its worker stopped answering: queued again");
                    continue;
                }
                Some("cancelled") => {
                    ended.cancelled += 1;
                    cancel_payload
                }
                Some("failed") => fail_payload,
                _ => continue,
            };
            ended.count += 1;
            if delivery > 0 {
                ended.webhooks.push(PendingWebhook {
                    delivery_id: delivery,
                    job_id: id,
                    url: webhook.clone(),
                    payload,
                });
            }
        }
        Ok(ended)
    }

    async fn counters(&self) -> Result<Option<Counters>, StoreError> {
        let key = format!("{PREFIX}counters");
        let values: Vec<Option<u64>> = self
            .query(redis::cmd("HMGET").arg(&key).arg(&["accepted", "succeeded", "failed", "cancelled", "started"]))
            .await?;
        let get = |i: usize| values.get(i).copied().flatten().unwrap_or(0);
        Ok(Some(Counters { accepted: get(0), succeeded: get(1), failed: get(2), cancelled: get(3), started: get(4) }))
    }

    async fn observe(&self, which: Latency, value: Duration) -> Result<(), StoreError> {
        let key = format!("{PREFIX}latency:{}", which.name());
        let seconds = value.as_secs_f64();
        let mut pipe = redis::pipe();
        for (i, bound) in which.bounds().iter().enumerate() {
            if seconds <= *bound {
                pipe.cmd("HINCRBY").arg(&key).arg(format!("b{i}")).arg(1).ignore();
            }
        }
        pipe.cmd("HINCRBY").arg(&key).arg("count").arg(1).ignore();
        pipe.cmd("HINCRBYFLOAT").arg(&key).arg("sum").arg(seconds).ignore();
        self.pipeline::<()>(&pipe).await
    }

    async fn latencies(&self) -> Result<Option<Latencies>, StoreError> {
        Ok(Some(Latencies {
            step: self.histogram(Latency::Step).await?,
            request: self.histogram(Latency::Request).await?,
        }))
    }

    async fn webhook_started(&self, delivery_id: i64) -> Result<(), StoreError> {
        let args = [PREFIX.to_string(), delivery_id.to_string(), ms(self.webhook_lease).to_string()];
        self.script(WEBHOOK_STARTED, &args).await.map(|_| ())
    }

    async fn orphaned_webhooks(&self) -> Result<Vec<PendingWebhook>, StoreError> {
        let args = [PREFIX.to_string(), Self::now_ms().to_string(), ms(self.webhook_lease).to_string()];
        let RedisValue::Array(rows) = self.script(CLAIM_WEBHOOKS, &args).await? else { return Ok(Vec::new()) };
        Ok(rows
            .iter()
            .filter_map(|row| {
                let RedisValue::Array(f) = row else { return None };
                Some(PendingWebhook {
                    delivery_id: number(f.first())?,
                    job_id: text(f.get(1))?,
                    url: text(f.get(2))?,
                    payload: text(f.get(3))?,
                })
            })
            .collect())
    }
}

/// What became of a submit answered 503 ([`WITHDRAW`]'s answer).
fn withdrawn(id: &str, state: Option<String>) {
    match state.as_deref() {
        Some("absent") => tracing::info!(request_id = %id, "a submit answered 503 never reached Redis"),
        Some("withdrawn") => {
            tracing::warn!(request_id = %id, "a submit answered 503 had reached Redis: withdrawn before it started")
        }
        state => tracing::error!(
            request_id = %id,
            ?state,
            "a submit answered 503 reached Redis and was taken before it could be withdrawn: it runs"
        ),
    }
}

/// What became of a claim whose answer was lost ([`RELEASE_TOKEN`]'s answer).
fn released(token: &str, given_back: Option<String>) {
    if given_back.as_deref() == Some("1") {
        tracing::warn!(token, "a claim whose answer was lost took a job: given back to the queue");
    }
}
