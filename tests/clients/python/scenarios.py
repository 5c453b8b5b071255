"""Drives the official `fal-client` (PyPI), unmodified, against a running `pixart serve`.

    python scenarios.py http://127.0.0.1:PORT [scenario ...]

The client is pointed at the server by rebinding its module constants (fal's hosts are fixed
https URLs in the package). Each scenario prints `ok <name>` or raises; the process exits
non-zero on the first failure. FAL_KEY must be set (the client refuses to start without one).
"""

import asyncio
import hashlib
import http.server
import json
import os
import queue
import sys
import threading
import struct
import time
import zlib

import fal_client
import fal_client.client as fc
import httpx

BASE = sys.argv[1].rstrip("/")
APP = "fal-ai/pixart-sigma"
fc.QUEUE_URL_FORMAT = f"{BASE}/"
fc.RUN_URL_FORMAT = f"{BASE}/run/"
fc.REST_URL = f"{BASE}/rest"
fc.CDN_URL = f"{BASE}/cdn"


def small(**extra):
    return {"prompt": "a red cat", "image_size": {"width": 32, "height": 24}, "num_inference_steps": 3, "seed": 7, **extra}


def fetch(url):
    assert url.startswith(f"{BASE}/files/"), f"file URL on the server's host: {url}"
    response = httpx.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response


def check_image(image, width, height):
    assert (image["width"], image["height"]) == (width, height), image
    response = fetch(image["url"])
    assert response.headers["content-type"] == "image/png"
    assert len(response.content) == image["file_size"]
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


def wait_for(handle, wanted, timeout=60):
    until = time.monotonic() + timeout
    while True:
        status = handle.status(with_logs=True)
        if isinstance(status, wanted):
            return status
        assert time.monotonic() < until, f"{handle.request_id} never reached {wanted}: {status}"
        time.sleep(0.02)


def expect_http_error(call, status_code):
    try:
        call()
    except fal_client.client.FalClientHTTPError as e:
        assert e.status_code == status_code, (e.status_code, e.message)
        return e
    raise AssertionError(f"expected HTTP {status_code}")


class WebhookReceiver:
    """A loopback HTTP server collecting POSTed JSON bodies."""

    def __init__(self):
        self.received = queue.Queue()
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                self.send_response(200)
                self.end_headers()
                received.put(json.loads(body))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def next(self, timeout=60):
        return self.received.get(timeout=timeout)

    def close(self):
        self.server.shutdown()


def subscribe_logs():
    updates = []
    result = fal_client.subscribe(
        APP, small(), with_logs=True, on_queue_update=updates.append, on_enqueue=lambda _id: None
    )
    assert result["seed"] == 7 and result["prompt"] == "a red cat"
    check_image(result["images"][0], 32, 24)
    logs = [line["message"] for update in updates if hasattr(update, "logs") and update.logs for line in update.logs]
    for step in ("Step 1/3", "Step 2/3", "Step 3/3"):
        assert any(m.startswith(step) for m in logs), logs
    assert isinstance(updates[-1], fal_client.Completed)


def queue_flow():
    # Every worker (PIXART_WORKERS: how many share the queue) is kept busy first, or an idle one
    # would take the next submit before its position is read.
    busy = [fal_client.submit(APP, small(num_inference_steps=200, seed=1 + 100 * i))
            for i in range(int(os.environ.get("PIXART_WORKERS", "1")))]
    for handle in busy:
        wait_for(handle, fal_client.InProgress)
    second = fal_client.submit(APP, small(seed=2))
    third = fal_client.submit(APP, small(seed=3))
    status = third.status()
    assert isinstance(status, fal_client.Queued) and status.position == 1, status

    second.cancel()
    moved = third.status()
    assert isinstance(moved, fal_client.Queued) and moved.position == 0, moved
    error = expect_http_error(second.get, 400)
    assert "cancelled" in str(error.message)

    for handle in busy:
        handle.cancel()
    for handle in busy:
        stopped = wait_for(handle, fal_client.Completed)
        assert stopped.error and stopped.error_type == "RequestCancelled", stopped
        steps = [line for line in stopped.logs if line["message"].startswith("Step ")]
        assert 1 <= len(steps) < 200, len(steps)

    result = third.get()
    assert result["seed"] == 3
    expect_http_error(third.cancel, 400)
    # A handle rebuilt from the id alone (another process, say) reaches the same request.
    again = fal_client.SyncClient().get_handle(APP, third.request_id)
    assert again.get()["seed"] == 3
    assert fal_client.result(APP, third.request_id)["seed"] == 3
    expect_http_error(lambda: fal_client.status(APP, "00000000-0000-0000-0000-000000000000"), 404)


