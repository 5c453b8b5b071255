// The playground: a form built from the request's JSON Schema, submitted through fal's queue
// API, followed on the status stream. No framework, no inline script (the page's CSP forbids it),
// every text from a request or a response set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = "pixart-playground-history";
const KEY = "pixart-playground-key";
// Shown first, in this order; every other field of the schema goes under "More settings".
const PRIMARY = ["prompt", "negative_prompt", "image_size", "num_inference_steps", "guidance_scale", "seed",
  "num_images", "scheduler", "style"];
const fields = [];
let app = "";
let current = null;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function apiKey() {
  return localStorage.getItem(KEY) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = "Key " + apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("api-key").focus();
    throw new Error("this server needs an API key: enter it above");
  }
  return response;
}

// --- the form -------------------------------------------------------------------------------

function option(select, value, text) {
  const node = el("option");
  node.value = value;
  node.textContent = text;
  select.append(node);
}

// A field: its node, how to read it (undefined: leave it out) and how to set it.
function build(name, spec) {
  const id = "f-" + name;
  const types = [].concat(spec.type || []);
  const sizes = spec.anyOf && spec.anyOf.find((s) => s.enum);
  const custom = spec.anyOf && spec.anyOf.find((s) => s.properties);
  if (sizes && custom) return sizeField(id, sizes.enum, custom.properties);
  if (spec.enum) {
    const input = el("select");
    spec.enum.forEach((v) => option(input, v, v));
    if (spec.default !== undefined) input.value = spec.default;
    return { input, read: () => input.value, write: (v) => { input.value = v; } };
  }
  if (types.includes("boolean")) {
    const input = el("input");
    input.type = "checkbox";
    input.checked = spec.default === true;
    // Left out while it is the default: the server's own default applies (it may depend on the
    // server, as whether a safety checker is loaded does).
    const read = () => (input.checked === (spec.default === true) ? undefined : input.checked);
    const write = (v) => { input.checked = v === undefined ? spec.default === true : !!v; };
    return { input, check: true, read, write };
  }
  if (types.includes("integer") || types.includes("number")) {
    const input = el("input");
    // Seeds go up to 2^64: kept as text so no digit is lost to a JavaScript number.
    const exact = spec.maximum !== undefined && spec.maximum > Number.MAX_SAFE_INTEGER;
    input.type = exact ? "text" : "number";
    if (exact) input.inputMode = "numeric";
    else {
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      input.step = types.includes("integer") ? "1" : "any";
    }
    input.placeholder = spec.default !== undefined ? String(spec.default) : exact ? "random" : "";
    const read = () => {
      const text = input.value.trim();
      if (text === "") return undefined;
      return exact ? { raw: text } : Number(text);
    };
    return { input, read, write: (v) => { input.value = v === undefined || v === null ? "" : String(v.raw ?? v); } };
  }
  if (types.includes("string")) {
    const input = el(name_is_long(id) ? "textarea" : "input");
    if (input.tagName === "TEXTAREA") input.rows = 3;
    input.placeholder = spec.default || "";
    return { input, read: () => (input.value === "" ? undefined : input.value), write: (v) => { input.value = v ?? ""; } };
  }
  // Lists and objects (LoRAs, layers…): JSON.
  const input = el("textarea");
  input.rows = 2;
  input.placeholder = JSON.stringify(spec.default ?? null);
  const read = () => (input.value.trim() === "" ? undefined : JSON.parse(input.value));
  return { input, read, write: (v) => { input.value = v === undefined ? "" : JSON.stringify(v); } };
}

function name_is_long(id) {
  return id.endsWith("prompt");
}

