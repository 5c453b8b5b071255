//! `RedisStore` against a real `redis-server` (Debian's package, on a free loopback port): the
//! same queue semantics as the embedded store, plus what sharing needs: leases that run out,
//! webhooks claimed by one process only, counters every process sees.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use pixart_fal::GenerateRequest;
use pixart_server::core::{
    CancelResult, FailureKind, JobKind, JobState, JobStore, NewJob, Outcome, Priority, RedisStore,
};

struct Redis(Child, u16);

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (Debian package redis-server; .ci/run installs it)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child, port)
    }

    async fn store(&self, lease: Duration) -> RedisStore {
        RedisStore::open(&format!("redis://127.0.0.1:{}", self.1), lease, Duration::from_millis(300)).await.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn submit(store: &RedisStore, priority: Priority, webhook: bool) -> String {
    let mut job = NewJob::new(JobKind::Queued, "fal-ai/pixart-sigma", "http://h", Ok(GenerateRequest::new("a cat")));
    job.priority = priority;
    job.webhook = webhook.then(|| "https://hooks.example.com/x".to_string());
    let id = job.id.clone();
    store.submit(job, 10).await.unwrap();
    id
}

async fn state(store: &RedisStore, id: &str) -> JobState {
    store.view(id, 0).await.unwrap().unwrap().state
}

#[tokio::test]
async fn positions_priorities_cancel_and_deadlines_match_the_embedded_store() {
    let redis = Redis::start();
    let s = redis.store(Duration::from_secs(30)).await;
    let low = submit(&s, Priority::Low, false).await;
    let a = submit(&s, Priority::Normal, false).await;
    let b = submit(&s, Priority::Normal, true).await;
    assert_eq!(state(&s, &a).await, JobState::Queued { position: 0 });
    assert_eq!(state(&s, &b).await, JobState::Queued { position: 1 });
    assert_eq!(state(&s, &low).await, JobState::Queued { position: 2 });
    let claimed = s.claim(SystemTime::now()).await.unwrap().unwrap();
    assert_eq!((claimed.id.as_str(), claimed.attempt), (a.as_str(), 1));
    assert_eq!(claimed.request, GenerateRequest::new("a cat"));
    assert_eq!(state(&s, &low).await, JobState::Queued { position: 1 });
    match s.cancel(&b).await.unwrap() {
        CancelResult::Dequeued(Some(hook)) => {
            let payload: serde_json::Value = serde_json::from_str(&hook.payload).unwrap();
            assert_eq!(payload["payload"]["error_type"], "RequestCancelled");
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.stop_requested(&a, &claimed.token).await.unwrap());
    assert!(matches!(s.cancel(&a).await.unwrap(), CancelResult::StopRequested));
    assert!(s.stop_requested(&a, &claimed.token).await.unwrap());
    assert!(matches!(s.cancel("nope").await.unwrap(), CancelResult::NotFound));
    let stopped =
        Outcome::Failed(pixart_server::core::Failure::stopped(pixart_server::core::StopReason::Cancelled, true));
    assert!(!s.finish(&a, "another worker", &stopped).await.unwrap().applied, "only the claim's holder ends it");
    assert!(s.finish(&a, &claimed.token, &stopped).await.unwrap().applied);
    assert!(matches!(s.cancel(&a).await.unwrap(), CancelResult::AlreadyCompleted));
    // A deadline passes while queued: the sweep ends it with a user timeout.
    let mut late = NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(GenerateRequest::new("late")));
    late.start_deadline = Some(SystemTime::now());
    let late_id = late.id.clone();
    s.submit(late, 10).await.unwrap();
    let ended = s.expire_deadlines(SystemTime::now() + Duration::from_millis(1)).await.unwrap();
    assert_eq!(ended.count, 1);
    match state(&s, &late_id).await {
        JobState::Completed(outcome) => assert_eq!(outcome.failure().unwrap().kind, FailureKind::Timeout),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.stats().await.unwrap().queued, 1, "only the low-priority job waits");
    // The queue limit counts waiting jobs only.
    let full = NewJob::new(JobKind::Queued, "x/y", "http://h", Ok(GenerateRequest::new("c")));
    assert!(s.submit(full, 1).await.is_err());
}

#[tokio::test]
async fn a_dead_workers_job_is_run_again_then_failed_after_its_attempts() {
    let redis = Redis::start();
    let worker = redis.store(Duration::from_millis(400)).await;
    let other = redis.store(Duration::from_millis(400)).await;
    let id = submit(&worker, Priority::Normal, true).await;
    let mut tokens = Vec::new();
    for attempt in 1..=3 {
        let claimed = worker.claim(SystemTime::now()).await.unwrap().unwrap();
        assert_eq!((claimed.id.as_str(), claimed.attempt), (id.as_str(), attempt));
        let lease = (id.clone(), claimed.token.clone());
        // A live worker's heartbeat keeps the job; an earlier holder's does nothing.
        tokio::time::sleep(Duration::from_millis(240)).await;
        worker.heartbeat(std::slice::from_ref(&lease)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(240)).await;
        if let Some(old) = tokens.last() {
            let stale = (id.clone(), String::clone(old));
            worker.heartbeat(std::slice::from_ref(&stale)).await.unwrap();
            assert!(worker.stop_requested(&id, old).await.unwrap(), "the earlier holder is told to stop");
            worker.release(&id, old).await.unwrap();
        }
        tokens.push(claimed.token);
        assert_eq!(other.reap(3).await.unwrap().count, 0);
        assert_eq!(state(&other, &id).await, JobState::Running);
        // Then it dies: the lease runs out and the job goes back (or fails on the last attempt).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ended = other.reap(3).await.unwrap();
        if attempt < 3 {
            assert_eq!(ended.count, 0);
            assert_eq!(state(&other, &id).await, JobState::Queued { position: 0 });
        } else {
            assert_eq!(ended.count, 1);
            assert_eq!(ended.webhooks.len(), 1);
        }
    }
    match state(&worker, &id).await {
        JobState::Completed(outcome) => {
            let failure = outcome.failure().unwrap();
            assert_eq!(failure.kind, FailureKind::Interrupted);
            assert!(failure.message.contains("3 times"), "{}", failure.message);
        }
        other => panic!("{other:?}"),
    }
    // A presumed-dead worker finishing late changes nothing.
    let response = pixart_fal::GenerateResponse {
        images: Vec::new(),
        timings: pixart_fal::Timings { inference: 1.0 },
        seed: 1,
        has_nsfw_concepts: Vec::new(),
        prompt: "a cat".into(),
    };
    let late = worker.finish(&id, &tokens[0], &Outcome::Succeeded { response, inference_time: 1.0 }).await.unwrap();
    assert!(!late.applied && late.webhook.is_none());
    assert!(matches!(state(&worker, &id).await, JobState::Completed(Outcome::Failed(_))));
}

#[tokio::test]
async fn a_pending_webhook_is_claimed_by_one_process_then_by_another_when_its_sender_died() {
    let redis = Redis::start();
    let a = redis.store(Duration::from_secs(30)).await;
    let b = redis.store(Duration::from_secs(30)).await;
    let id = submit(&a, Priority::Normal, true).await;
    let claimed = a.claim(SystemTime::now()).await.unwrap().unwrap();
    let failed = Outcome::Failed(pixart_server::core::Failure::timed_out());
    let hook = a.finish(&id, &claimed.token, &failed).await.unwrap().webhook.unwrap();
    // Its creator holds it for the webhook lease (300 ms here): nobody else takes it.
    assert!(b.orphaned_webhooks().await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(350)).await;
    let taken = b.orphaned_webhooks().await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].delivery_id, hook.delivery_id);
    assert!(a.orphaned_webhooks().await.unwrap().is_empty(), "claimed by b now");
    b.webhook_done(hook.delivery_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(a.orphaned_webhooks().await.unwrap().is_empty(), "delivered: gone");
}