def invalid_input():
    error = expect_http_error(lambda: fal_client.subscribe(APP, {"prompt": "x", "num_images": 99}), 422)
    detail = error.message
    assert isinstance(detail, list) and detail[0]["loc"] == ["body", "num_images"], detail
    assert "1 to 8" in detail[0]["msg"]
    error = expect_http_error(lambda: fal_client.run(APP, {}), 422)
    assert error.message[0]["loc"] == ["body", "prompt"], error.message


def run():
    result = fal_client.run(APP, small(seed=21))
    assert result["seed"] == 21
    check_image(result["images"][0], 32, 24)


def run_disconnect():
    """A /run/ caller that goes away cancels its request (the worker does not keep generating)."""
    before = httpx.get(f"{BASE}/health").json()["requests"]
    try:
        httpx.post(f"{BASE}/run/{APP}", json=small(num_inference_steps=200), timeout=0.5)
        raise AssertionError("a 200-step run should outlast a 0.5 s client timeout")
    except httpx.ReadTimeout:
        pass
    until = time.monotonic() + 30
    while True:
        health = httpx.get(f"{BASE}/health").json()
        if health["requests"]["cancelled"] == before["cancelled"] + 1 and not health["in_progress"]:
            break
        assert time.monotonic() < until, health
        time.sleep(0.05)
    assert health["requests"]["succeeded"] == before["succeeded"], health


def host_urls():
    """Image URLs are built from the Host the reading request came in on (or a proxy's
    X-Forwarded-Host/-Proto), so they work from wherever the client reached the server."""
    handle = fal_client.submit(APP, small(seed=91))
    handle.get()
    other = handle.response_url.replace("127.0.0.1", "localhost")
    assert other != handle.response_url
    url = httpx.get(other).json()["images"][0]["url"]
    assert url.startswith(BASE.replace("127.0.0.1", "localhost") + "/files/"), url
    assert httpx.get(url).status_code == 200
    proxied = httpx.get(handle.response_url, headers={"x-forwarded-host": "images.example.com", "x-forwarded-proto": "https"})
    assert proxied.json()["images"][0]["url"].startswith("https://images.example.com/files/"), proxied.text