function sizeField(id, presets, custom) {
  const input = el("select");
  option(input, "", "(default)");
  presets.forEach((v) => option(input, v, v));
  option(input, "custom", "custom…");
  const pair = el("span", "pair");
  pair.hidden = true;
  const [width, height] = ["width", "height"].map((side) => {
    const box = el("input");
    box.type = "number";
    box.min = custom[side].minimum;
    box.max = custom[side].maximum;
    box.value = 1024;
    box.setAttribute("aria-label", side);
    pair.append(box);
    return box;
  });
  input.addEventListener("change", () => { pair.hidden = input.value !== "custom"; });
  const read = () => {
    if (input.value === "") return undefined;
    if (input.value === "custom") return { width: Number(width.value), height: Number(height.value) };
    return input.value;
  };
  const write = (v) => {
    if (v && typeof v === "object") {
      input.value = "custom";
      width.value = v.width;
      height.value = v.height;
    } else input.value = v || "";
    pair.hidden = input.value !== "custom";
  };
  return { input, extra: pair, read, write };
}

function renderForm(schema) {
  const properties = schema.properties || {};
  const names = PRIMARY.filter((n) => n in properties).concat(Object.keys(properties).filter((n) => !PRIMARY.includes(n)));
  for (const name of names) {
    const spec = properties[name];
    const built = build(name, spec);
    const wrap = el("div", built.check ? "field check" : "field");
    wrap.dataset.name = name;
    const label = el("label");
    label.htmlFor = built.input.id = "f-" + name;
    built.input.name = name;
    label.textContent = name + ((schema.required || []).includes(name) ? " *" : "");
    const about = el("span", "about");
    about.textContent = spec.description || "";
    const error = el("span", "error nsfw");
    error.setAttribute("role", "alert");
    wrap.append(label, built.input);
    if (built.extra) wrap.append(built.extra);
    wrap.append(about, error);
    (PRIMARY.includes(name) ? $("fields") : $("more-fields")).append(wrap);
    fields.push(Object.assign(built, { name, error }));
  }
}

function collect() {
  const request = {};
  for (const f of fields) {
    f.error.textContent = "";
    let value;
    try {
      value = f.read();
    } catch (e) {
      f.error.textContent = "not valid JSON: " + e.message;
      throw new Error(f.name + ": not valid JSON");
    }
    if (value !== undefined) request[f.name] = value;
  }
  return request;
}

// JSON with exact big integers: `{raw: "digits"}` is written as the number itself.
function toJson(request, indent) {
  const raws = [];
  const text = JSON.stringify(request, (k, v) => {
    if (v && typeof v === "object" && typeof v.raw === "string" && /^\d+$/.test(v.raw)) {
      raws.push(v.raw);
      return "\u0000RAW" + (raws.length - 1);
    }
    return v;
  }, indent);
  return text.replace(/"\\u0000RAW(\d+)"/g, (_, i) => raws[Number(i)]);
}

function fill(request) {
  for (const f of fields) f.write(request[f.name]);
}

// --- a run ----------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

async function generate(request) {
  $("images").replaceChildren();
  $("details").replaceChildren();
  $("logs").textContent = "";
  const body = toJson(request);
  const response = await api("/" + app, { method: "POST", headers: { "Content-Type": "application/json" }, body });
  const answer = await response.json();
  if (!response.ok) return showErrors(answer);
  current = { id: answer.request_id, request, urls: answer, steps: [] };
  remember({ id: answer.request_id, request, time: Date.now() });
  $("cancel").disabled = false;
  $("progress").hidden = false;
  $("progress").value = 0;
  setStatus("Queued (position " + answer.queue_position + ")");
  try {
    await follow(current);
  } finally {
    $("cancel").disabled = true;
  }
}

function showErrors(answer) {
  const detail = answer.detail;
  if (!Array.isArray(detail)) return setStatus("Refused: " + (typeof detail === "string" ? detail : JSON.stringify(answer)));
  for (const item of detail) {
    const name = (item.loc || [])[1];
    const f = fields.find((x) => x.name === name);
    if (f) f.error.textContent = item.msg;
  }
  setStatus("Refused: " + detail.map((d) => (d.loc || []).slice(1).join(".") + ": " + d.msg).join("; "));
}

