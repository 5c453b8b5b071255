"""A restart in the middle of a load: nothing accepted is lost, nothing runs to completion twice.

Starts `pixart serve` on a fixed port and storage folder, submits N requests with fal-client
(each with a webhook), stops the server while it works through them (`--stop kill`: SIGKILL,
`--stop term`: SIGTERM with a short grace period, so the running request is stopped and given
back to the queue), starts it again on the same port and folder, and checks that:

- every accepted request ends COMPLETED with its own output (prompt and seed), its image served;
- each request's logs hold exactly one "Done" line: none ran to completion twice;
- every request's webhook arrived (a delivery cut by the kill may come twice: at least once);
- a request finished before the stop still has its result and image after it.

    tests/clients/python/.venv/bin/python tests/clients/python/restart.py \
        --pixart target/debug/pixart --model tests/fixtures/tiny-sigma-256 --stop kill

Prints one JSON report; exits 1 on any problem.
"""

import argparse
import os
import signal
import subprocess
import tempfile
import time

import fal_client
import fal_client.client as fc
import httpx

from harness import APP, Hooks, check_all_completed, finish, free_port, missing_webhooks

def start(binary, model, port, storage):
    process = subprocess.Popen(
        [binary, "serve", "--model", model, "--port", str(port), "--storage-dir", storage,
         "--no-safety-checker", "--allow-private-webhooks", "--max-queue", "1000", "--shutdown-grace", "300ms"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    line = process.stdout.readline()
    if "listening on " not in line:
        process.kill()
        raise SystemExit(f"pixart serve did not start: {line!r}")
    return process


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stop", choices=["kill", "term"], default="kill")
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="pixart-restart-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ.setdefault("FAL_KEY", "local-restart-test")
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{url}/", f"{url}/run/"
    fc.REST_URL, fc.CDN_URL = f"{url}/rest", f"{url}/cdn"
    hooks = Hooks()
    problems = []

    def request(i):
        return {"prompt": f"restart test {i}", "seed": 1000 + i, "num_inference_steps": args.steps,
                "image_size": {"width": 32, "height": 32}}

    server = start(args.pixart, args.model, port, storage)
    first = fal_client.submit(APP, request(-1))
    early = first.get()
    handles = {i: fal_client.submit(APP, request(i), webhook_url=hooks.url) for i in range(args.requests)}

    # Stop it a third of the way through, while it works.
    while httpx.get(f"{url}/health").json()["requests"]["succeeded"] < 1 + args.requests // 3:
        time.sleep(0.02)
    if args.stop == "kill":
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    else:
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=60) != 0:
            problems.append(f"after SIGTERM the server exited with {server.returncode}")

    server = start(args.pixart, args.model, port, storage)
    try:
        recovery_seen = httpx.get(f"{url}/health").json()
        restarted = check_all_completed(url, handles, lambda i: f"restart test {i}", lambda i: 1000 + i, problems)
        # The request finished before the stop keeps its result and image.
        again = first.get()
        if again != early or httpx.get(early["images"][0]["url"]).status_code != 200:
            problems.append("a result finished before the stop was not kept")
        # Webhooks: every request's, at least once (the ones cut by a kill may come again).
        missing = missing_webhooks(hooks, handles, 30)
        if missing:
            problems.append(f"no webhook for requests {missing}")
        duplicates = sum(max(0, c - 1) for c in hooks.counts.values())
        wrong = [i for i, h in handles.items() if hooks.payloads.get(h.request_id, {}).get("status") not in (None, "OK")]
        if wrong:
            problems.append(f"webhooks reporting an error for requests {wrong}")
        if args.stop == "term" and duplicates:
            problems.append(f"{duplicates} duplicate webhooks after a graceful stop")
        if duplicates > 8:
            problems.append(f"{duplicates} duplicate webhooks: more than the deliveries in flight at the kill")
    finally:
        server.terminate()
        server.wait(timeout=60)

    report = {
        "stop": args.stop,
        "requests": args.requests,
        "health_after_restart": recovery_seen,
        "requests_started_again": restarted,
        "duplicate_webhooks": duplicates,
    }
    finish(report, problems)


if __name__ == "__main__":
    main()