def upload():
    url = fal_client.upload(b"hello from the python client", "text/plain", file_name="hello.txt")
    response = fetch(url)
    assert response.content == b"hello from the python client"
    assert response.headers["content-type"] == "text/plain"
    assert url.endswith("/hello.txt"), url
    # Uploads are served as downloads, never sniffed: an uploaded page cannot run on this origin.
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-disposition"] == "attachment"
    page = fetch(fal_client.upload(b"<script>alert(1)</script>", "text/html", file_name="x.html"))
    assert page.headers["content-disposition"] == "attachment" and page.headers["x-content-type-options"] == "nosniff"
    svg = fetch(fal_client.upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", file_name="x.svg"))
    assert svg.headers["content-disposition"] == "attachment"
    png = fetch(fal_client.upload(b"\x89PNG\r\n\x1a\n", "image/png", file_name="x.png"))
    assert png.headers["content-disposition"] == "inline"

    # The fallback repository: initiate (storage_type=gcs) + PUT, the JS flow.
    url = fal_client.upload(b"via the fal repository", "text/plain", repository="fal")
    assert fetch(url).content == b"via the fal repository"

    # The multipart flow (used above 100 MB): lower the threshold instead of sending 100 MB.
    data = bytes(range(256)) * 40000  # 10.24 MB: two parts
    threshold = fc.MULTIPART_THRESHOLD
    fc.MULTIPART_THRESHOLD = 1024
    try:
        url = fal_client.upload(data, "application/octet-stream", file_name="big.bin")
    finally:
        fc.MULTIPART_THRESHOLD = threshold
    back = fetch(url).content
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest(), (len(back), len(data))


def webhook():
    hook = WebhookReceiver()
    try:
        handle = fal_client.submit(APP, small(seed=31), webhook_url=hook.url)
        payload = hook.next()
        assert payload["request_id"] == handle.request_id and payload["status"] == "OK", payload
        assert payload["payload"]["seed"] == 31
        check_image(payload["payload"]["images"][0], 32, 24)
    finally:
        hook.close()


def async_client():
    async def go():
        client = fal_client.AsyncClient()
        handle = await client.submit(APP, small(seed=51))
        events = [event async for event in handle.iter_events(with_logs=True, interval=0.02)]
        assert isinstance(events[-1], fal_client.Completed)
        result = await handle.get()
        assert result["seed"] == 51
        url = await client.upload(b"async bytes", "application/octet-stream")
        assert fetch(url).content == b"async bytes"

    asyncio.run(go())


def auth():
    """Against a server started with --api-key: the right key works, others get 401."""
    good = fal_client.SyncClient(key=os.environ["FAL_KEY"])
    assert good.run(APP, small(seed=61, sync_mode=True))["seed"] == 61
    url = good.upload(b"authorised upload", "text/plain")
    assert fetch(url).content == b"authorised upload"
    bad = fal_client.SyncClient(key="wrong-key")
    error = expect_http_error(lambda: bad.submit(APP, small()), 401)
    assert "invalid API key" in str(error.message)
    assert httpx.post(f"{BASE}/{APP}", json=small()).status_code == 401, "no key, no request"
    assert httpx.get(f"{BASE}/health").status_code == 200


def limits():
    """Bad HTTP use gets a clear error naming the limit or the route, never a hang or a 500."""
    too_big = httpx.post(f"{BASE}/{APP}", content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and "--max-request-bytes" in too_big.json()["detail"], too_big.text
    other_app = httpx.post(f"{BASE}/fal-ai/flux/dev", json=small())
    assert other_app.status_code == 404 and "fal-ai/flux" in other_app.json()["detail"], other_app.text
    wrong_method = httpx.delete(f"{BASE}/{APP}")
    assert wrong_method.status_code == 405, wrong_method.text
    not_json = httpx.post(f"{BASE}/run/{APP}", content=b"prompt=cat")
    assert not_json.status_code == 415 and "application/json" in not_json.json()["detail"], not_json.text
    broken = httpx.post(f"{BASE}/run/{APP}", content=b"{prompt", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "malformed JSON" in broken.json()["detail"][0]["msg"], broken.text
    bad_hook = httpx.post(f"{BASE}/{APP}", params={"fal_webhook": "ftp://x"}, json=small())
    assert bad_hook.status_code == 422 and bad_hook.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    missing = httpx.get(f"{BASE}/files/nope/nothing.png")
    assert missing.status_code == 404


def webhook_policy():
    """A server without --allow-private-webhooks: private targets and credentials in the URL are
    refused at submit (422 naming fal_webhook); a name that resolves to loopback is accepted, but
    nothing is ever POSTed to it."""
    hook = WebhookReceiver()
    port = hook.server.server_address[1]
    for target, words in [
        (f"http://127.0.0.1:{port}/hook", "not a public address"),
        ("http://169.254.169.254/latest/meta-data", "not a public address"),
        (f"http://[::1]:{port}/hook", "not a public address"),
        ("https://user:secret@hooks.example.com/", "credentials"),
    ]:
        refused = httpx.post(f"{BASE}/{APP}", params={"fal_webhook": target}, json=small())
        assert refused.status_code == 422, (target, refused.text)
        assert refused.json()["detail"][0]["loc"] == ["query", "fal_webhook"] and words in refused.text, refused.text
    handle = fal_client.submit(APP, small(), webhook_url=f"http://localhost:{port}/hook")
    assert handle.get()["seed"] == 7
    time.sleep(2.0)
    assert hook.received.empty(), "the server POSTed to a loopback address"
    hook.close()


def slow_webhook():
    """On a server started with --webhook-timeout 1s: a receiver that answers after 3 s gets the
    webhook once (a timed-out POST is not repeated), and holds up no other receiver."""
    slow_calls = queue.Queue()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            slow_calls.put(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            time.sleep(3)
            try:
                self.send_response(200)
                self.end_headers()
            except OSError:
                pass

        def log_message(self, *args):
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    fast = WebhookReceiver()
    try:
        first = fal_client.submit(APP, small(seed=1), webhook_url=f"http://127.0.0.1:{slow.server_address[1]}/hook")
        assert slow_calls.get(timeout=20)["request_id"] == first.request_id
        second = fal_client.submit(APP, small(seed=2), webhook_url=fast.url)
        submitted = time.monotonic()
        assert fast.next(timeout=20)["request_id"] == second.request_id
        # The fast receiver is not queued behind the slow one's 3 s.
        assert time.monotonic() - submitted < 2.5, time.monotonic() - submitted
        time.sleep(5)  # past the slow receiver's answer and any retry backoff
        assert slow_calls.empty(), "the slow receiver got the webhook twice"
    finally:
        slow.shutdown()
        fast.close()


def request_timeout():
    """x-fal-request-timeout while queued: the request fails with 504 on time (not when the worker
    reaches it), its webhook fires, and its queue slot is free at once."""
    hook = WebhookReceiver()
    # Keep every worker busy (PIXART_WORKERS: how many share the queue) so the request waits.
    busy_all = [fal_client.submit(APP, small(num_inference_steps=200, image_size={"width": 512, "height": 512}, num_images=8))
                for _ in range(int(os.environ.get("PIXART_WORKERS", "1")))]
    busy = busy_all[0]
    try:
        for handle in busy_all:
            wait_for(handle, fal_client.InProgress)
        submitted = time.monotonic()
        late = httpx.post(f"{BASE}/{APP}", params={"fal_webhook": hook.url}, json=small(seed=3),
                          headers={"x-fal-request-timeout": "1"})
        assert late.status_code == 200, late.text
        late_id = late.json()["request_id"]
        payload = hook.next(timeout=10)
        waited = time.monotonic() - submitted
        assert payload["request_id"] == late_id and payload["status"] == "ERROR", payload
        assert 0.9 <= waited < 3.0, f"timed out after {waited:.2f} s"
        assert isinstance(busy.status(), fal_client.InProgress), "the long request is still running"
        health = httpx.get(f"{BASE}/health").json()
        assert health["queue_length"] == 0, health
        result = httpx.get(f"{BASE}/{APP}/requests/{late_id}")
        assert result.status_code == 504 and result.headers.get("x-fal-request-timeout-type") == "user", result.text
    finally:
        for handle in busy_all:
            handle.cancel()
        # Wait until they have stopped: a step still running would land in the next scenario's
        # metrics.
        for handle in busy_all:
            wait_for(handle, fal_client.Completed)
        hook.close()


def metrics():
    """GET /metrics in Prometheus' text format: the queue, the counters and latency histograms,
    consistent with /health and growing with each request."""
    def scrape():
        response = httpx.get(f"{BASE}/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
        values = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values
    before = scrape()
    fal_client.run(APP, small(num_inference_steps=3))
    after = scrape()
    key = 'pixart_requests_total{outcome="succeeded"}'
    assert after[key] == before[key] + 1, (before[key], after[key])
    assert after["pixart_step_duration_seconds_count"] == before["pixart_step_duration_seconds_count"] + 3
    assert after["pixart_request_duration_seconds_count"] >= before["pixart_request_duration_seconds_count"] + 1
    assert after['pixart_step_duration_seconds_bucket{le="+Inf"}'] == after["pixart_step_duration_seconds_count"]
    health = httpx.get(f"{BASE}/health").json()
    assert after["pixart_queue_length"] == health["queue_length"] == 0
    assert after['pixart_requests_total{outcome="accepted"}'] == health["requests"]["accepted"]


def cross_origin():
    """Without --cors-origin, no CORS headers: a page on another origin cannot read responses, and
    a preflight-free `text/plain` POST (what such a page can still send) is refused."""
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(f"{BASE}/{APP}", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers, preflight.headers
    health = httpx.get(f"{BASE}/health", headers=origin)
    assert "access-control-allow-origin" not in health.headers, health.headers
    simple = httpx.post(f"{BASE}/{APP}", content=json.dumps(small()).encode(), headers={**origin, "content-type": "text/plain"})
    assert simple.status_code == 415, simple.text


def retention():
    """Against a server started with --result-retention 1s: results are kept, then forgotten."""
    handle = fal_client.submit(APP, small(seed=71))
    result = handle.get()
    fetch(result["images"][0]["url"])
    time.sleep(2.5)
    expect_http_error(handle.status, 404)
    assert httpx.get(result["images"][0]["url"]).status_code == 404


def shutdown():
    """SIGTERM with requests running and queued (PIXART_PID, EXPECT_RUNNING=finish|stop):
    queued requests fail with ServerShutdown, the running one finishes within the grace period
    or is stopped, and every webhook is delivered before the server exits."""
    import signal

    expect = os.environ["EXPECT_RUNNING"]
    hook = WebhookReceiver()
    steps = 30 if expect == "finish" else 200
    running = fal_client.submit(APP, small(num_inference_steps=steps, seed=81), webhook_url=hook.url)
    wait_for(running, fal_client.InProgress)
    queued = [fal_client.submit(APP, small(seed=82 + i), webhook_url=hook.url) for i in range(2)]
    os.kill(int(os.environ["PIXART_PID"]), signal.SIGTERM)
    payloads = {}
    for _ in range(3):
        payload = hook.next()
        payloads[payload["request_id"]] = payload
    for handle in queued:
        payload = payloads[handle.request_id]
        assert payload["status"] == "ERROR" and "before this request started" in payload["error"], payload
        assert payload["payload"]["error_type"] == "ServerShutdown", payload
    payload = payloads[running.request_id]
    if expect == "finish":
        assert payload["status"] == "OK" and payload["payload"]["seed"] == 81, payload
    else:
        assert payload["status"] == "ERROR" and "while this request was running" in payload["error"], payload
    hook.close()


def png_is_black(data):
    """Whether every pixel of an 8-bit PNG is 0 (decoded with zlib: no imaging library here)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width = struct.unpack(">I", body[:4])[0]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * 3
    # Each scanline: a filter byte, then the (filtered) bytes; all-zero pixels filter to zeros.
    return all(not any(raw[i + 1:i + stride]) for i in range(0, len(raw), stride))


def safety_flagged():
    """A server whose checker flags everything: black images of the requested size, flagged."""
    result = fal_client.run(APP, small())
    assert result["has_nsfw_concepts"] == [True], result
    check_image(result["images"][0], 32, 24)
    assert png_is_black(fetch(result["images"][0]["url"]).content)
    result = fal_client.run(APP, small(enable_safety_checker=False))
    assert result["has_nsfw_concepts"] == [False], result
    assert not png_is_black(fetch(result["images"][0]["url"]).content)


def safety_off():
    """A server started with --no-safety-checker: unchecked by default, and asking is refused."""
    result = fal_client.run(APP, small())
    assert result["has_nsfw_concepts"] == [False], result
    error = expect_http_error(lambda: fal_client.run(APP, small(enable_safety_checker=True)), 422)
    assert error.message[0]["loc"] == ["body", "enable_safety_checker"], error.message
    assert "no safety checker" in error.message[0]["msg"], error.message


def memory():
    """Against a server started with --max-upload-bytes 200 MB (PIXART_PID): invalid requests and
    upload parts are not held in memory. Before the queue core was rewritten, 50 invalid 1 MB
    requests grew the server by 106 MB and five 20 MB parts by 156 MB; the bounds here leave room
    for the allocator keeping a few freed body buffers."""
    pid = os.environ["PIXART_PID"]

    def rss_mb():
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS"))

    client = httpx.Client(timeout=60)
    for _ in range(5):  # warm up: connections, first allocations
        client.post(f"{BASE}/{APP}", json={"prompt": "x", "num_inference_steps": 0})
    before = rss_mb()
    big = "a" * ((1 << 20) - 100)
    for _ in range(50):
        accepted = client.post(f"{BASE}/{APP}", json={"prompt": big, "num_inference_steps": 0})
        assert accepted.status_code == 200, accepted.text
    status = client.get(accepted.json()["status_url"]).json()
    assert status["error_type"] == "ValidationError" and len(status["error"]) < 1000, status
    grown = rss_mb() - before
    print(f"memory: 50 invalid 1 MB requests: +{grown} MB RSS")
    assert grown < 30, f"50 invalid 1 MB requests grew the server by {grown} MB"
    before = rss_mb()
    upload = client.post(f"{BASE}/rest/storage/upload/initiate-multipart",
                         json={"content_type": "application/octet-stream", "file_name": "big.bin"}).json()
    part = os.urandom(20 << 20)
    for n in range(1, 6):
        sent = client.put(f"{upload['upload_url']}/{n}", content=part)
        assert sent.status_code == 200, sent.text
    grown = rss_mb() - before
    print(f"memory: five 20 MB upload parts: +{grown} MB RSS")
    assert grown < 20, f"five 20 MB upload parts grew the server by {grown} MB"
    etags = [{"partNumber": n, "etag": client.put(f"{upload['upload_url']}/{n}", content=part).json()["etag"]} for n in range(1, 6)]
    done = client.post(f"{upload['upload_url']}/complete", json={"parts": etags})
    assert done.status_code == 200, done.text
    fetched = client.get(done.json()["file_url"])
    assert len(fetched.content) == 100 << 20 and fetched.content[:1 << 20] == part[:1 << 20]
    grown = rss_mb() - before
    print(f"memory: parts, completing and serving the 100 MB upload: +{grown} MB RSS")
    assert grown < 20, f"completing and serving a 100 MB upload grew the server by {grown} MB"


def loras():
    """Against a server started with --lora-dir (LORA_DIR: tests/fixtures/lora) and without
    --allow-private-webhooks: a LoRA by the URL of an uploaded file (read from the storage folder,
    no network) and the same LoRA by a path in the LoRA folder give the same image, not the base
    one; two requests with different LoRAs back to back each get their own image; a path outside
    the folder, a loopback URL, a bad file and a LoRA for layers the model lacks are refused with
    422 naming loras[i].path, before anything runs."""
    folder = os.environ["LORA_DIR"]
    request = {"prompt": "a red fox in the snow", "image_size": {"width": 64, "height": 64},
               "num_inference_steps": 4, "seed": 7}

    def png(result):
        return fetch(result["images"][0]["url"]).content

    def image(loras):
        return png(fal_client.run(APP, {**request, "loras": loras}))

    base = image([])
    with open(os.path.join(folder, "a_simpletuner.safetensors"), "rb") as f:
        url = fal_client.upload(f.read(), "application/octet-stream", file_name="a.safetensors")
    by_url, by_path = image([{"path": url}]), image([{"path": "a_peft"}])
    assert by_url == by_path and by_url != base, "the same LoRA by URL and by path, not the base image"
    # Queued back to back with different LoRAs: each gets its own image.
    first = fal_client.submit(APP, {**request, "loras": [{"path": "a_kohya.safetensors"}]})
    second = fal_client.submit(APP, {**request, "loras": [{"path": "b_peft", "scale": -0.3}]})
    assert png(first.get()) == by_path
    alone = image([{"path": "b_peft", "scale": -0.3}])
    assert png(second.get()) == alone != by_path
    assert image([]) == base, "the model is left as it was"
    junk = fal_client.upload(b"not a safetensors file", "application/octet-stream", file_name="junk.safetensors")
    for path, says in [("/etc/hostname", "outside the LoRA folder"), ("../single-file", "outside the LoRA folder"),
                       ("nothing-here.safetensors", "no such LoRA"),
                       ("http://127.0.0.1:9/a.safetensors", "loopback"), (junk, "safetensors"),
                       ("unknown_module.safetensors", "transformer_blocks.7"), ("lokr.safetensors", "LoKr")]:
        loras = [{"path": "a_peft"}, {"path": path}]
        error = expect_http_error(lambda: fal_client.run(APP, {**request, "loras": loras}), 422)
        detail = error.message[0]
        assert detail["loc"] == ["body", "loras", 1, "path"] and says in detail["msg"], (path, error.message)


def lora_url():
    """Against a server started with --allow-private-webhooks and --max-lora-bytes 50000: a LoRA
    fetched by URL (from a loopback file server) gives the image of the same file uploaded, and
    is fetched once (the next request is served from the cache after the file server stopped); a
    file over the limit is refused naming loras[0].path."""
    folder = os.environ["LORA_DIR"]
    fetched = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            fetched.append(self.path)

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    request = {"prompt": "a red fox in the snow", "image_size": {"width": 64, "height": 64},
               "num_inference_steps": 4, "seed": 7}
    with open(os.path.join(folder, "a_simpletuner.safetensors"), "rb") as f:
        uploaded = fal_client.upload(f.read(), "application/octet-stream", file_name="a.safetensors")

    def image(path):
        result = fal_client.run(APP, {**request, "loras": [{"path": path}]})
        return fetch(result["images"][0]["url"]).content

    by_url = image(f"{origin}/a_simpletuner.safetensors")
    assert by_url == image(uploaded)
    error = expect_http_error(lambda: fal_client.run(APP, {**request, "loras": [{"path": f"{origin}/a_kohya.safetensors"}]}), 422)
    assert error.message[0]["loc"] == ["body", "loras", 0, "path"] and "limit" in error.message[0]["msg"], error.message
    files.shutdown()
    files.server_close()
    assert image(f"{origin}/a_simpletuner.safetensors") == by_url, "served from the cache"
    assert len([p for p in fetched if "a_simpletuner" in p]) == 1, fetched


IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures", "images")


def images():
    """Image input through the client's own upload: fal_client.upload_file → image_url runs
    image-to-image at the input picture's size, the same picture as a data URI gives the same
    image bytes, a mask makes it inpainting, PAG changes the picture, JPEG output comes as JPEG
    (file and data URI); a URL with credentials or another scheme, a local path, a file that is no
    picture, a mask without a picture, a strength that leaves no step and a PAG layer the model
    lacks are refused with 422 naming the field, before anything runs."""
    request = {"prompt": "a hot air balloon", "num_inference_steps": 10, "seed": 3, "strength": 0.75}
    photo = os.path.join(IMAGES, "photo.png")
    url = fal_client.upload_file(photo)

    def run(**extra):
        result = fal_client.run(APP, {**request, **extra})
        return result, fetch(result["images"][0]["url"]).content

    result, by_upload = run(image_url=url)
    check_image(result["images"][0], 160, 96)
    _, by_data_uri = run(image_url=fal_client.encode_file(photo))
    assert by_data_uri == by_upload, "the same picture by upload and by data URI"
    _, resized = run(image_url=url, image_size={"width": 64, "height": 48})
    assert resized != by_upload
    mask = fal_client.upload_file(os.path.join(IMAGES, "mask_center.png"))
    inpainted, inpainted_png = run(image_url=url, mask_url=mask)
    check_image(inpainted["images"][0], 160, 96)
    assert inpainted_png != by_upload
    _, text = run()
    _, guided = run(pag_scale=2.0)
    assert guided != text, "perturbed-attention guidance changes the picture"
    jpeg, jpeg_bytes = run(image_url=url, output_format="jpeg")
    image = jpeg["images"][0]
    assert image["content_type"] == "image/jpeg" and image["file_name"].endswith(".jpg"), image
    assert jpeg_bytes[:3] == b"\xff\xd8\xff" and len(jpeg_bytes) == image["file_size"]
    assert fetch(image["url"]).headers["content-type"] == "image/jpeg"
    inline = fal_client.run(APP, {**request, "image_url": url, "output_format": "jpeg", "sync_mode": True})
    assert inline["images"][0]["url"].startswith("data:image/jpeg;base64,")
    junk = fal_client.upload(b"not a picture", "image/png", file_name="junk.png")
    refusals = [
        ({"image_url": "http://user:secret@example.com/a.png"}, ["body", "image_url"], "credentials"),
        ({"image_url": "ftp://example.com/a.png"}, ["body", "image_url"], "http(s)"),
        ({"image_url": "/etc/hostname"}, ["body", "image_url"], "local paths are not accepted"),
        ({"image_url": junk}, ["body", "image_url"], "not a PNG, JPEG or WebP"),
        ({"image_url": url, "mask_url": junk}, ["body", "mask_url"], "not a PNG, JPEG or WebP"),
        ({"mask_url": mask}, ["body", "mask_url"], "needs image_url"),
        ({"image_url": url, "strength": 0.05}, ["body", "strength"], "leaves no step"),
        ({"pag_scale": 1.0, "pag_applied_layers": ["blocks.1", "mid"]}, ["body", "pag_applied_layers", 1], "matches no"),
    ]
    for extra, loc, says in refusals:
        error = expect_http_error(lambda: fal_client.run(APP, {**request, **extra}), 422)
        assert error.message[0]["loc"] == loc and says in error.message[0]["msg"], (extra, error.message)


def image_policy():
    """Against a server without --allow-private-webhooks: pictures at loopback and private
    addresses are refused naming image_url (the server never calls its own network for a
    client)."""
    request = {"prompt": "x", "num_inference_steps": 2, "seed": 1}
    for url in ["http://127.0.0.1:9/a.png", "http://10.0.0.1/a.png", "http://[::1]/a.png"]:
        error = expect_http_error(lambda: fal_client.run(APP, {**request, "image_url": url}), 422)
        assert error.message[0]["loc"] == ["body", "image_url"], error.message
        assert "not a public address" in error.message[0]["msg"], error.message


def image_url_fetch():
    """Against a server started with --allow-private-webhooks and --max-image-bytes 7000: a picture
    fetched by URL from a loopback file server gives the image of the same file uploaded; a file
    over the limit is refused naming image_url."""
    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=IMAGES, **kwargs)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{files.server_address[1]}"
    request = {"prompt": "a hot air balloon", "num_inference_steps": 4, "seed": 3}
    try:
        uploaded = fal_client.upload_file(os.path.join(IMAGES, "photo.png"))
        by_url = fal_client.run(APP, {**request, "image_url": f"{origin}/photo.png"})
        by_upload = fal_client.run(APP, {**request, "image_url": uploaded})
        assert fetch(by_url["images"][0]["url"]).content == fetch(by_upload["images"][0]["url"]).content
        large = {**request, "image_url": f"{origin}/square.png"}  # 7567 bytes
        error = expect_http_error(lambda: fal_client.run(APP, large), 422)
        assert error.message[0]["loc"] == ["body", "image_url"] and "limit" in error.message[0]["msg"], error.message
    finally:
        files.shutdown()
        files.server_close()


SCENARIOS = {
    f.__name__: f
    for f in (subscribe_logs, queue_flow, invalid_input, run, run_disconnect, host_urls, upload, images, webhook, async_client, limits, cross_origin, request_timeout, metrics, auth, retention, shutdown, safety_flagged, safety_off, webhook_policy, slow_webhook, memory, loras, lora_url, image_policy, image_url_fetch)
}
# The last twelve need a server started for them (see crates/pixart-cli/tests/serve.rs).
DEFAULT = list(SCENARIOS)[:-12]

if __name__ == "__main__":
    for name in sys.argv[2:] or DEFAULT:
        started = time.monotonic()
        SCENARIOS[name]()
        print(f"ok {name} ({(time.monotonic() - started) * 1e3:.0f} ms)", flush=True)
