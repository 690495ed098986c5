// The gateway's OpenAI-compatible API driven by the official `openai` npm package (v7): starts the mesh on the tiny
// reference checkpoint and checks the answers against Hugging Face's references (tests/fixtures/blip2-tiny-a).
//
//   npm ci --prefix tests/e2e && node --test tests/e2e/openai.spec.mjs      (or: make e2e-browser)
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import OpenAI from "openai";
import { root, startGateway, startMesh } from "./mesh.mjs";

const MODEL = "tests/fixtures/blip2-tiny-a";
const references = JSON.parse(await readFile(path.join(root, MODEL, "references.json"), "utf8"));
const reference = (image, prompt) => references.images[image].prompts[prompt];

async function imagePart(image) {
  const { file, format } = references.images[image];
  const bytes = await readFile(path.join(root, MODEL, file));
  return { type: "image_url", image_url: { url: `data:image/${format.toLowerCase()};base64,${bytes.toString("base64")}` } };
}

describe("the OpenAI SDK against the gateway", () => {
  let mesh;
  let client;
  before(async () => {
    mesh = await startMesh(MODEL);
    client = new OpenAI({ baseURL: `${mesh.http}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => { await mesh?.stop(); });

  test("lists the served model", async () => {
    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => [m.id, m.object, m.owned_by]), [["blip2-tiny-a", "model", "blip2mesh"]]);
  });

  test("a plain completion is Hugging Face's greedy answer, with finish_reason, usage and logprobs", async () => {
    const expected = reference(0, 1).greedy;
    const completion = await client.chat.completions.create({
      model: "blip2-tiny-a",
      messages: [{ role: "user", content: [await imagePart(0), { type: "text", text: "a photo of" }] }],
      max_tokens: 30,
      logprobs: true,
      top_logprobs: 2,
    });
    assert.match(completion.id, /^chatcmpl-/);
    assert.equal(completion.object, "chat.completion");
    const [choice] = completion.choices;
    assert.equal(choice.message.role, "assistant");
    assert.equal(choice.message.content, expected.text);
    assert.equal(choice.finish_reason, expected.ended_with_eos ? "stop" : "length");
    assert.equal(choice.logprobs.content.length, expected.ids.length - 1);
    assert.ok(choice.logprobs.content.every((t) => t.logprob <= 0 && t.top_logprobs.length === 2));
    assert.deepEqual(completion.usage, { prompt_tokens: 5, completion_tokens: expected.ids.length - 1, total_tokens: 5 + expected.ids.length - 1 });
  });

  test("a streamed completion is the same answer, usage in its last chunk", async () => {
    const expected = reference(2, 0).greedy;
    const stream = await client.chat.completions.create({
      messages: [{ role: "user", content: [await imagePart(2)] }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish = null;
    let usage = null;
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        text += choice.delta.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
      usage = chunk.usage ?? usage;
    }
    assert.equal(text, expected.text);
    assert.equal(finish, expected.ended_with_eos ? "stop" : "length");
    assert.equal(usage.completion_tokens, expected.ids.length - 1);
  });

  test("n answers from beams: the first is Hugging Face's beam answer", async () => {
    const completion = await client.chat.completions.create({
      messages: [{ role: "user", content: [await imagePart(0), { type: "text", text: "a photo of" }] }],
      n: 3,
      blip2: { num_beams: 4 },
    });
    assert.equal(completion.choices.length, 3);
    assert.equal(completion.choices[0].message.content, reference(0, 1).beam.text);
    assert.equal(new Set(completion.choices.map((c) => c.message.content)).size, 3);
  });

  test("a stop string ends the streamed answer and never reaches it", async () => {
    assert.ok(reference(0, 0).greedy.text.startsWith("X 182 415"));
    const stream = await client.chat.completions.create({
      messages: [{ role: "user", content: [await imagePart(0)] }],
      stop: ["415"],
      stream: true,
    });
    const deltas = [];
    let finish = null;
    for await (const chunk of stream) {
      deltas.push(chunk.choices[0].delta.content ?? "");
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    assert.equal(deltas.join(""), "X 182 ");
    assert.ok(deltas.every((d) => !d.includes("4")), JSON.stringify(deltas));
    assert.equal(finish, "stop");
  });

  test("an unsupported field is a 400 naming it", async () => {
    await assert.rejects(
      client.chat.completions.create({
        messages: [{ role: "user", content: [await imagePart(0)] }],
        tools: [{ type: "function", function: { name: "f", parameters: {} } }],
      }),
      (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === "tools" && /tools/.test(e.message));
  });

  test("API keys guard the OpenAI routes as the rest of the API; --model-name names the model", async () => {
    const scratch = await mkdtemp(path.join(tmpdir(), "blip2mesh-openai-"));
    const keys = path.join(scratch, "api-keys");
    await writeFile(keys, "openai-test-key\n");
    const gateway = await startGateway(mesh, MODEL, ["--api-keys-file", keys, "--model-name", "blip2-tiny"]);
    try {
      const wrong = new OpenAI({ baseURL: `${gateway.http}/v1`, apiKey: "wrong", maxRetries: 0 });
      await assert.rejects(wrong.models.list(), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
      const right = new OpenAI({ baseURL: `${gateway.http}/v1`, apiKey: "openai-test-key", maxRetries: 0 });
      assert.deepEqual((await right.models.list()).data.map((m) => m.id), ["blip2-tiny"]);
      const completion = await right.chat.completions.create({ model: "blip2-tiny", messages: [{ role: "user", content: [await imagePart(0)] }] });
      assert.equal(completion.choices[0].message.content, reference(0, 0).greedy.text);
    } finally {
      await gateway.stop();
      await rm(scratch, { recursive: true, force: true });
    }
  });
});
