"""The storage under a running server: a disk that fills up while a request is being generated,
and the job store deleted.

1. Disk full. The server runs with its storage folder on a small tmpfs of its own (a private
   mount namespace: `unshare -rm`, no root needed). While a request is generating, the disk is
   filled to the last byte (through /proc/PID/root, the server's view of its mounts). The
   request must end (COMPLETED with an error naming the full disk, its webhook sent), leave no
   file behind (no partial image), /health must answer 503 "unhealthy" naming the full disk,
   submits 503 and uploads 507; once the filler is removed, health is ok again and a new request succeeds.
2. Store deleted (`rm jobs.sqlite3` under a running server): /health goes 503 "unhealthy"
   naming the deleted file and submits are refused with 503, instead of carrying on into a
   database the next start will not see.

    tests/clients/python/.venv/bin/python tests/clients/python/disk_faults.py \\
        --pixart target/debug/pixart --model tests/fixtures/tiny-sigma-256

Prints one JSON report; exits 1 on any problem.
"""

import argparse
import os
import shutil
import signal
import tempfile
import time

import httpx

from harness import APP, Hooks, finish
from scale_out import start

REQUEST = {"prompt": "a disk", "seed": 1, "image_size": {"width": 256, "height": 256}}


def submit(url, hooks=None, **fields):
    params = {"fal_webhook": hooks.url} if hooks else {}
    return httpx.post(f"{url}/{APP}", json={**REQUEST, **fields}, params=params, timeout=30)


def status(url, request_id, logs=False):
    return httpx.get(f"{url}/{APP}/requests/{request_id}/status", params={"logs": int(logs)}).json()


def wait_for(check, timeout, what):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def fill(folder):
    """Writes a file until the disk refuses another byte; returns its path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as out:
        chunk = b"\0" * (1 << 20)
        while chunk:
            try:
                out.write(chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
    return path


def leftovers(folder):
    """Files under the storage's files/ folder (partial or not), with their sizes."""
    found = []
    for root, _, names in os.walk(os.path.join(folder, "files")):
        found += [os.path.join(root, n) for n in names]
    return found


def disk_full(args, problems, report):
    mount = tempfile.mkdtemp(prefix="pixart-disk-full-")
    script = 'mount -t tmpfs -o size=48m tmpfs "$0" && exec "$@"'
    command = ["unshare", "-rm", "sh", "-c", script, mount, args.pixart, "serve", "--port", "0",
               "--model", args.model, "--no-safety-checker", "--storage-dir", mount, "--allow-private-webhooks"]
    server, line = start(command, "listening on ")
    url = line.split("listening on ", 1)[1].strip()
    storage = f"/proc/{server.pid}/root{mount}"
    hooks = Hooks()
    try:
        request_id = submit(url, hooks, num_inference_steps=50).json()["request_id"]
        wait_for(lambda: any(l["message"].startswith("Step 2/") for l in status(url, request_id, True)["logs"]),
                 60, "the request to start")
        filler = fill(storage)
        ended = wait_for(lambda: (s := status(url, request_id, True))["status"] == "COMPLETED" and s, 120,
                         "the request to end")
        error = ended.get("error") or ""
        report["request_error"] = error[:200]
        if "full" not in error:
            problems.append(f"the request did not end with a full-disk error: {ended}")
        if not wait_for(lambda: hooks.counts[request_id], 30, "its webhook"):
            problems.append("no webhook")
        if leftovers(storage):
            problems.append(f"files left behind: {leftovers(storage)}")
        health = wait_for(lambda: (h := httpx.get(f"{url}/health")).status_code == 503 and h, 10, "unhealthy")
        report["health_when_full"] = health.json()
        if "full" not in (health.json().get("problem") or ""):
            problems.append(f"/health does not name the full disk: {health.json()}")
        refused = submit(url)
        report["submit_when_full"] = refused.status_code
        if refused.status_code != 503:
            problems.append(f"a submit on a full disk was answered {refused.status_code}")
        upload = httpx.post(f"{url}/rest/storage/upload/initiate", json={"file_name": "a.bin"})
        if upload.status_code == 200:
            put = httpx.put(upload.json()["upload_url"], content=b"x" * 4096)
            report["upload_when_full"] = put.status_code
            if put.status_code != 507:
                problems.append(f"an upload on a full disk was answered {put.status_code}")
        else:
            report["upload_when_full"] = upload.status_code

        os.remove(filler)
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 10, "healthy again")
        again = submit(url, num_inference_steps=2).json()["request_id"]
        result = wait_for(lambda: status(url, again)["status"] == "COMPLETED", 60, "the next request")
        result = httpx.get(f"{url}/{APP}/requests/{again}").json()
        if not result.get("images"):
            problems.append(f"after space returned, a request failed: {result}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(mount, ignore_errors=True)


def store_deleted(args, problems, report):
    folder = tempfile.mkdtemp(prefix="pixart-store-deleted-")
    command = [args.pixart, "serve", "--port", "0", "--model", args.model, "--no-safety-checker",
               "--storage-dir", folder]
    server, line = start(command, "listening on ")
    url = line.split("listening on ", 1)[1].strip()
    try:
        first = submit(url, num_inference_steps=2)
        if first.status_code != 200:
            problems.append(f"submit before the deletion: {first.status_code}")
        os.remove(os.path.join(folder, "jobs.sqlite3"))
        health = wait_for(lambda: (h := httpx.get(f"{url}/health")).status_code == 503 and h, 10,
                          "/health to notice the deleted store")
        report["health_after_delete"] = health.json()
        if "deleted" not in (health.json().get("problem") or ""):
            problems.append(f"/health does not say the store was deleted: {health.json()}")
        refused = submit(url, num_inference_steps=2)
        report["submit_after_delete"] = refused.status_code
        if refused.status_code != 503:
            problems.append(f"a submit after the store was deleted was answered {refused.status_code}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True)
    parser.add_argument("--model", default="tests/fixtures/tiny-sigma-256")
    args = parser.parse_args()
    problems, report = [], {}
    disk_full(args, problems, report)
    store_deleted(args, problems, report)
    finish(report, problems)


if __name__ == "__main__":
    main()