async function follow(run) {
  const path = new URL(run.urls.status_url).pathname + "/stream?logs=1";
  const response = await api(path);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      const status = JSON.parse(data);
      progress(run, status);
      if (status.status === "COMPLETED") return finish(run);
    }
  }
  return finish(run);
}

function progress(run, status) {
  for (const line of status.logs || []) {
    $("logs").textContent += line.message + "\n";
    const step = /^Step (\d+)\/(\d+) .* ([\d.]+) ms$/.exec(line.message);
    if (step) run.steps.push({ n: Number(step[1]), total: Number(step[2]), ms: Number(step[3]) });
  }
  if (status.status === "IN_QUEUE") return setStatus("Queued (position " + status.queue_position + ")");
  const last = run.steps[run.steps.length - 1];
  if (status.status === "IN_PROGRESS" && last) {
    const mean = run.steps.reduce((a, s) => a + s.ms, 0) / run.steps.length;
    const eta = ((last.total - last.n) * mean) / 1000;
    $("progress").value = last.n / last.total;
    setStatus("Step " + last.n + "/" + last.total + ", about " + eta.toFixed(1) + " s left");
  } else if (status.status === "IN_PROGRESS") setStatus("Running");
}

async function finish(run) {
  $("progress").hidden = true;
  const response = await api(new URL(run.urls.response_url).pathname);
  const text = await response.text();
  const result = JSON.parse(text);
  if (!response.ok) {
    setStatus("Ended: " + (result.detail && result.detail.map ? result.detail.map((d) => d.msg).join("; ") : result.detail));
    return remember({ id: run.id, ended: "error" });
  }
  // The seed as digits, not as a JavaScript number (seeds go up to 2^64).
  const seed = (/"seed"\s*:\s*(\d+)/.exec(text) || [])[1] || "";
  result.images.forEach((image, i) => {
    const figure = el("figure");
    const img = el("img");
    img.src = image.url;
    img.alt = "generated image " + (i + 1) + " of " + result.images.length;
    img.width = image.width;
    img.height = image.height;
    const caption = el("figcaption");
    caption.textContent = image.width + "×" + image.height + " ";
    if ((result.has_nsfw_concepts || [])[i]) {
      const flag = el("span", "nsfw");
      flag.textContent = "flagged by the safety checker ";
      caption.append(flag);
    }
    const link = el("a");
    link.href = image.url;
    link.download = "pixart-" + seed + "-" + i + "." + (image.content_type === "image/jpeg" ? "jpg" : "png");
    link.textContent = "Download";
    caption.append(link);
    figure.append(img, caption);
    $("images").append(figure);
  });
  const facts = [["request", run.id], ["seed", seed], ["inference", (result.timings.inference || 0).toFixed(2) + " s"],
    ["prompt", result.prompt]];
  for (const [name, value] of facts) {
    const dt = el("dt");
    dt.textContent = name;
    const dd = el("dd");
    dd.textContent = value;
    $("details").append(dt, dd);
  }
  setStatus("Done");
  remember({ id: run.id, seed, ended: "done", thumb: result.images[0] && result.images[0].url });
}

// --- history --------------------------------------------------------------------------------

function history() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY) || "[]");
  } catch (e) {
    return [];
  }
}

function remember(entry) {
  const all = history();
  const known = all.find((e) => e.id === entry.id);
  if (known) Object.assign(known, entry);
  else all.unshift(entry);
  localStorage.setItem(HISTORY, JSON.stringify(all.slice(0, 50)));
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const entry of history()) {
    const item = el("li");
    const prompt = el("span", "prompt");
    prompt.textContent = (entry.request && entry.request.prompt) || "(no prompt)";
    const meta = el("span", "hint");
    meta.textContent = new Date(entry.time).toLocaleString() + (entry.seed ? " · seed " + entry.seed : "") +
      (entry.ended ? " · " + entry.ended : "");
    const load = el("button");
    load.type = "button";
    load.textContent = "Load";
    load.addEventListener("click", () => fill(withSeed(entry)));
    const again = el("button");
    again.type = "button";
    again.textContent = "Run again (same seed)";
    again.addEventListener("click", () => { fill(withSeed(entry)); start(); });
    item.append(prompt, meta, " ", load, " ", again);
    list.append(item);
  }
}

