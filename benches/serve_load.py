"""Load test and latency benchmark of `pixart serve`, through the official Python `fal-client`.

N requests from C concurrent clients (each `fal_client.subscribe`: submit, poll status, get the
result). Reports latency p50/p90/p99/max and throughput as JSON; with --check it also verifies
that every request completed exactly once: N distinct request ids, every output carries its own
request's prompt and seed, and the server's counters grew by exactly N generations started and
N succeeded (none lost, none run twice).

    # against a running server
    tests/clients/python/.venv/bin/python benches/serve_load.py --url http://127.0.0.1:8000
    # start one (release build, bundled tiny model), 200 requests from 8 clients, save the report
    cargo build --release -p pixart-cli
    tests/clients/python/.venv/bin/python benches/serve_load.py --pixart target/release/pixart \
        --model tests/fixtures/tiny-sigma-256 --requests 200 --concurrency 8 \
        --out benches/results/serve-load-cpu-tiny.json

(`tests/clients/install.sh` installs the client.) Latency is measured here, never asserted:
the tests run this with --check only.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import fal_client
import fal_client.client as fc
import httpx

APP = "fal-ai/pixart-sigma"


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def start_server(binary, model):
    process = subprocess.Popen(
        [binary, "serve", "--model", model, "--port", "0", "--no-safety-checker", "--temporary-storage"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    if "listening on " not in line:
        process.kill()
        raise SystemExit(f"pixart serve did not start: {line!r}")
    return process, line.split("listening on ", 1)[1].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server")
    parser.add_argument("--pixart", help="start this pixart binary instead (with --model)")
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", default="16x16", help="WIDTHxHEIGHT of every request")
    parser.add_argument("--poll", type=float, default=0.05, help="status poll interval, seconds")
    parser.add_argument("--check", action="store_true", help="fail unless every request completed exactly once")
    parser.add_argument("--out", help="also write the report to this JSON file")
    args = parser.parse_args()

    process = None
    if args.pixart:
        process, url = start_server(args.pixart, args.model)
    elif args.url:
        url = args.url.rstrip("/")
    else:
        parser.error("give --url or --pixart")
    os.environ.setdefault("FAL_KEY", "local-load-test")
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{url}/", f"{url}/run/"
    fc.REST_URL, fc.CDN_URL = f"{url}/rest", f"{url}/cdn"
    width, height = (int(v) for v in args.size.split("x"))

    before = httpx.get(f"{url}/health").json()["requests"]
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = fal_client.SyncClient()
        request = {
            "prompt": f"load test {i}",
            "seed": i,
            "num_inference_steps": args.steps,
            "image_size": {"width": width, "height": height},
            "sync_mode": i % 2 == 0,
        }
        ids = []
        started = time.perf_counter()
        result = local.client.subscribe(APP, request, interval=args.poll, on_enqueue=ids.append)
        return i, ids, result, time.perf_counter() - started

    wall = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        done = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - wall
    after = httpx.get(f"{url}/health").json()["requests"]
    delta = {k: after[k] - before[k] for k in after}

    latencies = [d[3] for d in done]
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "request": {"steps": args.steps, "size": args.size, "sync_mode": "every other request"},
        "model": args.model if args.pixart else url,
        "latency_seconds": {
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
            "mean": statistics.fmean(latencies),
        },
        "throughput_per_second": args.requests / wall,
        "wall_seconds": wall,
        "server_counters_delta": delta,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join(sys.argv),
    }

    problems = []
    if args.check:
        ids = [i for d in done for i in d[1]]
        if len(ids) != args.requests or len(set(ids)) != args.requests:
            problems.append(f"{len(set(ids))} distinct request ids for {args.requests} requests")
        for i, _, result, _ in done:
            if result.get("prompt") != f"load test {i}" or result.get("seed") != i or len(result.get("images", [])) != 1:
                problems.append(f"request {i} got another request's output: {str(result)[:200]}")
            elif i % 2 == 0 and not result["images"][0]["url"].startswith("data:image/png;base64,"):
                problems.append(f"request {i}: sync_mode output is not a data URI")
            elif i % 2 == 1 and not result["images"][0]["url"].startswith(f"{url}/files/"):
                problems.append(f"request {i}: image URL not on the server: {result['images'][0]['url']}")
        for counter, expected in (("accepted", args.requests), ("started", args.requests), ("succeeded", args.requests), ("failed", 0), ("cancelled", 0)):
            if delta.get(counter) != expected:
                problems.append(f"server counter {counter} grew by {delta.get(counter)}, expected {expected}")
        report["check"] = "passed" if not problems else problems

    if process:
        process.terminate()
        process.wait(timeout=60)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
