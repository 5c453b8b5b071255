"""A stalled Redis: one HTTP front and one worker on one Redis, which is paused (SIGSTOP) for a
while in the middle of a load, then resumed (SIGCONT).

While Redis is paused its connections stay open and nothing answers, the failure that makes
blocking clients hang. 20 client threads poll the front meanwhile (`/health` and a request's
status); every answer must come within a second (503 is fine: the queue is unavailable), and a
route that needs no store (an unknown app: 404) answers at once. 20 more clients submit
requests through the pause and a second after it: each answered 200 completes exactly once,
and each answered 503 (or 429 once the queue fills) never runs (no webhook ever reaches its own
webhook path). After Redis resumes, every request
accepted completes exactly once (its own output and image, one "Done" line in its logs), every
webhook arrives once, and the shared counters agree: accepted = started = succeeded.

    tests/clients/python/.venv/bin/python tests/clients/python/redis_stall.py \\
        --pixart target/debug/pixart --model tests/fixtures/tiny-sigma-256

Prints one JSON report; exits 1 on any problem.
"""

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time

import fal_client
import fal_client.client as fc
import httpx

from harness import APP, Hooks, check_all_completed, finish, free_port, missing_webhooks
from scale_out import start, start_redis


def poll(url, path, until, results, lock):
    """GETs `path` until `until` (monotonic), recording (seconds, status) of each answer."""
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                status = client.get(f"{url}{path}").status_code
            except httpx.HTTPError as e:
                status = f"error: {e}"
            with lock:
                results.append((time.monotonic() - started, status))


class RawHandle:
    """A request submitted with plain HTTP (to see each answer's status), read like fal's handle."""

    def __init__(self, url, request_id):
        self.url, self.request_id = url, request_id

    def get(self):
        response = httpx.get(f"{self.url}/{APP}/requests/{self.request_id}")
        response.raise_for_status()
        return response.json()


