"""Helpers shared by the multi-process client tests (restart.py, scale_out.py, redis_stall.py)."""

import collections
import http.server
import json
import socket
import sys
import threading
import time

import httpx

APP = "fal-ai/pixart-sigma"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hooks:
    """Counts webhook POSTs by request id, and by the path they were sent to."""

    def __init__(self):
        self.counts = collections.Counter()
        self.paths = collections.Counter()
        self.payloads = {}
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hooks.counts[body["request_id"]] += 1
                hooks.paths[self.path] += 1
                hooks.payloads[body["request_id"]] = body
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def wait_port(port, timeout=10):
    """Waits until something listens on 127.0.0.1:port."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def check_all_completed(url, handles, prompt, seed, problems, timeout=300):
    """Waits for every request (tolerating a server that is briefly unreachable) and checks it:
    COMPLETED without error, its own output (`prompt(i)`, `seed(i)`), its image served, exactly
    one "Done" line in its logs (it ran to completion once). Appends what is wrong to
    `problems`; returns the requests whose logs say they were started again."""
    deadline = time.monotonic() + timeout
    restarted = []
    for i, handle in handles.items():
        while True:
            try:
                status = httpx.get(f"{url}/{APP}/requests/{handle.request_id}/status", params={"logs": 1}).json()
            except httpx.HTTPError:
                status = {"status": "unreachable"}
            if status.get("status") == "COMPLETED":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"request {i} not completed: {status}")
            time.sleep(0.05)
        if "error" in status:
            problems.append(f"request {i} failed: {status['error']}")
            continue
        done_lines = [line for line in status["logs"] if line["message"].startswith("Done (seed")]
        if len(done_lines) != 1:
            problems.append(f"request {i}: {len(done_lines)} 'Done' lines in its logs")
        if any("Started again" in line["message"] for line in status["logs"]):
            restarted.append(i)
        result = result_of(handle, deadline)
        if result.get("prompt") != prompt(i) or result.get("seed") != seed(i):
            problems.append(f"request {i} got another output: {str(result)[:200]}")
        elif httpx.get(result["images"][0]["url"]).status_code != 200:
            problems.append(f"request {i}: its image is not served")
    return restarted


def result_of(handle, deadline):
    """`handle.get()`, asked again while the server answers 503 (the queue is unavailable for
    now: the protocol's "retry") until `deadline`; any other failure is raised."""
    while True:
        try:
            return handle.get()
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def missing_webhooks(hooks, handles, timeout):
    """Waits up to `timeout` s for every request's webhook; returns the requests without one."""
    until = time.monotonic() + timeout
    while time.monotonic() < until and any(hooks.counts[h.request_id] == 0 for h in handles.values()):
        time.sleep(0.05)
    return [i for i, h in handles.items() if hooks.counts[h.request_id] == 0]


def finish(report, problems):
    """Prints the JSON report (with `check`: "passed" or the problems) and exits 1 on problems."""
    report["check"] = problems or "passed"
    print(json.dumps(report, indent=2))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
