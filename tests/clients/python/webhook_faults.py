"""Webhook receivers that never answer: one that holds every connection open without a word, and
a black hole (a listener whose accept queue is full, so the kernel drops further SYNs and a
connect never completes).

1. 24 requests whose webhooks go to the holder (on 127.0.0.2) and 2 to the black hole (on
   127.0.0.3), then one whose webhook goes to a healthy receiver (on 127.0.0.1): the healthy
   one's webhook arrives within 2 s of its request completing (one host, whatever its ports,
   ties up at most two delivery threads).
2. More requests for the holder, then SIGTERM: the server exits within the grace period of its
   webhooks (plus the running request's, both --shutdown-grace) and a little HTTP drain, and the
   deliveries it did not get to stay pending: the next start on the same storage sends them.

    tests/clients/python/.venv/bin/python tests/clients/python/webhook_faults.py \\
        --pixart target/debug/pixart --model tests/fixtures/tiny-sigma-256

Prints one JSON report; exits 1 on any problem.
"""

import argparse
import shutil
import signal
import socket
import tempfile
import threading
import time

import httpx

from harness import APP, Hooks, finish
from scale_out import start


class Holder:
    """Accepts connections and never reads or answers them; counts them."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.2", 0))
        self.listener.listen(512)
        self.connections = []
        self.url = f"http://127.0.0.2:{self.listener.getsockname()[1]}/held"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)


def black_hole():
    """A listener that never accepts, its accept queue filled: further connects get no answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.3", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    return listener, fillers, f"http://127.0.0.3:{listener.getsockname()[1]}/void"


def submit(url, k, webhook):
    body = {"prompt": f"hook {k}", "seed": k, "num_inference_steps": 2, "image_size": {"width": 32, "height": 32}}
    answer = httpx.post(f"{url}/{APP}", json=body, params={"fal_webhook": webhook}, timeout=30)
    answer.raise_for_status()
    return answer.json()["request_id"]


def wait_completed(url, request_id, timeout=120):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        status = httpx.get(f"{url}/{APP}/requests/{request_id}/status").json()
        if status.get("status") == "COMPLETED":
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"request {request_id} did not complete")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="pixart-webhook-faults-")
    grace = 2.0
    command = [args.pixart, "serve", "--port", "0", "--model", args.model, "--no-safety-checker",
               "--storage-dir", folder, "--allow-private-webhooks", "--webhook-timeout", "1s",
               "--shutdown-grace", f"{int(grace * 1000)}ms"]
    holder, hooks = Holder(), Hooks()
    void_listener, fillers, void_url = black_hole()
    problems, report = [], {}
    server = None
    try:
        server, line = start(command, "listening on ")
        url = line.split("listening on ", 1)[1].strip()
        for k in range(24):
            submit(url, k, f"{holder.url}/{k}")
        for k in range(2):
            submit(url, 100 + k, f"{void_url}/{k}")
        healthy = submit(url, 200, hooks.url)
        completed = wait_completed(url, healthy)
        while hooks.counts[healthy] == 0 and time.monotonic() < completed + 60:
            time.sleep(0.01)
        delay = time.monotonic() - completed
        report["healthy_webhook_delay_seconds"] = round(delay, 3)
        if hooks.counts[healthy] != 1 or delay > 2.0:
            problems.append(f"the healthy receiver's webhook came {delay:.2f} s after its request completed")

        # Deliveries for the holder that cannot all be attempted before the shutdown.
        last = None
        for k in range(24, 40):
            last = submit(url, k, f"{holder.url}/{k}")
        wait_completed(url, last)
        held_before = len(holder.connections)
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        stopped = time.monotonic() - stopping
        report["shutdown_seconds"] = round(stopped, 2)
        bound = 2 * grace + 3.0
        if stopped > bound:
            problems.append(f"SIGTERM took {stopped:.1f} s with webhooks hanging (bound {bound:.1f} s)")

        # The next start sends what was left.
        server, line = start(command, "listening on ")
        until = time.monotonic() + 30
        while len(holder.connections) == held_before and time.monotonic() < until:
            time.sleep(0.05)
        report["held_connections"] = {"before_restart": held_before, "after_restart": len(holder.connections)}
        if len(holder.connections) == held_before:
            problems.append("the deliveries left at shutdown were not sent by the next start")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        for s in fillers:
            s.close()
        void_listener.close()
        holder.listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    finish(report, problems)


if __name__ == "__main__":
    main()
