//! `pixart serve` on 127.0.0.1 with the tiny fixture model, driven by fal's official clients,
//! unmodified: `@fal-ai/client` (npm) and `fal-client` (PyPI), installed by
//! `tests/clients/install.sh` on first use (node ≥ 18 and python3 needed; the npm registry and
//! PyPI the first time). The scenarios themselves are in `tests/clients/{js,python}/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::{repo_root, write_flagging_checker};

fn clients_dir() -> PathBuf {
    repo_root().join("tests/clients")
}

/// Installs both clients once per test binary.
fn install_clients() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let output = Command::new("bash")
            .arg(clients_dir().join("install.sh"))
            .output()
            .map_err(|e| format!("cannot run tests/clients/install.sh: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/clients/install.sh failed (needs node >= 18, npm, python3 and, the first time, the npm \
                 registry and PyPI):\n{}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// A `pixart serve` child process on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// The scenarios' webhook receivers listen on 127.0.0.1: allowed explicitly.
    fn start(extra: &[&str]) -> Self {
        Self::start_with_webhook_policy(&[extra, &["--allow-private-webhooks"]].concat())
    }

    /// Without `--allow-private-webhooks`, unless `extra` has it.
    fn start_with_webhook_policy(extra: &[&str]) -> Self {
        let model = repo_root().join("tests/fixtures/tiny-sigma-256");
        let mut command = Command::new(env!("CARGO_BIN_EXE_pixart"));
        command.args(["serve", "--port", "0", "--model"]).arg(&model).args(extra).env("RUST_LOG", "warn");
        if !extra.iter().any(|a| a.contains("storage")) {
            // Each test server its own folder, removed on exit (restarts are tested on their own).
            command.arg("--temporary-storage");
        }
        if !extra.iter().any(|a| a.contains("safety-checker")) {
            // The tiny random safety checker (its bias leans to `normal`): every image is checked.
            command.env("PIXART_SAFETY_CHECKER", repo_root().join("tests/fixtures/tiny-safety-checker"));
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("starting pixart serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("reading stdout");
        let url = line.trim().strip_prefix("pixart serve: listening on ").unwrap_or_else(|| {
            let _ = child.kill();
            panic!("pixart serve did not print its address: {line:?}")
        });
        Self { url: url.to_string(), child }
    }

    /// Waits for the process to exit on its own (after a SIGTERM) and returns whether it exited 0.
    fn wait_exit(mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for pixart serve") {
                return status.success();
            }
            assert!(Instant::now() < until, "pixart serve did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn check(what: &str, output: Output, scenarios: &[&str]) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
    for name in scenarios {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("ok {name} "))), "{what}: no `ok {name}` in\n{stdout}");
    }
    println!("{what}:\n{stdout}");
}

fn node(server: &Server, scenarios: &[&str], env: &[(&str, String)]) -> Output {
    install_clients();
    let mut command = Command::new("node");
    command.arg(clients_dir().join("js/scenarios.mjs")).arg(&server.url).args(scenarios);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("running node (is Node.js >= 18 installed?)")
}

fn python(server: &Server, script: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    install_clients();
    let mut command = Command::new(clients_dir().join("python/.venv/bin/python"));
    command.arg(script).arg(&server.url).args(args).env("FAL_KEY", "local-test-key");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("running the fal-client venv's python")
}

const JS_SCENARIOS: &[&str] = &[
    "subscribe_logs",
    "queue_flow",
    "streaming",
    "invalid_input",
    "run",
    "upload",
    "image_input",
    "webhook",
    "proxy",
    "cors",
];
const PY_SCENARIOS: &[&str] = &[
    "subscribe_logs",
    "queue_flow",
    "invalid_input",
    "run",
    "run_disconnect",
    "upload",
    "images",
    "webhook",
    "async_client",
    "limits",
    "cross_origin",
    "request_timeout",
    "metrics",
];

#[test]
fn js_client_speaks_the_queue_protocol() {
    // CORS is off by default; the browser scenario needs its origin allowed.
    let server = Server::start(&["--cors-origin", "http://localhost:3000"]);
    check("@fal-ai/client", node(&server, JS_SCENARIOS, &[]), JS_SCENARIOS);
}

#[test]
fn python_client_speaks_the_queue_protocol() {
    let server = Server::start(&[]);
    let script = clients_dir().join("python/scenarios.py");
    check("fal-client", python(&server, &script, PY_SCENARIOS, &[]), PY_SCENARIOS);
}

#[test]
fn api_key_is_required_when_configured() {
    let server = Server::start(&["--api-key", "local-test-key"]);
    let script = clients_dir().join("python/scenarios.py");
    check("fal-client with --api-key", python(&server, &script, &["auth"], &[]), &["auth"]);
}

#[test]
fn the_safety_checker_blackens_flagged_images_and_its_absence_is_never_hidden() {
    let dir = std::env::temp_dir().join(format!("pixart-serve-flagging-checker-{}", std::process::id()));
    write_flagging_checker(&dir);
    let script = clients_dir().join("python/scenarios.py");
    let server = Server::start(&["--safety-checker", dir.to_str().expect("utf-8")]);
    check(
        "fal-client with a flagging checker",
        python(&server, &script, &["safety_flagged"], &[]),
        &["safety_flagged"],
    );
    drop(server);
    let server = Server::start(&["--no-safety-checker"]);
    check("fal-client with --no-safety-checker", python(&server, &script, &["safety_off"], &[]), &["safety_off"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn loras_and_input_pictures_come_only_from_where_they_may() {
    let folder = repo_root().join("tests/fixtures/lora");
    let server = Server::start_with_webhook_policy(&["--lora-dir", folder.to_str().unwrap()]);
    let env = [("LORA_DIR", folder.to_string_lossy().to_string())];
    check(
        "fal-client, LoRAs",
        python(&server, &clients_dir().join("python/scenarios.py"), &["loras", "image_policy"], &env),
        &["loras", "image_policy"],
    );
    // By URL, with loopback addresses allowed (the file server is local) and a size limit.
    let server = Server::start(&["--max-lora-bytes", "50000"]);
    let output = python(&server, &clients_dir().join("python/scenarios.py"), &["lora_url"], &env);
    check("fal-client, LoRAs by URL", output, &["lora_url"]);
}

#[test]
fn input_pictures_come_by_url_within_the_size_limit() {
    // Loopback addresses allowed (the file server is local), with a size limit.
    let server = Server::start(&["--max-image-bytes", "7000"]);
    let output = python(&server, &clients_dir().join("python/scenarios.py"), &["image_url_fetch"], &[]);
    check("fal-client, pictures by URL", output, &["image_url_fetch"]);
}

#[test]
fn a_slow_webhook_receiver_gets_one_post_and_delays_no_other() {
    let server = Server::start(&["--webhook-timeout", "1s"]);
    let script = clients_dir().join("python/scenarios.py");
    check("fal-client, slow webhook receiver", python(&server, &script, &["slow_webhook"], &[]), &["slow_webhook"]);
}

/// Reads until the server closes the connection (or 8 s pass); returns how long that took and
/// what was read.
fn until_closed(stream: &mut std::net::TcpStream) -> (std::time::Duration, String) {
    until_closed_within(stream, std::time::Duration::from_secs(8))
}

fn until_closed_within(stream: &mut std::net::TcpStream, limit: std::time::Duration) -> (std::time::Duration, String) {
    use std::io::Read;
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    let started = std::time::Instant::now();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the server kept the connection open for {limit:?}: {}", String::from_utf8_lossy(&text))
            }
            Err(_) => break, // reset
        }
    }
    (started.elapsed(), String::from_utf8_lossy(&text).into_owned())
}

#[test]
fn slow_and_idle_connections_are_closed() {
    use std::io::Write;
    use std::net::TcpStream;
    let server = Server::start(&["--header-read-timeout", "1s", "--idle-timeout", "2s"]);
    let address = server.url.trim_start_matches("http://").to_string();
    // Headers that never end (slowloris): closed after the header-read timeout.
    let mut partial = TcpStream::connect(&address).unwrap();
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    let (took, _) = until_closed(&mut partial);
    assert!(took < std::time::Duration::from_secs(4), "partial headers kept {took:?}");
    // A keep-alive connection after a complete exchange: waiting for the next request's
    // headers, it is closed by the header-read timeout.
    let mut idle = TcpStream::connect(&address).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (took, text) = until_closed(&mut idle);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(took < std::time::Duration::from_secs(4), "idle keep-alive kept {took:?}");
    // A body that stops half-way: closed by the idle timeout (2 s).
    let mut stalled = TcpStream::connect(&address).unwrap();
    let head = "POST /fal-ai/pixart-sigma HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    stalled.write_all(format!("{head}{{\"prompt\"").as_bytes()).unwrap();
    let (took, text) = until_closed(&mut stalled);
    let window = std::time::Duration::from_millis(1500)..std::time::Duration::from_secs(5);
    assert!(window.contains(&took), "stalled body kept {took:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // A response that takes longer than the idle timeout to compute is not cut.
    let mut long = TcpStream::connect(&address).unwrap();
    let body = r#"{"prompt": "a fox", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 120, "num_images": 8, "sync_mode": true}"#;
    let request = format!(
        "POST /run/fal-ai/pixart-sigma HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    long.write_all(request.as_bytes()).unwrap();
    let (took, text) = until_closed_within(&mut long, std::time::Duration::from_secs(120));
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    assert!(took > std::time::Duration::from_secs(2), "the generation was too quick to test this: {took:?}");
    // Many connections that never send a byte: all closed.
    let mut silent: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(&address).unwrap()).collect();
    let started = std::time::Instant::now();
    for stream in &mut silent {
        until_closed(stream);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(6), "{:?}", started.elapsed());
    // And the server still answers.
    let mut fresh = TcpStream::connect(&address).unwrap();
    fresh.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert!(until_closed(&mut fresh).1.starts_with("HTTP/1.1 200"));
}

#[test]
fn webhooks_to_private_addresses_are_refused_by_default() {
    let server = Server::start_with_webhook_policy(&[]);
    let script = clients_dir().join("python/scenarios.py");
    check(
        "fal-client, default webhook policy",
        python(&server, &script, &["webhook_policy"], &[]),
        &["webhook_policy"],
    );
}

#[test]
fn results_are_forgotten_after_the_retention_period() {
    let server = Server::start(&["--result-retention", "1s"]);
    let script = clients_dir().join("python/scenarios.py");
    check("fal-client with --result-retention 1s", python(&server, &script, &["retention"], &[]), &["retention"]);
}

fn shutdown(grace: &str, expect_running: &str) {
    let server = Server::start(&["--shutdown-grace", grace]);
    let script = clients_dir().join("python/scenarios.py");
    let env = [("PIXART_PID", server.child.id().to_string()), ("EXPECT_RUNNING", expect_running.to_string())];
    let output = python(&server, &script, &["shutdown"], &env);
    check(&format!("shutdown with --shutdown-grace {grace}"), output, &["shutdown"]);
    assert!(server.wait_exit(Duration::from_secs(60)), "pixart serve exited with an error after SIGTERM");
}

#[test]
fn graceful_shutdown_finishes_the_running_request_and_fails_queued_ones() {
    shutdown("60s", "finish");
}

#[test]
fn graceful_shutdown_stops_a_running_request_after_the_grace_period() {
    shutdown("300ms", "stop");
}

#[test]
fn a_storage_folder_serves_one_server_at_a_time() {
    let folder = std::env::temp_dir().join(format!("pixart-lock-{}", std::process::id()));
    let folder_text = folder.to_string_lossy().to_string();
    let first = Server::start(&["--storage-dir", &folder_text]);
    let second = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(["serve", "--port", "0", "--storage-dir", &folder_text, "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    // Refused before the model is loaded (its path does not even exist), naming the holder.
    assert!(stderr.contains("is in use by another pixart serve (pid"), "{stderr}");
    drop(first);
    let _ = std::fs::remove_dir_all(&folder);
}

#[test]
fn invalid_requests_and_uploads_are_not_held_in_memory() {
    let server = Server::start(&["--max-upload-bytes", "209715200"]);
    let script = clients_dir().join("python/scenarios.py");
    let env = [("PIXART_PID", server.child.id().to_string())];
    check("memory bounds", python(&server, &script, &["memory"], &env), &["memory"]);
}

/// Runs a multi-process check script (`script`, from the repository root) on this build and the
/// tiny model with `args`; asserts it exited 0 with `"check": "passed"`, prints and returns its
/// JSON report.
fn check_script(script: &str, args: &[&str]) -> serde_json::Value {
    install_clients();
    let output = Command::new(clients_dir().join("python/.venv/bin/python"))
        .arg(repo_root().join(script))
        .args(["--pixart", env!("CARGO_BIN_EXE_pixart"), "--model"])
        .arg(repo_root().join("tests/fixtures/tiny-sigma-256"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{script} prints its JSON report: {e}"));
    assert_eq!(report["check"], "passed");
    println!("{stdout}");
    report
}

fn restart(stop: &str) {
    check_script("tests/clients/python/restart.py", &["--stop", stop]);
}

#[test]
fn kill_9_during_a_load_loses_no_request_and_completes_none_twice() {
    restart("kill");
}

#[test]
fn sigterm_during_a_load_requeues_the_running_request_for_the_next_start() {
    restart("term");
}

#[test]
fn load_200_requests_from_8_clients_complete_exactly_once() {
    let server = Server::start(&[]);
    let script = repo_root().join("benches/serve_load.py");
    install_clients();
    let mut command = Command::new(clients_dir().join("python/.venv/bin/python"));
    let output = command
        .arg(&script)
        .args(["--url", &server.url, "--requests", "200", "--concurrency", "8", "--check"])
        .env("FAL_KEY", "local-test-key")
        .output()
        .expect("running benches/serve_load.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "load test failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("the load test prints its JSON report");
    assert_eq!(report["check"], "passed");
    assert_eq!(report["server_counters_delta"]["succeeded"], 200);
    println!("{stdout}");
}

#[test]
fn bad_server_settings_are_refused_by_name() {
    let model = repo_root().join("tests/fixtures/tiny-sigma-256");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pixart")).arg("serve").arg("--model").arg(&model).args(args).output().unwrap()
    };
    let output = run(&["--max-queue", "0", "--port", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_queue: must be from 1 to 1000000"));
    // Durations and counts are bounded: a huge one is refused by name, not an overflow later.
    let output = run(&["--header-read-timeout", "9223372036854775807", "--port", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("header_read_timeout: must be from 1ms to 1h"));
    let output = run(&["--webhook-timeout", "100000000s", "--port", "0"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("webhook_timeout: must be from 1ms to 10m"));
    let output = run(&["--app-id", "pixart", "--port", "0"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("app_id: must be `owner/alias`"));
    let output = run(&["--cors-origin", "https://app.example.com/path", "--port", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("cors_origins: \"https://app.example.com/path\" is not an origin"));
    // A taken port fails before the model loads, naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(["serve", "--model", "/nonexistent/model", "--port", &port])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("cannot listen on 127.0.0.1:{port}")));
    let output = run(&["--result-retention", "3 fortnights"]);
    assert_eq!(output.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a duration"));
}

/// A `redis-server` on a free loopback port with append-only persistence in its own folder;
/// killed when dropped. Needs Debian's `redis-server` (installed by `.ci/run`).
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("pixart-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (Debian package redis-server; .ci/run installs it)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `pixart worker` on the shared queue; killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(redis: &Redis, storage: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pixart"))
            .args(["worker", "--queue", &redis.url(), "--visibility-timeout", "3s", "--allow-private-webhooks"])
            .arg("--model")
            .arg(repo_root().join("tests/fixtures/tiny-sigma-256"))
            .arg("--storage-dir")
            .arg(storage)
            .env("PIXART_SAFETY_CHECKER", repo_root().join("tests/fixtures/tiny-safety-checker"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting pixart worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("reading stdout");
        assert!(line.starts_with("pixart worker: working jobs of"), "{line:?}");
        Self(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP front (`--workers 0`) and two workers on one Redis.
fn scale_out(front_args: &[&str]) -> (Redis, PathBuf, Server, Vec<Worker>) {
    let redis = Redis::start();
    let storage = redis.dir.join("storage");
    let url = redis.url();
    let storage_text = storage.to_string_lossy().to_string();
    let args =
        [&["--queue", url.as_str(), "--workers", "0", "--storage-dir", storage_text.as_str()], front_args].concat();
    let front = Server::start(&args);
    let workers = vec![Worker::start(&redis, &storage), Worker::start(&redis, &storage)];
    (redis, storage, front, workers)
}

#[test]
fn python_client_against_a_front_with_two_workers_on_redis() {
    let (_redis, _storage, front, _workers) = scale_out(&[]);
    let script = clients_dir().join("python/scenarios.py");
    let env = [("PIXART_WORKERS", "2".to_string())];
    check("fal-client, front + 2 workers on redis", python(&front, &script, PY_SCENARIOS, &env), PY_SCENARIOS);
}

#[test]
fn js_client_against_a_front_with_two_workers_on_redis() {
    let (_redis, _storage, front, _workers) = scale_out(&["--cors-origin", "http://localhost:3000"]);
    let env = [("PIXART_WORKERS", "2".to_string())];
    check("@fal-ai/client, front + 2 workers on redis", node(&front, JS_SCENARIOS, &env), JS_SCENARIOS);
}

#[test]
fn a_paused_redis_holds_no_call_and_runs_each_accepted_submit_once_and_no_refused_one() {
    drop(Redis::start());
    let report = check_script("tests/clients/python/redis_stall.py", &[]);
    for route in ["health", "status"] {
        assert!(report[route]["slowest_seconds"].as_f64().unwrap() < 1.0, "{route}: {}", report[route]);
    }
}

#[test]
fn scale_out_survives_a_killed_worker_and_a_redis_restart() {
    // Needs redis-server on PATH, like the other scale-out tests.
    drop(Redis::start());
    let report = check_script("tests/clients/python/scale_out.py", &[]);
    assert_eq!(report["during_outage"], serde_json::json!([503, 503, 503]));
}

#[test]
fn webhooks_to_hanging_receivers_hold_up_neither_others_nor_the_shutdown() {
    check_script("tests/clients/python/webhook_faults.py", &[]);
}

#[test]
fn a_full_disk_ends_the_running_request_and_a_deleted_store_is_noticed() {
    check_script("tests/clients/python/disk_faults.py", &[]);
}

/// Every duration and count flag of `pixart serve` at 0, 1 and u64::MAX: accepted (the server
/// starts) where the value is in range, otherwise refused at start with the setting's name and
/// range; never a panic, never an overflow after "listening".
#[test]
fn every_duration_and_count_flag_is_range_checked_at_start() {
    let model = repo_root().join("tests/fixtures/tiny-sigma-256");
    // (flag, accepts 0, accepts 1)
    let flags = [
        ("--shutdown-grace", true, true),
        ("--webhook-timeout", false, true),
        ("--lora-timeout", false, true),
        ("--image-timeout", false, true),
        ("--visibility-timeout", false, true),
        ("--header-read-timeout", false, true),
        ("--idle-timeout", false, true),
        ("--body-timeout", false, true),
        ("--result-retention", true, true),
        ("--max-queue", false, true),
        ("--max-connections", false, true),
        ("--max-body-memory", false, false),
        ("--max-request-bytes", false, false),
        ("--max-upload-bytes", false, true),
        ("--max-lora-bytes", false, true),
        ("--max-image-bytes", false, true),
        ("--prompt-cache", true, true),
    ];
    let max = u64::MAX.to_string();
    let cases: Vec<(&str, &str, bool)> = flags
        .iter()
        .flat_map(|&(flag, zero, one)| [(flag, "0", zero), (flag, "1", one), (flag, max.as_str(), false)])
        .collect();
    let check = |(flag, value, accepted): (&str, &str, bool)| -> Option<String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pixart"))
            .args(["serve", "--port", "0", "--temporary-storage", "--no-safety-checker", "--model"])
            .arg(&model)
            .args([flag, value])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let started = line.contains("listening on");
        if started {
            let _ = child.kill();
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let setting = flag.trim_start_matches("--").replace('-', "_");
        let named = stderr.contains(flag) || stderr.contains(&setting) || stderr.contains("retention");
        let wrong = if stderr.contains("panicked") {
            Some("panicked".to_string())
        } else if accepted && !started {
            Some(format!("refused: {stderr}"))
        } else if !accepted && (started || !named || !stderr.contains("must be") && !stderr.contains("not in")) {
            Some(format!("not refused by name and range (started: {started}): {stderr}"))
        } else {
            None
        };
        wrong.map(|w| format!("{flag} {value}: {w}"))
    };
    let problems: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .chunks(12)
            .map(|chunk| scope.spawn(move || chunk.iter().filter_map(|c| check(*c)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The floods of `benches/serve_floods.py` against this build: bodies past --max-body-memory are
/// answered 503, a full queue answers 429 to invalid input and stores nothing, every one of 4000
/// multipart parts is taken (the figures it prints are the benchmark's, not checked here).
#[test]
fn floods_take_no_more_than_the_limits_allow() {
    check_script("benches/serve_floods.py", &["--check"]);
}

/// A body trickled faster than --idle-timeout is still cut at --body-timeout (408 naming it), and
/// past --max-connections a client waits until a connection closes.
#[test]
fn trickled_bodies_end_at_the_body_timeout_and_connections_are_capped() {
    use std::io::{Read, Write};
    let server = Server::start(&["--body-timeout", "1s", "--idle-timeout", "10s", "--max-connections", "2"]);
    let address = server.url.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    let head = "POST /fal-ai/pixart-sigma HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    slow.write_all(head.as_bytes()).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut answer = Vec::new();
    while answer.is_empty() && started.elapsed() < Duration::from_secs(10) {
        // One byte every 200 ms: never idle for --idle-timeout.
        let _ = slow.write_all(b" ");
        let mut chunk = [0u8; 512];
        if let Ok(n) = slow.read(&mut chunk) {
            answer.extend_from_slice(&chunk[..n]);
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut after {:?}", started.elapsed());
    drop(slow);

    // Two connections held open take both slots: a third is answered only once one closes.
    let held: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(&address).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = std::net::TcpStream::connect(&address).unwrap();
    third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    third.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut chunk = [0u8; 64];
    assert!(third.read(&mut chunk).is_err(), "answered while both slots were held");
    drop(held);
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = third.read(&mut chunk).unwrap();
    assert!(String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 200"));
}

/// OpenAI's Python SDK against `/v1/`: models, both response formats, the same image as fal's
/// `/run/`, errors as the SDK's exceptions (tests/clients/python/openai_images.py).
#[test]
fn openai_sdk_generates_through_the_same_queue() {
    install_clients();
    let server = Server::start(&["--api-key", "openai-test-key"]);
    let output = Command::new(clients_dir().join("python/.venv/bin/python"))
        .arg(clients_dir().join("python/openai_images.py"))
        .env("PIXART_URL", &server.url)
        .env("PIXART_KEY", "openai-test-key")
        .output()
        .expect("running tests/clients/python/openai_images.py");
    check("openai SDK", output, &["models", "b64_json", "url", "same_as_fal", "errors"]);
}

/// The playground in a real browser (Debian's chromium and chromium-driver, Selenium):
/// tests/clients/python/playground.py; the screenshot lands in the test's temporary folder.
#[test]
fn the_playground_works_in_a_real_browser() {
    install_clients();
    let server = Server::start(&["--api-key", "playground-test-key", "--no-safety-checker"]);
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playground.png");
    let output = Command::new(clients_dir().join("python/.venv/bin/python"))
        .arg(clients_dir().join("python/playground.py"))
        .env("PIXART_URL", &server.url)
        .env("PIXART_KEY", "playground-test-key")
        .env("SCREENSHOT", &screenshot)
        .output()
        .expect("running tests/clients/python/playground.py (needs chromium and chromium-driver)");
    let names = ["form", "api_key", "generate", "code", "cancel", "escaped", "history", "phone", "console"];
    check("playground in chromium", output, &names);
    assert!(screenshot.is_file(), "no screenshot at {}", screenshot.display());
}
