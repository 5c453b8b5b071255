// Drives the official @fal-ai/client, unmodified, against a running `pixart serve`.
//
//   node scenarios.mjs http://127.0.0.1:PORT [scenario ...]
//
// The client is pointed at the server the two ways fal documents: a `requestMiddleware` that
// rewrites fal's hosts, and `proxyUrl {when: "always"}` (every call carries x-fal-target-url).
// Each scenario prints `ok <name>` or throws; the process exits non-zero on the first failure.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

const base = process.argv[2];
assert.ok(base?.startsWith("http://"), "usage: node scenarios.mjs http://HOST:PORT [scenario ...]");
const APP = "fal-ai/pixart-sigma";
const KEY = process.env.FAL_KEY ?? "local-test-key";
// How many workers share the queue (scenarios that need a request to wait keep them all busy).
const WORKERS = Number(process.env.PIXART_WORKERS ?? "1");

const rewrite = (url) =>
  url
    .replace("https://queue.fal.run/", `${base}/`)
    .replace("https://fal.run/", `${base}/run/`)
    .replace("https://rest.fal.ai/", `${base}/rest/`);
const fal = createFalClient({
  credentials: KEY,
  requestMiddleware: async (request) => ({ ...request, url: rewrite(request.url) }),
});
const proxied = createFalClient({
  credentials: KEY,
  proxyUrl: { url: `${base}/api/fal/proxy`, when: "always" },
});

