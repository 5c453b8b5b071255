"""Throughput of `pixart serve` on a shared Redis queue with 1, 2 and 4 `pixart worker`
processes behind one HTTP front, next to the default single process with its embedded store,
through the official Python `fal-client` (`benches/serve_load.py`: N requests from C clients).

    cargo build --release -p pixart-cli
    tests/clients/python/.venv/bin/python benches/scale_out_throughput.py --pixart target/release/pixart \\
        --out benches/results/scale-out-cpu-tiny.json

Needs `redis-server` on PATH. Every configuration gets a fresh Redis (append-only file on, as
for production) and a fresh storage folder; each is measured --rounds times, interleaved, and
the median is reported. Workers on one CPU split its cores (RAYON_NUM_THREADS = cores / N, as GPU
workers would each have a device; --no-split-cores lets each use every core). With fewer cores
than workers the figures show the cost of the queue, not a speed-up.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "clients", "python"))
from harness import free_port, wait_port  # noqa: E402


def start(command, ready, threads=None):
    env = {**os.environ, "RUST_LOG": "warn"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)  # candle's CPU thread count
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    if ready not in line:
        process.kill()
        raise SystemExit(f"did not start: {command} {line!r}")
    return process, line


def load(url, args):
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, os.path.join(here, "serve_load.py"), "--url", url, "--requests", str(args.requests),
         "--concurrency", str(args.concurrency), "--steps", str(args.steps), "--size", args.size, "--check"],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"serve_load.py failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


def measure(args, workers):
    """One run: `workers` = 0 for the embedded single process, else a front and N workers."""
    folder = tempfile.mkdtemp(prefix="pixart-scale-bench-")
    processes = []
    try:
        if workers == 0:
            server, line = start([args.pixart, "serve", "--model", args.model, "--port", "0", "--no-safety-checker",
                                  "--storage-dir", os.path.join(folder, "storage")], "listening on ")
            processes.append(server)
        else:
            port = free_port()
            os.makedirs(os.path.join(folder, "redis"))
            processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--dir", os.path.join(folder, "redis")], stdout=subprocess.DEVNULL))
            wait_port(port)
            common = ["--queue", f"redis://127.0.0.1:{port}", "--storage-dir", os.path.join(folder, "storage")]
            server, line = start([args.pixart, "serve", "--port", "0", "--workers", "0", *common], "listening on ")
            processes.append(server)
            # Workers on one CPU split its cores (as GPU workers each have their own device).
            threads = max(1, (os.cpu_count() or 1) // workers) if args.split_cores else None
            for _ in range(workers):
                processes.append(start([args.pixart, "worker", "--model", args.model, "--no-safety-checker", *common],
                                       "working jobs", threads)[0])
        report = load(line.split("listening on ", 1)[1].strip(), args)
        if report["check"] != "passed":
            raise SystemExit(f"check failed: {report['check']}")
        return report
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--workers", default="0,1,2,4", help="0 = the embedded single process")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split-cores", action=argparse.BooleanOptionalAction, default=True,
                        help="give each of N workers cpu_count/N compute threads (RAYON_NUM_THREADS)")
    parser.add_argument("--out")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    runs = {w: [] for w in counts}
    for _ in range(args.rounds):
        for w in counts:
            runs[w].append(measure(args, w))
    rows = []
    for w in counts:
        throughput = [r["throughput_per_second"] for r in runs[w]]
        p50 = [r["latency_seconds"]["p50"] for r in runs[w]]
        rows.append({
            "setup": "embedded store, one process" if w == 0 else f"redis, 1 front + {w} worker(s)",
            "workers": w,
            "throughput_per_second_median": statistics.median(throughput),
            "throughput_per_second_runs": throughput,
            "latency_p50_seconds_median": statistics.median(p50),
        })
    report = {
        "rows": rows,
        "requests": args.requests, "concurrency": args.concurrency,
        "request": {"steps": args.steps, "size": args.size},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join(sys.argv),
    }
    text = json.dumps(report, indent=2)
    print(text)
    print("\n| setup | requests/s (median of %d) | p50 latency |\n|---|---|---|" % args.rounds)
    for row in rows:
        print(f"| {row['setup']} | {row['throughput_per_second_median']:.2f} | {row['latency_p50_seconds_median'] * 1e3:.0f} ms |")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
