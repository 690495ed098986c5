// End-to-end test of the gateway's browser playground: starts the mesh on the demo model, drives Debian's
// chromium (never a downloaded browser) with playwright-core, and checks the page against the gRPC API.
//
//   npm ci --prefix tests/e2e && node --test tests/e2e/playground.spec.mjs      (or: make e2e-browser)
//
// Environment: CHROMIUM (default /usr/bin/chromium), PLAYGROUND_SCREENSHOT (default docs/playground.png; the
// phone-sized one goes next to it as playground-phone.png).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { chromium } from "playwright-core";
import { freePorts, root, startGateway, startMesh, startProcess } from "./mesh.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const MODEL = "models/blip2-demo";
const SAMPLE = path.join(root, MODEL, "samples/sample000.png");
const QUESTION = "Question: what color is the background? Answer:";
const SCREENSHOT = path.resolve(root, process.env.PLAYGROUND_SCREENSHOT || "docs/playground.png");
const PHONE_SCREENSHOT = path.join(path.dirname(SCREENSHOT), "playground-phone.png");
const PHONE = { width: 390, height: 844 };
const API_KEY = "playground-test-key";
const ANSWER_TIMEOUT_MS = 60_000;

// ---- processes ---------------------------------------------------------------------------------------------------

/** The answer the gRPC API gives for IMAGE and PROMPT with default options, from the CLI's own gRPC client. */
async function grpcAnswer(address, image, prompt, options = []) {
  const { stdout } = await promisify(execFile)("./blip2mesh", ["caption", image, "--addr", address, "--prompt", prompt, ...options],
    { cwd: root, timeout: ANSWER_TIMEOUT_MS });
  return stdout.replace(/\n$/, "");
}

// ---- the browser ---------------------------------------------------------------------------------------------------