#[tokio::test]
async fn counters_and_logs_are_shared() {
    let redis = Redis::start();
    let a = redis.store(Duration::from_secs(30)).await;
    let b = redis.store(Duration::from_secs(30)).await;
    let id = submit(&a, Priority::Normal, false).await;
    submit(&b, Priority::Normal, false).await;
    let token = a.claim(SystemTime::now()).await.unwrap().unwrap().token;
    // Counted by the store, in the step that changed the state, whichever process made it.
    let counters = b.counters().await.unwrap().unwrap();
    assert_eq!((counters.accepted, counters.started, counters.succeeded), (2, 1, 0));
    let line = |text: &str| pixart_server::core::LogLine::new("INFO", text);
    a.append_logs(&id, &token, 0, &[line("one")]).await.unwrap();
    b.append_logs(&id, &token, 1, &[line("two")]).await.unwrap();
    // A retried batch (its first try reached Redis) adds nothing twice; a stale holder adds nothing.
    b.append_logs(&id, &token, 0, &[line("one"), line("two")]).await.unwrap();
    b.append_logs(&id, "not the holder", 2, &[line("dropped")]).await.unwrap();
    let view = b.view(&id, 1).await.unwrap().unwrap();
    assert_eq!((view.log_count, view.logs.len(), view.logs[0].message.as_str()), (2, 1, "two"));
    b.forget(&id).await.unwrap();
    assert!(a.stop_requested(&id, &token).await.unwrap(), "a forgotten job is wanted by no one");
    a.append_logs(&id, &token, 2, &[line("late")]).await.unwrap();
    assert!(a.view(&id, 0).await.unwrap().is_none());
}