def submit_through(url, hooks, first, until, answers, lock):
    """Submits requests numbered from `first` until `until` (monotonic), each with a webhook path
    of its own; records (number, status, request id or None)."""
    with httpx.Client(timeout=30) as client:
        k = first
        while time.monotonic() < until:
            body = {"prompt": f"stall submit {k}", "seed": 9000 + k, "num_inference_steps": 2,
                    "image_size": {"width": 32, "height": 32}}
            hook = f"{hooks.url}/submit-{k}"
            try:
                answer = client.post(f"{url}/{APP}", json=body, params={"fal_webhook": hook})
                status = answer.status_code
                request_id = answer.json().get("request_id") if status == 200 else None
            except httpx.HTTPError as e:
                status, request_id = f"error: {e}", None
            with lock:
                answers.append((k, status, request_id))
            k += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--stall", type=float, default=10.0, help="seconds Redis stays paused")
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="pixart-redis-stall-")
    storage, redis_dir = os.path.join(folder, "storage"), os.path.join(folder, "redis")
    os.makedirs(redis_dir)
    redis_port = free_port()
    queue = f"redis://127.0.0.1:{redis_port}"
    redis = start_redis(redis_port, redis_dir)
    # The default visibility timeout (30 s) outlasts the pause: no lease runs out meanwhile.
    common = ["--queue", queue, "--storage-dir", storage, "--allow-private-webhooks", "--webhook-timeout", "2s"]
    front, line = start([args.pixart, "serve", "--port", "0", "--workers", "0", *common], "listening on ")
    url = line.split("listening on ", 1)[1].strip()
    worker = start([args.pixart, "worker", "--model", args.model, "--no-safety-checker", *common], "working jobs")[0]

    os.environ.setdefault("FAL_KEY", "local-redis-stall-test")
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{url}/", f"{url}/run/"
    fc.REST_URL, fc.CDN_URL = f"{url}/rest", f"{url}/cdn"
    hooks = Hooks()
    problems = []
    report = {"requests": args.requests, "stall_seconds": args.stall, "polling_clients": args.clients}
    try:
        handles = {}
        for i in range(args.requests):
            request = {"prompt": f"stall {i}", "seed": 7000 + i, "num_inference_steps": 3,
                       "image_size": {"width": 32, "height": 32}}
            handles[i] = fal_client.submit(APP, request, webhook_url=hooks.url)
        while httpx.get(f"{url}/health").json()["requests"]["succeeded"] < args.requests // 4:
            time.sleep(0.02)

        redis.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        until = paused + args.stall - 0.5
        results = {"health": [], "status": []}
        lock = threading.Lock()
        paths = {"health": "/health", "status": f"/{APP}/requests/{handles[args.requests - 1].request_id}/status"}
        threads = [threading.Thread(target=poll, args=(url, paths[name], until, results[name], lock))
                   for i in range(args.clients) for name in [("health", "status")[i % 2]]]
        submitted = []
        submitters = [threading.Thread(target=submit_through,
                                       args=(url, hooks, 1000 * (i + 1), until + 1.0, submitted, lock))
                      for i in range(args.clients)]
        threads += submitters
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        started = time.monotonic()
        no_store = httpx.get(f"{url}/nothing-here", timeout=10)
        report["no_store_route"] = {"status": no_store.status_code, "seconds": round(time.monotonic() - started, 3)}
        for thread in threads:
            if thread not in submitters:
                thread.join()
        redis.send_signal(signal.SIGCONT)
        report["paused_seconds"] = round(time.monotonic() - paused, 2)
        for thread in submitters:
            thread.join()
        accepted = {k: RawHandle(url, rid) for k, status, rid in submitted if status == 200}
        refused = [k for k, status, _ in submitted if status != 200]
        report["submits_during_stall"] = {
            "answers": len(submitted),
            "statuses": sorted({str(status) for _, status, _ in submitted}),
            "accepted": len(accepted),
        }
        if not set(report["submits_during_stall"]["statuses"]) <= {"200", "429", "503"}:
            problems.append(f"submits during the stall: unexpected answers {report['submits_during_stall']}")
        if not refused:
            problems.append("no submit was refused while Redis was paused")

        for name, answers in results.items():
            slowest = max(seconds for seconds, _ in answers)
            statuses = sorted({str(status) for _, status in answers})
            report[name] = {"answers": len(answers), "slowest_seconds": round(slowest, 3), "statuses": statuses}
            if slowest >= 1.0:
                problems.append(f"{name}: an answer took {slowest:.2f} s while Redis was paused")
            if not set(statuses) <= {"200", "202", "503"}:
                problems.append(f"{name}: unexpected answers {statuses}")
            if "503" not in statuses:
                problems.append(f"{name}: never told the client the queue was unavailable")
        if no_store.status_code != 404 or report["no_store_route"]["seconds"] >= 1.0:
            problems.append(f"a route needing no store answered {report['no_store_route']}")

        check_all_completed(url, handles, lambda i: f"stall {i}", lambda i: 7000 + i, problems)
        check_all_completed(url, accepted, lambda k: f"stall submit {k}", lambda k: 9000 + k, problems)
        missing = missing_webhooks(hooks, {**handles, **{("s", k): h for k, h in accepted.items()}}, 60)
        if missing:
            problems.append(f"no webhook for requests {missing}")
        # A refused submit that ran anyway would have sent its webhook by now (the queue is idle).
        ran = [k for k in refused if hooks.paths[f"/hook/submit-{k}"] > 0]
        if ran:
            problems.append(f"submits answered 503/429 ran anyway: {ran}")
        report["duplicate_webhooks"] = sum(max(0, c - 1) for c in hooks.counts.values())
        if report["duplicate_webhooks"]:
            problems.append(f"{report['duplicate_webhooks']} webhooks arrived twice")
        counters = report["counters"] = httpx.get(f"{url}/health").json()["requests"]
        total = args.requests + len(accepted)
        if not counters["accepted"] == counters["started"] == counters["succeeded"] == total:
            problems.append(f"counters disagree: {counters}, expected {total} accepted, started and succeeded")
    finally:
        if redis.poll() is None:
            redis.send_signal(signal.SIGCONT)
        for process in [front, worker]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)

    finish(report, problems)


if __name__ == "__main__":
    main()
