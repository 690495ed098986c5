// Blip2Mesh playground: picks an image, streams answers from POST /v1/generate (newline-delimited JSON); the
// options' limits come from GET /v1/limits, and an API key, when the gateway wants one, from this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("ask-form"), input: $("image-input"), drop: $("drop-zone"), preview: $("preview"), hint: $("drop-hint"),
  imageInfo: $("image-info"), preset: $("preset"), prompt: $("prompt"), ask: $("ask"), status: $("status"),
  error: $("error"), answer: $("answer"), facts: $("facts"), apiKey: $("api-key"), limits: $("limits"),
  maxNewTokens: $("max-new-tokens"), minNewTokens: $("min-new-tokens"), numBeams: $("num-beams"), doSample: $("do-sample"),
  temperature: $("temperature"), topP: $("top-p"), seed: $("seed"),
};

// The image being asked about; imageId is set by the gateway's first answer and reused until a new image is chosen.
const image = { file: null, imageId: null, previewUrl: null };
let busy = false;
// What the gateway accepts (GET /v1/limits); null until read.
let limits = null;

const GRPC_CODES = {
  1: "Cancelled", 2: "Unknown error", 3: "Invalid argument", 4: "Deadline exceeded", 5: "Not found",
  7: "Permission denied", 8: "Resource exhausted", 9: "Failed precondition", 12: "Not implemented",
  13: "Internal error", 14: "Unavailable", 16: "Unauthenticated",
};

class ApiError extends Error {
  constructor(message, code) { super(message); this.code = code; }
}

// ---- image -------------------------------------------------------------------------------------------------------

function chooseImage(file) {
  if (!file) return;
  if (limits && file.size > limits.maxImageBytes) {
    showError(new ApiError(`${file.name} is ${formatBytes(file.size)}; this gateway takes images up to ${formatBytes(limits.maxImageBytes)}.`));
    return;
  }
  image.file = file;
  image.imageId = null;
  if (image.previewUrl) URL.revokeObjectURL(image.previewUrl);
  image.previewUrl = URL.createObjectURL(file);
  ui.preview.src = image.previewUrl;
  ui.preview.alt = `Preview of ${file.name}`;
  ui.preview.hidden = false;
  ui.hint.hidden = true;
  $("no-preview").hidden = true;
  ui.imageInfo.textContent = `${file.name} · ${formatBytes(file.size)} · sent with the first question`;
  clearError();
  updateAskButton();
}

ui.preview.addEventListener("error", () => {   // not something the browser can show; the gateway will say why
  ui.preview.hidden = true;
  $("no-preview").hidden = false;
});

ui.input.addEventListener("change", () => chooseImage(ui.input.files[0]));
ui.drop.addEventListener("dragover", (e) => { e.preventDefault(); ui.drop.classList.add("over"); });
ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
ui.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.drop.classList.remove("over");
  chooseImage(e.dataTransfer.files[0]);
});
// A drop that misses the zone must not navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(new ApiError(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// ---- prompt and options ------------------------------------------------------------------------------------------

const customPreset = ui.preset.querySelector('option[value="custom"]');

ui.preset.addEventListener("change", () => {
  if (ui.preset.value === "custom") return;
  ui.prompt.value = ui.preset.value;
  ui.prompt.focus();
  const blank = ui.prompt.value.indexOf("…");
  if (blank >= 0) ui.prompt.setSelectionRange(blank, blank + 1);   // typing replaces the placeholder
});

// The preset shows what the prompt is: a preset's own text, or "Your own prompt" once it is edited away from one.
ui.prompt.addEventListener("input", () => {
  const match = [...ui.preset.options].find((o) => o !== customPreset && o.value === ui.prompt.value);
  ui.preset.value = match ? match.value : customPreset.value;
});

ui.doSample.addEventListener("change", () => {
  for (const input of [ui.temperature, ui.topP, ui.seed]) input.disabled = !ui.doSample.checked;
});