/// Sends a signal to the Redis server (`STOP` pauses it with its connections open, `CONT`
/// resumes it and it then runs what was sent meanwhile).
fn signal(redis: &Redis, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &redis.0.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn calls_interrupted_by_a_stall_take_effect_once_or_never() {
    let redis = Redis::start();
    let front = redis.store(Duration::from_secs(30)).await;
    let worker = redis.store(Duration::from_secs(30)).await;
    let waiting = submit(&front, Priority::Normal, true).await;

    signal(&redis, "STOP");
    // A submit and a claim that time out while Redis is paused: their callers hear "unavailable".
    let mut job = NewJob::new(JobKind::Queued, "fal-ai/pixart-sigma", "http://h", Ok(GenerateRequest::new("late")));
    job.webhook = Some("https://hooks.example.com/late".into());
    let late = job.id.clone();
    let refused = front.submit(job, 10).await.unwrap_err();
    assert!(refused.to_string().contains("unavailable"), "{refused}");
    let claim = worker.claim(SystemTime::now()).await.unwrap_err();
    assert!(matches!(claim, pixart_server::core::StoreError::Unavailable(_)), "{claim}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&redis, "CONT");

    // Redis ran both calls when it resumed, too late: neither the submit nor the claim happened,
    // and nothing was counted.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let view = front.view(&waiting, 0).await;
        if let Ok(Some(view)) = view {
            if matches!(view.state, JobState::Queued { .. }) && !front.contains(&late).await.unwrap() {
                break;
            }
        }
        assert!(Instant::now() < until, "the queue did not settle after the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!front.contains(&late).await.unwrap(), "a submit answered 'unavailable' was queued");
    let counters = front.counters().await.unwrap().unwrap();
    assert_eq!((counters.accepted, counters.started), (1, 0), "{counters:?}");
    assert_eq!(front.stats().await.unwrap().queued, 1);

    // A finish retried after its first try was applied is answered the same: applied once, one
    // delivery, counted once.
    let claimed = worker.claim(SystemTime::now()).await.unwrap().unwrap();
    assert_eq!(claimed.id, waiting);
    let failure = pixart_server::core::Failure::new(FailureKind::Generation, "test");
    let outcome = Outcome::Failed(failure);
    let first = worker.finish(&waiting, &claimed.token, &outcome).await.unwrap();
    let again = worker.finish(&waiting, &claimed.token, &outcome).await.unwrap();
    assert!(first.applied && again.applied);
    let (first, again) = (first.webhook.unwrap(), again.webhook.unwrap());
    assert_eq!(first.delivery_id, again.delivery_id);
    // Another worker's finish of the same job is still refused.
    assert!(!worker.finish(&waiting, "someone else", &outcome).await.unwrap().applied);
    let counters = front.counters().await.unwrap().unwrap();
    assert_eq!((counters.accepted, counters.started, counters.failed), (1, 1, 1), "{counters:?}");
}