async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`no chromium at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)`);
  const profile = await mkdtemp(path.join(tmpdir(), "blip2mesh-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  return { context, close: async () => { await context.close(); await rm(profile, { recursive: true, force: true }); } };
}

/**
 * Opens the playground; records page errors, failed loads (any GET answered 4xx/5xx, a missing favicon included),
 * and every answer's text as it changes (a MutationObserver). Waits until the page has asked for the limits.
 */
async function openPlayground(context, baseUrl, { limits = "loaded" } = {}) {
  const page = await context.newPage();
  const problems = [];
  page.on("response", (r) => {
    if (r.request().method() === "GET" && r.status() >= 400) problems.push(`GET ${new URL(r.url()).pathname}: ${r.status()}`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("console", (m) => {
    // Failed API calls are logged by the browser itself ("Failed to load resource"); the page shows those.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
  });
  const requests = [];
  page.on("request", (r) => {
    if (r.method() === "POST") requests.push({ path: new URL(r.url()).pathname, body: r.postDataJSON(), authorization: r.headers().authorization });
  });
  const response = await page.goto(`${baseUrl}/`);
  assert.equal(response.status(), 200);
  await page.waitForSelector(`#limits[data-state=${limits}]`, { timeout: ANSWER_TIMEOUT_MS });
  await page.evaluate(() => {
    const answer = document.getElementById("answer");
    window.answerSnapshots = [];
    new MutationObserver(() => window.answerSnapshots.push(answer.textContent))
      .observe(answer, { childList: true, characterData: true, subtree: true });
  });
  return { page, problems, requests };
}

/** Clicks Ask and waits for the page to finish; returns its state, answer, facts and the answer's snapshots. */
async function ask(page) {
  await page.evaluate(() => { window.answerSnapshots = []; });
  await page.getByRole("button", { name: "Ask", exact: true }).click();
  await page.waitForSelector("form[data-state=done], form[data-state=error]", { timeout: ANSWER_TIMEOUT_MS });
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    return {
      state: document.getElementById("ask-form").dataset.state,
      answer: text("answer"),
      error: document.getElementById("error").hidden ? null : text("error"),
      image: text("fact-image"), cacheHit: text("fact-cache-hit"), ttft: text("fact-ttft"), tps: text("fact-tps"),
      stages: Object.fromEntries([...document.querySelectorAll("#fact-stages .stage")]
        .map((s) => [s.dataset.stage, s.textContent])),
      snapshots: window.answerSnapshots,
    };
  });
}

/** The distinct non-empty states the answer went through, each required to extend the one before. */
function growth(snapshots) {
  const states = snapshots.filter((s, i) => s !== "" && s !== snapshots[i - 1]);
  for (let i = 1; i < states.length; i++) {
    assert.ok(states[i].startsWith(states[i - 1]) && states[i].length > states[i - 1].length,
      `the answer only grows while streaming: ${JSON.stringify(states)}`);
  }
  return states;
}

// ---- the tests -----------------------------------------------------------------------------------------------------

describe("browser playground", () => {
  let mesh;
  let browser;
  let scratch;

  before(async () => {
    scratch = await mkdtemp(path.join(tmpdir(), "blip2mesh-e2e-"));
    mesh = await startMesh(MODEL);
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch((e) => console.error(`closing chromium: ${e.message}`));
    await mesh?.stop();
    if (scratch) await rm(scratch, { recursive: true, force: true });
  });

  test("captions an image, then answers a question about it by image id, streaming both", async (t) => {
    const { page, problems, requests } = await openPlayground(browser.context, mesh.http);
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    await page.getByRole("img", { name: "Preview of sample000.png" }).waitFor();
    assert.equal(await page.getByTestId("preview").evaluate((img) => img.naturalWidth > 0), true, "the preview shows");

    // Caption: empty prompt.
    await page.getByLabel("Preset").selectOption({ label: "Caption (empty prompt)" });
    assert.equal(await page.getByLabel("Prompt").inputValue(), "");
    const caption = await ask(page);
    assert.equal(caption.state, "done", `caption failed: ${caption.error}`);
    // Tokens decoded faster than they can be sent travel together, so a short caption may come in a few updates.
    const states = growth(caption.snapshots);
    t.diagnostic(`caption streamed as ${JSON.stringify(states)}; first token ${caption.ttft}`);
    assert.equal(states.at(-1), caption.answer);
    assert.equal(caption.cacheHit, "no");
    assert.match(caption.image, /^sent \(/);
    assert.match(caption.ttft, /^\d+(\.\d+)? (ms|s)$/);
    assert.match(caption.tps, /^\d+\.\d$/);
    for (const stage of ["preprocess", "vision", "qformer", "decoder", "total"]) {
      assert.match(caption.stages[stage] ?? "", new RegExp(`^${stage} \\d+\\.\\d$`), `stage ms for ${stage}`);
    }
    await mkdir(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT });

    // Question: the image is not sent again.
    await page.getByLabel("Preset").selectOption({ value: QUESTION });
    assert.equal(await page.getByLabel("Prompt").inputValue(), QUESTION);
    const answer = await ask(page);
    assert.equal(answer.state, "done", `question failed: ${answer.error}`);
    assert.ok(answer.answer.length > 0);
    growth(answer.snapshots);
    assert.equal(answer.cacheHit, "yes");
    assert.equal(answer.image, "reused by id (not sent)");
    assert.equal(answer.stages.vision, undefined, "no vision stage for a cached image");

    const generates = requests.filter((r) => r.path === "/v1/generate");
    assert.deepEqual(requests.map((r) => r.path), ["/v1/generate", "/v1/generate"], "one upload, no other POSTs");
    assert.equal(typeof generates[0].body.image, "string");
    assert.equal(generates[0].body.imageId, undefined);
    assert.equal(generates[1].body.image, undefined, "the second question does not upload the image again");
    assert.match(generates[1].body.imageId, /^[0-9a-f]{64}$/);
    assert.equal(generates[1].body.prompt, QUESTION);

    // The same requests straight through the gRPC API (after the page, so the page's first ask was a cache miss).
    assert.equal(caption.answer, await grpcAnswer(mesh.grpc, SAMPLE, ""));
    assert.equal(answer.answer, await grpcAnswer(mesh.grpc, SAMPLE, QUESTION));

    // Fits the 1280x800 window it was designed for.
    const size = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]);
    assert.ok(size[0] <= 1280 && size[1] <= 800, `the page fits 1280x800, it is ${size.join("x")}`);
    // Its icon is there (the page names it, so the browser asks for no /favicon.ico).
    const icon = await page.locator("link[rel=icon]").getAttribute("href");
    const iconResponse = await page.request.get(new URL(icon, mesh.http).href);
    assert.equal(iconResponse.status(), 200);
    assert.equal(iconResponse.headers()["content-type"], "image/svg+xml");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("the option fields take their bounds from the gateway's /v1/limits", async () => {
    const { page, problems, requests } = await openPlayground(browser.context, mesh.http);
    const limits = await (await fetch(`${mesh.http}/v1/limits`)).json();
    assert.deepEqual(Object.keys(limits).sort(), ["maxBeams", "maxImageBytes", "maxImagePixels", "maxNewTokens", "maxPromptTokens"]);
    assert.equal(await page.getByLabel("Beams").getAttribute("max"), String(limits.maxBeams));
    assert.equal(await page.getByLabel("Max new tokens").getAttribute("max"), String(limits.maxNewTokens));
    assert.equal(await page.getByLabel("Min new tokens").getAttribute("max"), String(limits.maxNewTokens));
    assert.match(await page.getByTestId("limits").textContent(), new RegExp(`${limits.maxBeams} beams`));

    // One beam more than the gateway takes is refused in the page, before anything is sent.
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    await page.getByLabel("Beams").fill(String(limits.maxBeams + 1));
    const refused = await ask(page);
    assert.equal(refused.state, "error");
    assert.equal(refused.error, `Beams: enter a number from 1 to ${limits.maxBeams}.`);
    assert.deepEqual(requests, []);
    await page.getByLabel("Beams").fill(String(limits.maxBeams));
    const most = await ask(page);
    assert.equal(most.state, "done", `${limits.maxBeams} beams failed: ${most.error}`);
    assert.equal(requests[0].body.options.numBeams, limits.maxBeams);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("the preset follows the prompt as it is edited", async () => {
    const { page, problems } = await openPlayground(browser.context, mesh.http);
    const preset = page.getByLabel("Preset");
    const prompt = page.getByLabel("Prompt");
    await preset.selectOption({ value: QUESTION });
    await prompt.fill("Question: how many shapes are there? Answer:");
    assert.equal(await preset.inputValue(), "Question: how many shapes are there? Answer:");
    await prompt.fill("Question: is the square big? Answer:");
    assert.equal(await preset.inputValue(), "custom");
    assert.equal(await preset.locator("option:checked").textContent(), "Your own prompt");
    await prompt.fill("");
    assert.equal(await preset.locator("option:checked").textContent(), "Caption (empty prompt)");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("with API keys on the gateway: the key field, kept in sessionStorage only", async () => {
    const keys = path.join(scratch, "api-keys");
    await writeFile(keys, `# the playground test's key\n${API_KEY}\n`);
    const gateway = await startGateway(mesh, MODEL, ["--api-keys-file", keys]);
    try {
      // Without a key the page says what it needs (the 401 for /v1/limits is the gateway's answer, not a fault).
      const { page, problems, requests } = await openPlayground(browser.context, gateway.http, { limits: "needs-key" });
      assert.match(await page.getByTestId("limits").textContent(), /^This gateway wants an API key \(an API key is required: .*\): enter it above\.$/);
      assert.equal(await page.getByLabel("API key").getAttribute("aria-invalid"), "true");
      await page.getByTestId("image-input").setInputFiles(SAMPLE);
      const none = await ask(page);
      assert.equal(none.state, "error");
      assert.equal(none.error, "Unauthenticated: an API key is required: send the header 'authorization: Bearer <key>' (enter the gateway's API key in the API key field)");

      await page.getByLabel("API key").fill("not-the-key");
      await page.getByLabel("API key").dispatchEvent("change");
      await page.waitForSelector("#limits[data-state=needs-key]");
      const wrong = await ask(page);
      assert.equal(wrong.error, "Unauthenticated: the API key is not valid (enter the gateway's API key in the API key field)");

      await page.getByLabel("API key").fill(API_KEY);
      await page.getByLabel("API key").dispatchEvent("change");
      await page.waitForSelector("#limits[data-state=loaded]");
      assert.equal(await page.getByLabel("API key").getAttribute("aria-invalid"), "false");
      assert.equal(await page.getByLabel("Beams").getAttribute("max"), "8");
      const answer = await ask(page);
      assert.equal(answer.state, "done", `with the key: ${answer.error}`);
      assert.equal(answer.answer, await grpcAnswer(mesh.grpc, SAMPLE, ""));
      assert.deepEqual(requests.map((r) => r.authorization), [undefined, "Bearer not-the-key", `Bearer ${API_KEY}`]);

      // In this tab's sessionStorage and nowhere that outlives it: a reload keeps it, another tab does not see it.
      const storage = () => page.evaluate(() => ({ session: { ...sessionStorage }, local: { ...localStorage }, cookies: document.cookie }));
      assert.deepEqual(await storage(), { session: { "blip2mesh.apiKey": API_KEY }, local: {}, cookies: "" });
      await page.reload();
      await page.waitForSelector("#limits[data-state=loaded]");
      assert.equal(await page.getByLabel("API key").inputValue(), API_KEY);
      const other = await openPlayground(browser.context, gateway.http, { limits: "needs-key" });
      assert.equal(await other.page.getByLabel("API key").inputValue(), "");
      await other.page.close();

      const unexpected = (list) => list.filter((p) => p !== "GET /v1/limits: 401");
      assert.deepEqual(unexpected(problems), []);
      await page.close();
    } finally {
      await gateway.stop();
    }
  });

  test("on a phone-sized screen everything fits and works", async () => {
    const { page, problems } = await openPlayground(browser.context, mesh.http);
    await page.setViewportSize(PHONE);
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    await page.getByLabel("Preset").selectOption({ value: QUESTION });
    const result = await ask(page);
    assert.equal(result.state, "done", `on a phone: ${result.error}`);
    assert.equal(result.answer, await grpcAnswer(mesh.grpc, SAMPLE, QUESTION));

    // Nothing wider than the screen, and no label or field whose text spills out of its box.
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= PHONE.width, `the page is ${width} px wide on a ${PHONE.width} px screen`);
    const spilling = await page.evaluate(() => [...document.querySelectorAll("h1, p, label, input, select, button, dt, dd, .stage")]
      .filter((e) => !e.closest(".visually-hidden") && !e.classList.contains("visually-hidden") && e.getClientRects().length > 0)
      .filter((e) => {
        const r = e.getBoundingClientRect();
        // A field scrolls its own text; anything else whose content is wider than its box spills.
        const spills = !(e instanceof HTMLInputElement || e instanceof HTMLSelectElement) && e.scrollWidth > e.clientWidth + 1;
        return r.left < 0 || r.right > innerWidth || spills;
      })
      .map((e) => `${e.tagName.toLowerCase()}${e.id ? `#${e.id}` : ""} "${e.textContent.trim().slice(0, 40)}"`));
    assert.deepEqual(spilling, []);
    await mkdir(path.dirname(PHONE_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: PHONE_SCREENSHOT, fullPage: true });
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a long answer streams into the page over many updates", async (t) => {
    const { page, problems, requests } = await openPlayground(browser.context, mesh.http);
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    await page.getByLabel("Max new tokens").fill("200");
    await page.getByLabel("Min new tokens").fill("200");
    const result = await ask(page);
    assert.equal(result.state, "done", `long answer failed: ${result.error}`);
    assert.deepEqual(requests[0].body.options, { maxNewTokens: 200, numBeams: 1, minNewTokens: 200 });
    const states = growth(result.snapshots);
    t.diagnostic(`200 tokens arrived in ${states.length} updates`);
    assert.ok(states.length >= 3, `the answer appears over several updates, saw ${states.length}`);
    assert.equal(states.at(-1), result.answer);
    assert.equal(result.answer, await grpcAnswer(mesh.grpc, SAMPLE, "", ["--max-new-tokens", "200", "--min-new-tokens", "200"]));
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("sampling options go into the request and give the API's answer", async () => {
    const { page, problems, requests } = await openPlayground(browser.context, mesh.http);
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    assert.equal(await page.getByLabel("Temperature").isDisabled(), true, "sampling knobs wait for Sample");
    await page.getByLabel("Sample").check();
    await page.getByLabel("Temperature").fill("0.7");
    await page.getByLabel("Top-p").fill("0.9");
    await page.getByLabel("Seed").fill("3");
    await page.getByLabel("Max new tokens").fill("12");
    await page.getByLabel("Prompt").fill(QUESTION);
    const result = await ask(page);
    assert.equal(result.state, "done", `sampling failed: ${result.error}`);
    const options = { maxNewTokens: 12, numBeams: 1, doSample: true, temperature: 0.7, topP: 0.9, seed: 3 };
    assert.deepEqual(requests[0].body.options, options);

    // The same request through the HTTP/JSON API from node, joined from its NDJSON lines.
    const body = JSON.stringify({ image: requests[0].body.image, prompt: QUESTION, options });
    const response = await fetch(`${mesh.http}/v1/generate`, { method: "POST", headers: { "Content-Type": "application/json" }, body });
    assert.equal(response.status, 200);
    const text = (await response.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l).text ?? "").join("");
    assert.equal(result.answer, text);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a file that is not an image gets the gateway's message, not a stack trace", async () => {
    const { page, problems } = await openPlayground(browser.context, mesh.http);
    const notImage = path.join(scratch, "notes.txt");
    await writeFile(notImage, "this is not an image\n");
    await page.getByTestId("image-input").setInputFiles(notImage);
    const result = await ask(page);
    assert.equal(result.state, "error");
    assert.equal(result.error, "Invalid argument: image: bytes are not a supported image (PNG, JPEG, WebP, GIF, BMP)");
    assert.equal(result.answer, "");
    assert.equal(await page.getByRole("alert").textContent(), result.error);
    assert.equal(await page.getByText("No preview for this file.").isVisible(), true);

    // A good image afterwards works and clears the error.
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    const retry = await ask(page);
    assert.equal(retry.state, "done");
    assert.equal(retry.error, null);
    assert.equal(await page.getByText("No preview for this file.").isVisible(), false);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a network failure is reported in words", async () => {
    const { page, problems } = await openPlayground(browser.context, mesh.http);
    await page.route("**/v1/generate", (route) => route.abort("connectionrefused"));
    await page.getByTestId("image-input").setInputFiles(SAMPLE);
    const result = await ask(page);
    assert.equal(result.state, "error");
    assert.match(result.error, /^Could not reach the gateway \(network error\)/);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a stage that is down is named in the message", async () => {
    // A lone gateway whose stages are not running: its vision stage is unreachable.
    const [port, httpPort, vision, qformer, decoder] = await freePorts(5);
    const gateway = await startProcess(["serve", "gateway", "--model", MODEL, "--port", String(port),
      "--http-port", String(httpPort), "--vision", `127.0.0.1:${vision}`, "--qformer", `127.0.0.1:${qformer}`,
      "--decoder", `127.0.0.1:${decoder}`], /Application started/);
    try {
      const { page, problems } = await openPlayground(browser.context, `http://127.0.0.1:${httpPort}`);
      await page.getByTestId("image-input").setInputFiles(SAMPLE);
      const result = await ask(page);
      assert.equal(result.state, "error");
      assert.match(result.error, /^Unavailable: vision stage is unavailable .* \(a stage of the mesh is down or unreachable/);
      assert.deepEqual(problems, []);
      await page.close();
    } finally {
      await gateway.stop();
    }
  });
});