function readOptions() {
  const invalid = [ui.maxNewTokens, ui.minNewTokens, ui.numBeams, ui.temperature, ui.topP, ui.seed]
    .find((input) => !input.disabled && (!input.checkValidity() || input.value === ""));
  if (invalid) {
    const label = invalid.closest("label").textContent.trim();
    throw new ApiError(`${label}: enter a number from ${invalid.min} to ${invalid.max || "any"}.`);
  }
  const options = { maxNewTokens: Number(ui.maxNewTokens.value), numBeams: Number(ui.numBeams.value) };
  // Sent only when set, as the API's default is none.
  if (Number(ui.minNewTokens.value) > 0) options.minNewTokens = Number(ui.minNewTokens.value);
  if (ui.doSample.checked) {
    Object.assign(options, {
      doSample: true, temperature: Number(ui.temperature.value), topP: Number(ui.topP.value), seed: Number(ui.seed.value),
    });
  }
  return options;
}

// ---- the API key and the gateway's limits ------------------------------------------------------------------------

// sessionStorage: the key lives as long as this tab, and is never written anywhere that outlives it.
const API_KEY_STORAGE = "blip2mesh.apiKey";
ui.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
  else sessionStorage.removeItem(API_KEY_STORAGE);
  loadLimits();
});

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Reads GET /v1/limits and sets the option fields' bounds from it; says so when the gateway wants a key first. */
async function loadLimits() {
  ui.limits.dataset.state = "loading";
  try {
    const response = await fetch("/v1/limits", { headers: authHeaders() });
    if (!response.ok) throw await errorFrom(response);
    limits = await response.json();
  } catch (e) {
    limits = null;
    const needsKey = e instanceof ApiError && e.code === 16;
    ui.apiKey.setAttribute("aria-invalid", String(needsKey));
    ui.limits.textContent = needsKey
      ? `This gateway wants an API key (${e.message}): enter it above.`
      : `Could not read the gateway's limits: ${e.message}`;
    ui.limits.dataset.state = needsKey ? "needs-key" : "error";
    return;
  }
  ui.apiKey.setAttribute("aria-invalid", "false");
  ui.maxNewTokens.max = limits.maxNewTokens;
  ui.minNewTokens.max = limits.maxNewTokens;
  ui.numBeams.max = limits.maxBeams;
  $("image-limit").textContent = `, up to ${formatBytes(limits.maxImageBytes)}`;
  ui.limits.textContent = `Gateway limits: ${limits.maxNewTokens} new tokens, ${limits.maxBeams} beams, ` +
    `${limits.maxPromptTokens} prompt tokens, images up to ${formatBytes(limits.maxImageBytes)}.`;
  ui.limits.dataset.state = "loaded";
}

// ---- the API -----------------------------------------------------------------------------------------------------

async function errorFrom(response) {
  const body = await response.text().catch(() => "");
  try {
    const { code, message } = JSON.parse(body);
    if (message) return new ApiError(message, code);
  } catch { /* not JSON: fall through */ }
  return new ApiError(`The gateway answered HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}.`);
}

function parseFrame(line) {
  let frame;
  try { frame = JSON.parse(line); } catch { throw new ApiError("The gateway sent a line that is not JSON."); }
  if ("code" in frame && "message" in frame) throw new ApiError(frame.message, frame.code);   // error mid-stream
  return frame;
}

/** POSTs a GenerateRequest and yields each streamed GenerateResponse as soon as its line arrives. */
async function* generate(request) {
  let response;
  try {
    response = await fetch("/v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(request),
    });
  } catch {
    throw new ApiError("Could not reach the gateway (network error). Is the mesh still running?");
  }
  if (!response.ok) throw await errorFrom(response);

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    let chunk;
    try { chunk = await reader.read(); } catch {
      throw new ApiError("The connection to the gateway broke while the answer was streaming.");
    }
    if (chunk.done) break;
    const lines = (pending + chunk.value).split("\n");
    pending = lines.pop();
    for (const line of lines) if (line.trim()) yield parseFrame(line);
  }
  if (pending.trim()) yield parseFrame(pending);
}

