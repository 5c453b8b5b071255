"""Scale-out under failure: one HTTP front and two workers on one Redis (append-only file on).

Starts `redis-server`, `pixart serve --queue redis://… --workers 0` and two `pixart worker`
processes sharing a storage folder, submits N requests with fal-client (each with a webhook),
then:

1. kills one worker with SIGKILL a third of the way through: its job's lease runs out and the
   other worker runs it again;
2. stops Redis (SIGTERM) for a few seconds two thirds of the way through: the front answers 503
   meanwhile (submit and status), then Redis is started again on the same port and folder.

Checks that every accepted request ends COMPLETED with its own output (prompt and seed) and image,
with exactly one "Done" line in its logs (none ran to completion twice), and that every webhook
arrived (duplicates are reported; at least once).

    tests/clients/python/.venv/bin/python tests/clients/python/scale_out.py \\
        --pixart target/debug/pixart --model tests/fixtures/tiny-sigma-256

Prints one JSON report; exits 1 on any problem.
"""

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time

import fal_client
import fal_client.client as fc
import httpx

from harness import APP, Hooks, check_all_completed, finish, free_port, missing_webhooks, wait_port

def start_redis(port, folder):
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "always", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return process


def start(command, ready):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "RUST_LOG": "warn"})
    line = process.stdout.readline()
    if ready not in line:
        process.kill()
        raise SystemExit(f"{command[1]} did not start: {line!r}")
    return process, line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds Redis stays down")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="pixart-scale-out-")
    storage, redis_dir = os.path.join(folder, "storage"), os.path.join(folder, "redis")
    os.makedirs(redis_dir)
    redis_port = free_port()
    queue = f"redis://127.0.0.1:{redis_port}"
    redis = start_redis(redis_port, redis_dir)
    common = ["--queue", queue, "--storage-dir", storage, "--allow-private-webhooks",
              "--visibility-timeout", "10s", "--webhook-timeout", "2s"]
    front, line = start([args.pixart, "serve", "--port", "0", "--workers", "0", "--max-queue", "1000", *common],
                        "listening on ")
    url = line.split("listening on ", 1)[1].strip()
    worker = [args.pixart, "worker", "--model", args.model, "--no-safety-checker", *common]
    workers = [start(worker, "working jobs")[0] for _ in range(2)]

    os.environ.setdefault("FAL_KEY", "local-scale-out-test")
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{url}/", f"{url}/run/"
    fc.REST_URL, fc.CDN_URL = f"{url}/rest", f"{url}/cdn"
    hooks = Hooks()
    problems = []
    report = {"requests": args.requests}
    try:
        handles = {}
        for i in range(args.requests):
            request = {"prompt": f"scale-out {i}", "seed": 5000 + i, "num_inference_steps": args.steps,
                       "image_size": {"width": 32, "height": 32}}
            handles[i] = fal_client.submit(APP, request, webhook_url=hooks.url)

        def succeeded():
            return httpx.get(f"{url}/health").json()["requests"]["succeeded"]

        def both_workers_busy():
            counts = httpx.get(f"{url}/health").json()["requests"]
            in_flight = counts["started"] - counts["succeeded"] - counts["failed"] - counts["cancelled"]
            return counts["succeeded"] >= args.requests // 3 and in_flight >= 2

        # Kill while both workers hold a job (a worker killed between two jobs would leave
        # nothing to run again, and the lease path would go untested).
        give_up = time.monotonic() + 60
        while not both_workers_busy() and time.monotonic() < give_up:
            time.sleep(0.002)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=30)
        report["worker_killed_at_succeeded"] = succeeded()

        while succeeded() < 2 * args.requests // 3:
            time.sleep(0.05)
        redis.send_signal(signal.SIGTERM)
        redis.wait(timeout=30)
        down = time.monotonic()
        health = httpx.get(f"{url}/health")
        submit = httpx.post(f"{url}/{APP}", json={"prompt": "during the outage"})
        status = httpx.get(f"{url}/{APP}/requests/{handles[0].request_id}/status")
        report["during_outage"] = [health.status_code, submit.status_code, status.status_code]
        if [health.status_code, submit.status_code, status.status_code] != [503, 503, 503]:
            problems.append(f"during the Redis outage the front answered {report['during_outage']}, not 503")
        time.sleep(max(0.0, args.outage - (time.monotonic() - down)))
        redis = start_redis(redis_port, redis_dir)

        restarted = check_all_completed(url, handles, lambda i: f"scale-out {i}", lambda i: 5000 + i, problems)
        report["requests_started_again"] = restarted
        if not restarted:
            problems.append("no request was started again after the worker was killed")

        missing = missing_webhooks(hooks, handles, 60)
        if missing:
            problems.append(f"no webhook for requests {missing}")
        report["duplicate_webhooks"] = sum(max(0, c - 1) for c in hooks.counts.values())
        report["counters"] = httpx.get(f"{url}/health").json()["requests"]
    finally:
        for process in [front, *workers]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)

    finish(report, problems)


if __name__ == "__main__":
    main()