const small = (extra = {}) => ({
  prompt: "a red cat",
  image_size: { width: 32, height: 24 },
  num_inference_steps: 3,
  seed: 7,
  ...extra,
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const sha = (bytes) => createHash("sha256").update(Buffer.from(bytes)).digest("hex");

async function fetchBytes(url) {
  assert.ok(url.startsWith(`${base}/files/`), `file URL on the server's host: ${url}`);
  const response = await fetch(url);
  assert.equal(response.status, 200, `GET ${url}`);
  return { type: response.headers.get("content-type"), bytes: new Uint8Array(await response.arrayBuffer()) };
}

async function checkImage(image, width, height) {
  assert.equal(image.width, width);
  assert.equal(image.height, height);
  assert.equal(image.content_type, "image/png");
  const { type, bytes } = await fetchBytes(image.url);
  assert.equal(type, "image/png");
  assert.equal(bytes.length, image.file_size);
  assert.deepEqual([...bytes.slice(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "PNG signature");
}

async function waitFor(client, requestId, wanted, timeoutMs = 60000) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const status = await client.queue.status(APP, { requestId, logs: true });
    if (wanted.includes(status.status)) return status;
    assert.ok(Date.now() < until, `${requestId} never reached ${wanted}: ${JSON.stringify(status)}`);
    await sleep(20);
  }
}

// A webhook receiver on loopback; `next()` resolves with the next POSTed JSON body.
async function webhookReceiver() {
  const received = [];
  const waiters = [];
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      res.end("ok");
      const payload = JSON.parse(body);
      const waiter = waiters.shift();
      if (waiter) waiter(payload);
      else received.push(payload);
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}/hook?token=a%20b`,
    next: (timeoutMs = 60000) =>
      received.length
        ? Promise.resolve(received.shift())
        : new Promise((resolve, reject) => {
            waiters.push(resolve);
            setTimeout(() => reject(new Error("no webhook within the timeout")), timeoutMs);
          }),
    close: () => server.close(),
  };
}

const scenarios = {
  // subscribe with logs: queue updates carry real progress lines; the result's image is served.
  async subscribe_logs() {
    const updates = [];
    let enqueued;
    const result = await fal.subscribe(APP, {
      input: small(),
      logs: true,
      pollInterval: 50,
      onEnqueue: (id) => (enqueued = id),
      onQueueUpdate: (u) => updates.push(u),
    });
    assert.equal(result.requestId, enqueued, "x-fal-request-id is the enqueued id");
    assert.equal(result.data.seed, 7);
    assert.equal(result.data.prompt, "a red cat");
    assert.equal(result.data.images.length, 1);
    await checkImage(result.data.images[0], 32, 24);
    assert.ok(result.data.timings.inference > 0);
    const last = updates.at(-1);
    assert.equal(last.status, "COMPLETED");
    const messages = last.logs.map((l) => l.message);
    for (const step of ["Step 1/3", "Step 2/3", "Step 3/3"]) {
      assert.ok(messages.some((m) => m.startsWith(step)), `logs have "${step}": ${messages}`);
    }
    assert.ok(last.logs.every((l) => l.level && l.timestamp && l.source === "USER"));
    assert.ok(last.metrics.inference_time > 0);
  },

  // submit / status / result / cancel, with exact queue positions.
  // Every worker (PIXART_WORKERS: how many share the queue) is kept busy first, or an idle one
  // would take the next submit before its position is read.
  async queue_flow() {
    const busy = [];
    for (let i = 0; i < WORKERS; i++) {
      busy.push(await fal.queue.submit(APP, { input: small({ num_inference_steps: 200, seed: 1 + 100 * i }) }));
    }
    for (const handle of busy) await waitFor(fal, handle.request_id, ["IN_PROGRESS"]);
    const second = await fal.queue.submit(APP, { input: small({ seed: 2 }) });
    const third = await fal.queue.submit(APP, { input: small({ seed: 3 }) });
    assert.equal(second.queue_position, 0, "the running request is not in the queue");
    assert.equal(third.queue_position, 1);
    const queued = await fal.queue.status(APP, { requestId: third.request_id, logs: false });
    assert.equal(queued.status, "IN_QUEUE");
    assert.equal(queued.queue_position, 1);

    // Cancelling a queued request removes it: the one behind moves up.
    await fal.queue.cancel(APP, { requestId: second.request_id });
    const moved = await fal.queue.status(APP, { requestId: third.request_id, logs: false });
    assert.equal(moved.queue_position, 0);
    const cancelled = await fal.queue.status(APP, { requestId: second.request_id, logs: false });
    assert.equal(cancelled.status, "COMPLETED");
    await assert.rejects(fal.queue.result(APP, { requestId: second.request_id }), (e) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.status, 400);
      assert.match(JSON.stringify(e.body), /cancelled/);
      return true;
    });

    // Cancelling a running request stops it at its next step.
    for (const handle of busy) await fal.queue.cancel(APP, { requestId: handle.request_id });
    for (const handle of busy) {
      const stopped = await waitFor(fal, handle.request_id, ["COMPLETED"]);
      const steps = stopped.logs.filter((l) => l.message.startsWith("Step ")).length;
      assert.ok(steps >= 1 && steps < 200, `stopped after ${steps} of 200 steps`);
      assert.ok(stopped.logs.some((l) => /cancelled/.test(l.message)));
    }

    const done = await waitFor(fal, third.request_id, ["COMPLETED"]);
    assert.equal(done.status, "COMPLETED");
    const result = await fal.queue.result(APP, { requestId: third.request_id });
    assert.equal(result.data.seed, 3);
    assert.equal(result.requestId, third.request_id);

    await assert.rejects(fal.queue.cancel(APP, { requestId: third.request_id }), (e) => {
      assert.equal(e.status, 400, "ALREADY_COMPLETED");
      assert.equal(e.body.status, "ALREADY_COMPLETED");
      return true;
    });
    await assert.rejects(fal.queue.cancel(APP, { requestId: "00000000-0000-0000-0000-000000000000" }), (e) => {
      assert.equal(e.status, 404);
      return true;
    });
  },

  // mode "streaming": one SSE status stream, closed after COMPLETED; logs arrive once each.
  async streaming() {
    const updates = [];
    const result = await fal.subscribe(APP, {
      input: small({ num_inference_steps: 4, seed: 11 }),
      mode: "streaming",
      logs: true,
      onQueueUpdate: (u) => updates.push(u),
    });
    assert.equal(result.data.seed, 11);
    const last = updates.at(-1);
    assert.equal(last.status, "COMPLETED");
    const steps = last.logs.map((l) => l.message).filter((m) => m.startsWith("Step "));
    assert.deepEqual(
      steps.map((m) => m.split(" ")[1]),
      ["1/4", "2/4", "3/4", "4/4"],
      "every step logged exactly once across the stream's events",
    );

    const { request_id } = await fal.queue.submit(APP, { input: small({ seed: 12 }) });
    const stream = await fal.queue.streamStatus(APP, { requestId: request_id, logs: true });
    const seen = [];
    stream.on("data", (s) => seen.push(s.status));
    const final = await stream.done();
    assert.equal(final.status, "COMPLETED");
    assert.ok(seen.includes("COMPLETED"));
  },

  // Invalid input: 422 with fal's detail list, surfaced as the client's ValidationError.
  async invalid_input() {
    await assert.rejects(
      fal.subscribe(APP, { input: { prompt: 5, num_inference_steps: 0, colour: "red" }, pollInterval: 50 }),
      (e) => {
        assert.ok(e instanceof ValidationError, `ValidationError, got ${e}`);
        assert.equal(e.status, 422);
        assert.equal(e.getFieldErrors("prompt").length, 1);
        assert.match(e.getFieldErrors("num_inference_steps")[0].msg, /1 to 200/);
        assert.equal(e.getFieldErrors("colour")[0].type, "value_error.extra");
        return true;
      },
    );
    await assert.rejects(fal.run(APP, { input: { image_size: "huge" } }), (e) => {
      assert.ok(e instanceof ValidationError);
      const fields = e.fieldErrors.map((f) => f.loc.at(-1));
      assert.ok(fields.includes("prompt") && fields.includes("image_size"), fields.join());
      return true;
    });
  },

  // Synchronous run under /run/, both with stored files and with sync_mode data URIs.
  async run() {
    const result = await fal.run(APP, { input: small({ seed: 21 }) });
    assert.equal(result.data.seed, 21);
    assert.ok(result.requestId);
    await checkImage(result.data.images[0], 32, 24);
    const inline = await fal.run(APP, { input: small({ seed: 21, sync_mode: true }) });
    const uri = inline.data.images[0].url;
    assert.ok(uri.startsWith("data:image/png;base64,"));
    const { bytes } = await fetchBytes(result.data.images[0].url);
    assert.equal(Buffer.from(uri.split(",")[1], "base64").compare(Buffer.from(bytes)), 0, "same seed, same PNG");
  },

  // storage.upload: the initiate + PUT flow, and the multipart flow for files over 90 MB.
  async upload() {
    const text = new TextEncoder().encode("hello from the js client");
    const url = await fal.storage.upload(new Blob([text], { type: "text/plain" }));
    const got = await fetchBytes(url);
    assert.equal(got.type, "text/plain");
    assert.equal(Buffer.from(got.bytes).toString(), "hello from the js client");

    const named = await fal.storage.upload(new File([text], "notes v2.txt", { type: "text/plain" }));
    assert.ok(named.endsWith("/notes_v2.txt"), named);

    const big = new Uint8Array(91 * 1024 * 1024);
    for (let i = 0; i < big.length; i += 4096) big[i] = (i / 4096) & 0xff;
    const bigUrl = await fal.storage.upload(new Blob([big], { type: "application/octet-stream" }));
    const back = await fetchBytes(bigUrl);
    assert.equal(back.bytes.length, big.length);
    assert.equal(sha(back.bytes), sha(big), "multipart upload reassembled in order");
  },

  // fal.storage.upload → image_url: image-to-image from an uploaded picture (the output takes
  // its size), and JPEG output.
  async image_input() {
    const photo = readFileSync(new URL("../../fixtures/images/photo.png", import.meta.url));
    const url = await fal.storage.upload(new File([photo], "photo.png", { type: "image/png" }));
    const input = { prompt: "a hot air balloon", image_url: url, strength: 0.75, num_inference_steps: 8, seed: 3 };
    const result = await fal.run(APP, { input });
    await checkImage(result.data.images[0], 160, 96);
    const jpeg = await fal.run(APP, { input: { ...input, output_format: "jpeg" } });
    const image = jpeg.data.images[0];
    assert.equal(image.content_type, "image/jpeg");
    const { type, bytes } = await fetchBytes(image.url);
    assert.equal(type, "image/jpeg");
    assert.deepEqual([...bytes.slice(0, 3)], [0xff, 0xd8, 0xff], "JPEG signature");
    const refused = await fal.run(APP, { input: { ...input, image_url: "http://user:secret@example.com/x.png" } }).catch((e) => e);
    assert.ok(refused instanceof ValidationError, String(refused));
    assert.match(refused.getFieldErrors("image_url")[0].msg, /credentials/);
  },

  // fal_webhook: the server POSTs fal's webhook payload when the request ends (OK and ERROR).
  async webhook() {
    const hook = await webhookReceiver();
    try {
      const ok = await fal.queue.submit(APP, { input: small({ seed: 31 }), webhookUrl: hook.url });
      const payload = await hook.next();
      assert.equal(payload.request_id, ok.request_id);
      assert.equal(payload.status, "OK");
      assert.equal(payload.error, null);
      assert.equal(payload.payload.seed, 31);
      await checkImage(payload.payload.images[0], 32, 24);

      const bad = await fal.queue.submit(APP, { input: { prompt: "x", guidance_scale: 99 }, webhookUrl: hook.url });
      const error = await hook.next();
      assert.equal(error.request_id, bad.request_id);
      assert.equal(error.status, "ERROR");
      assert.ok(error.error);
      assert.equal(error.payload.detail[0].loc.at(-1), "guidance_scale");
    } finally {
      hook.close();
    }
  },

  // proxyUrl {when: "always"}: every call goes to one URL with x-fal-target-url.
  async proxy() {
    const updates = [];
    const result = await proxied.subscribe(APP, {
      input: small({ seed: 41 }),
      logs: true,
      pollInterval: 50,
      onQueueUpdate: (u) => updates.push(u.status),
    });
    assert.equal(result.data.seed, 41);
    assert.equal(updates.at(-1), "COMPLETED");
    const run = await proxied.run(APP, { input: small({ seed: 42, sync_mode: true }) });
    assert.equal(run.data.seed, 42);
    const url = await proxied.storage.upload(new Blob(["via proxy"], { type: "text/plain" }));
    assert.equal(Buffer.from((await fetchBytes(url)).bytes).toString(), "via proxy");
  },

  // Browsers: the preflight allows fal's headers, and responses expose x-fal-request-id.
  async cors() {
    const preflight = await fetch(`${base}/${APP}`, {
      method: "OPTIONS",
      headers: {
        Origin: "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-fal-queue-priority",
      },
    });
    assert.ok(preflight.status === 200 || preflight.status === 204, `preflight status ${preflight.status}`);
    assert.equal(preflight.headers.get("access-control-allow-origin"), "http://localhost:3000");
    const allowed = preflight.headers.get("access-control-allow-headers").toLowerCase();
    for (const h of ["authorization", "content-type", "x-fal-queue-priority"]) assert.ok(allowed.includes(h), allowed);
    const response = await fetch(`${base}/health`, { headers: { Origin: "http://localhost:3000" } });
    assert.match(response.headers.get("access-control-expose-headers"), /x-fal-request-id/);
  },
};

const wanted = process.argv.slice(3);
for (const name of wanted.length ? wanted : Object.keys(scenarios)) {
  const scenario = scenarios[name];
  assert.ok(scenario, `unknown scenario ${name}`);
  const started = Date.now();
  await scenario();
  console.log(`ok ${name} (${Date.now() - started} ms)`);
}
