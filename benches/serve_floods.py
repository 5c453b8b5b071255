#!/usr/bin/env python3
"""What an anonymous client can take from `pixart serve`: memory, disk and time, under three
floods, for one or more `pixart` binaries side by side (say, the last release and this build).

1. Slow bodies: 300 connections each send the headers of a 1 MB JSON submit and all of its body
   but the last byte, then hold it. Reported: the server's resident memory while they hold
   (VmRSS), its peak (VmHWM), the memory after they closed, and how the requests were answered.
2. Invalid requests against a full queue: the queue is filled (--max-queue 1, one request
   running and one waiting), then 100 invalid 1 MB submits. Reported: how they were answered
   and how much the job store grew (jobs.sqlite3 and its WAL).
3. Multipart parts: one upload, 4000 one-byte parts. Reported: the median time of the first and
   the last 200 parts.

    python3 benches/serve_floods.py --pixart target/release/pixart [--pixart /tmp/pixart-before] \\
        --model tests/fixtures/tiny-sigma-256 [--check]

Needs httpx. Prints one JSON report (per binary). With --check, exits 1 unless the last binary
answers as it promises (bodies past --max-body-memory get 503, a full queue answers 429 to
invalid input and stores nothing, every part is taken); the figures are for reading, not checked.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

APP = "fal-ai/pixart-sigma"


def start(pixart, model, storage, extra):
    command = [pixart, "serve", "--port", "0", "--model", model, "--no-safety-checker", "--storage-dir", storage,
               *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "RUST_LOG": "error"})
    line = process.stdout.readline()
    if "listening on " not in line:
        process.kill()
        raise SystemExit(f"{pixart} did not start: {line!r}")
    return process, line.split("listening on ", 1)[1].strip()


def memory_mib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def slow_bodies(url, pid, connections=300, size=1_000_000):
    host, port = url.split("//", 1)[1].split(":")
    before = memory_mib(pid)
    head = (f"POST /{APP} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    body = b'{"prompt": "' + b"x" * (size - 16) + b'"}'
    sockets = []
    for _ in range(connections):
        s = socket.create_connection((host, int(port)))
        try:
            s.sendall(head + body[: size - 1])
        except ConnectionError:
            pass  # answered and closed before the whole body was sent: its answer is read below
        sockets.append(s)
    time.sleep(5)
    holding = memory_mib(pid)
    answers = {}
    for s in sockets:
        s.settimeout(0.05)
        try:
            status = s.recv(64).split(b" ")[1].decode()
        except (socket.timeout, IndexError):
            status = "held"
        except ConnectionError:
            status = "reset"  # closed under a client still sending; its answer was lost
        except OSError:
            status = "held"
        answers[status] = answers.get(status, 0) + 1
    for s in sockets:
        s.close()
    time.sleep(3)
    after = memory_mib(pid)
    return {"connections": connections, "body_bytes": size, "rss_before_mib": before["VmRSS"],
            "rss_holding_mib": holding["VmRSS"], "peak_mib": after["VmHWM"], "rss_after_close_mib": after["VmRSS"],
            "answers": answers}


def store_bytes(storage):
    return sum(os.path.getsize(os.path.join(storage, n)) for n in os.listdir(storage) if n.startswith("jobs.sqlite3"))


def invalid_flood(url, storage, requests=100, size=1_000_000):
    fill = {"prompt": "busy", "num_inference_steps": 50, "num_images": 4, "image_size": {"width": 2048, "height": 2048}}
    for _ in range(2):  # one running, one waiting: --max-queue 1 is full
        httpx.post(f"{url}/{APP}", json=fill, timeout=30).raise_for_status()
    time.sleep(1)
    before = store_bytes(storage)
    answers = {}
    invalid = {"prompt": "x" * size, "num_images": 99}
    with httpx.Client(timeout=60) as client:
        for _ in range(requests):
            status = str(client.post(f"{url}/{APP}", json=invalid).status_code)
            answers[status] = answers.get(status, 0) + 1
    time.sleep(1)
    return {"requests": requests, "body_bytes": size, "answers": answers,
            "store_growth_mib": round((store_bytes(storage) - before) / 2**20, 2)}


def multipart_parts(url, parts=4000):
    upload = httpx.post(f"{url}/rest/storage/upload/initiate-multipart",
                        json={"content_type": "application/octet-stream", "file_name": "parts.bin"}).json()
    times, answers = [], {}
    with httpx.Client(timeout=30) as client:
        for n in range(1, parts + 1):
            started = time.perf_counter()
            status = str(client.put(f"{upload['upload_url']}/{n}", content=b"x").status_code)
            times.append(time.perf_counter() - started)
            answers[status] = answers.get(status, 0) + 1
    first, last = statistics.median(times[:200]) * 1e3, statistics.median(times[-200:]) * 1e3
    return {"parts": parts, "answers": answers, "first_200_median_ms": round(first, 2),
            "last_200_median_ms": round(last, 2)}


def measure(pixart, model):
    report = {"pixart": pixart}
    folder = tempfile.mkdtemp(prefix="pixart-floods-")
    try:
        for name, flood, extra in [("slow_bodies", slow_bodies, []),
                                   ("invalid_requests_full_queue", invalid_flood, ["--max-queue", "1"]),
                                   ("multipart_parts", multipart_parts, [])]:
            storage = os.path.join(folder, name)
            server, url = start(pixart, model, storage, extra)
            try:
                args = {"slow_bodies": (url, server.pid), "invalid_requests_full_queue": (url, storage),
                        "multipart_parts": (url,)}[name]
                report[name] = flood(*args)
            finally:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def problems_of(report):
    problems = []
    slow = report["slow_bodies"]
    if "503" not in slow["answers"]:
        problems.append(f"no body was refused past the memory budget: {slow}")
    invalid = report["invalid_requests_full_queue"]
    if invalid["answers"] != {"429": invalid["requests"]} or invalid["store_growth_mib"] > 1:
        problems.append(f"a full queue took invalid requests: {invalid}")
    parts = report["multipart_parts"]
    if parts["answers"] != {"200": parts["parts"]}:
        problems.append(f"parts were refused: {parts}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", action="append", required=True, help="a pixart binary (repeatable)")
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    reports = [measure(pixart, args.model) for pixart in args.pixart]
    problems = problems_of(reports[-1]) if args.check else []
    print(json.dumps({"runs": reports, "check": problems or "passed"}, indent=2))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