function withSeed(entry) {
  const request = Object.assign({}, entry.request || {});
  if (entry.seed) request.seed = { raw: entry.seed };
  return request;
}

// --- code -----------------------------------------------------------------------------------

function code(kind, request) {
  const origin = location.origin;
  const json = toJson(request, 2);
  if (kind === "curl") {
    const auth = apiKey() ? " \\\n  -H \"Authorization: Key $FAL_KEY\"" : "";
    return "curl -X POST " + origin + "/" + app + " \\\n  -H 'Content-Type: application/json'" + auth +
      " \\\n  -d '" + json.replace(/'/g, "'\\''") + "'";
  }
  if (kind === "js") {
    return "import { createFalClient } from \"@fal-ai/client\";\nconst base = \"" + origin + "\";\n" +
      "const fal = createFalClient({\n  credentials: process.env.FAL_KEY ?? \"local\",\n" +
      "  requestMiddleware: async (req) => ({ ...req, url: req.url\n" +
      "    .replace(\"https://queue.fal.run/\", `${base}/`).replace(\"https://fal.run/\", `${base}/run/`)\n" +
      "    .replace(\"https://rest.fal.ai/\", `${base}/rest/`) }),\n});\n" +
      "const { data } = await fal.subscribe(\"" + app + "\", { input: " + json + ", logs: true });\n" +
      "console.log(data.images.map((i) => i.url));";
  }
  return "import os, fal_client, fal_client.client as fc\nos.environ.setdefault(\"FAL_KEY\", \"local\")\n" +
    "base = \"" + origin + "\"\nfc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f\"{base}/\", f\"{base}/run/\"\n" +
    "fc.REST_URL, fc.CDN_URL = f\"{base}/rest\", f\"{base}/cdn\"\n" +
    "result = fal_client.subscribe(\"" + app + "\", " + json.replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False")
      .replace(/\bnull\b/g, "None") + ")\nprint([i[\"url\"] for i in result[\"images\"]])";
}

async function copyCode(kind) {
  let request;
  try {
    request = collect();
  } catch (e) {
    return setStatus(e.message);
  }
  const text = code(kind, request);
  const box = $("code");
  box.hidden = false;
  box.value = text;
  try {
    await navigator.clipboard.writeText(text);
    setStatus("Copied as " + kind);
  } catch (e) {
    box.focus();
    box.select();
    setStatus("Select and copy the " + kind + " code below");
  }
}

// --- wiring ---------------------------------------------------------------------------------

async function start() {
  let request;
  try {
    request = collect();
  } catch (e) {
    return setStatus(e.message);
  }
  $("generate").disabled = true;
  try {
    await generate(request);
  } catch (e) {
    setStatus("Failed: " + e.message);
  } finally {
    $("generate").disabled = false;
  }
}

async function main() {
  const [health, schema] = await Promise.all([fetch("/health").then((r) => r.json()),
    fetch("/playground/schema.json").then((r) => r.json())]);
  app = health.app_id;
  $("app-id").textContent = app;
  renderForm(schema);
  renderHistory();
  $("form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); start(); }
  });
  $("cancel").addEventListener("click", async () => {
    if (!current) return;
    await api(new URL(current.urls.cancel_url).pathname, { method: "PUT" });
    setStatus("Cancelling…");
  });
  $("save-key").addEventListener("click", () => {
    localStorage.setItem(KEY, $("api-key").value);
    $("key-box").hidden = true;
    setStatus("Key saved in this browser");
  });
  document.querySelectorAll("[data-code]").forEach((b) => b.addEventListener("click", () => copyCode(b.dataset.code)));
  $("f-prompt") && $("f-prompt").focus();
}

main().catch((e) => setStatus("The playground could not start: " + e.message));