// ---- asking ------------------------------------------------------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  if (busy || !image.file) return;
  clearError();
  setBusy(true);
  ui.form.dataset.state = "busy";   // idle → busy → done | error, for scripts and tests
  try {
    const request = { prompt: ui.prompt.value, options: readOptions() };
    try {
      await askOnce(request);
    } catch (e) {
      if (e.code !== 5 || !request.imageId) throw e;
      image.imageId = null;   // evicted from the gateway's cache: send the bytes again
      await askOnce(request);
    }
    ui.form.dataset.state = "done";
  } catch (e) {
    showError(e);
    ui.form.dataset.state = "error";
  } finally {
    setBusy(false);
  }
}

async function askOnce(request) {
  delete request.image;
  delete request.imageId;
  const file = image.file;
  const reused = Boolean(image.imageId);
  if (reused) request.imageId = image.imageId;
  else request.image = await fileToBase64(file);

  ui.answer.textContent = "";
  ui.facts.hidden = true;
  ui.status.textContent = reused ? "Generating…" : "Sending the image and generating…";
  const started = performance.now();
  let firstToken = null;
  let last = null;
  for await (const frame of generate(request)) {
    if (frame.imageId && !image.imageId && image.file === file) {
      image.imageId = frame.imageId;
      ui.imageInfo.textContent = `${file.name} · ${formatBytes(file.size)} · image id ${frame.imageId.slice(0, 12)}… (reused by later questions)`;
    }
    if (firstToken === null && frame.tokenIds) {
      firstToken = performance.now() - started;
      ui.status.textContent = "Streaming…";
    }
    if (frame.text) ui.answer.append(frame.text);
    if (frame.finishReason) last = frame;
  }
  if (!last) throw new ApiError("The answer stream ended before its last message.");
  const elapsed = performance.now() - started;
  ui.status.textContent = `Done in ${formatMs(elapsed)}.`;
  showFacts({ reused, sentBytes: reused ? 0 : file.size, firstToken, elapsed, last });
}

function showFacts({ reused, sentBytes, firstToken, elapsed, last }) {
  const usage = last.usage || {};
  const generated = usage.generatedTokens || 0;
  $("fact-image").textContent = reused ? "reused by id (not sent)" : `sent (${formatBytes(sentBytes)})`;
  $("fact-cache-hit").textContent = usage.cacheHit ? "yes" : "no";
  $("fact-ttft").textContent = firstToken === null ? "–" : formatMs(firstToken);
  $("fact-tps").textContent = (generated / (elapsed / 1000)).toFixed(1);
  $("fact-tps").title = `${generated} generated tokens in ${formatMs(elapsed)}, measured in the browser`;
  $("fact-finish").textContent = `${last.finishReason} · ${generated} generated, ${usage.promptTokens || 0} prompt tokens`;

  const order = ["preprocess", "vision", "qformer", "decoder", "total"];
  const stages = Object.entries(usage.stageMs || {})
    .sort(([a], [b]) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99));
  const list = $("fact-stages");
  list.replaceChildren(...stages.map(([stage, ms]) => {
    const item = document.createElement("span");
    item.className = "stage";
    item.dataset.stage = stage;
    item.textContent = `${stage} ${ms.toFixed(1)}`;
    return item;
  }));
  ui.facts.hidden = false;
}

ui.form.addEventListener("submit", ask);
loadLimits();

// ---- page state --------------------------------------------------------------------------------------------------

function setBusy(value) {
  busy = value;
  ui.answer.setAttribute("aria-busy", String(value));
  ui.form.classList.toggle("busy", value);
  updateAskButton();
}

function updateAskButton() {
  ui.ask.disabled = busy || !image.file;
  ui.ask.textContent = busy ? "Asking…" : "Ask";
}

function showError(e) {
  let text;
  if (e instanceof ApiError) {
    text = e.code !== undefined ? `${GRPC_CODES[e.code] || `Error ${e.code}`}: ${e.message}` : e.message;
    if (e.code === 14) text += " (a stage of the mesh is down or unreachable; try again once it is back)";
    if (e.code === 16) text += " (enter the gateway's API key in the API key field)";
  } else {
    text = `Something went wrong in the page: ${e && e.message ? e.message : e}`;
  }
  ui.error.textContent = text;
  ui.error.hidden = false;
  ui.status.textContent = "Failed.";
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1024 * 1024 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}
