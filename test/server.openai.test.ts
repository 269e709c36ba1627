// The server as the official `openai` client sees it, over the demo model and its
// adapters: models, completions (plain, streamed, logprobs, n), chat (on a copy of the
// demo base given a chat template), errors, and loading adapters while serving.

import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { startServer, type RunningServer } from "../src/server/app.js";
import { DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "./helpers/demo.js";
import { errorOf, postJson } from "./helpers/http.js";

const PROMPT = "kto bram zu =";
const REVERSED = " zu bram kto";
/** Renders the last user message after BOS: the chat prompt equals the completion prompt. */
const CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}";

describe("server: OpenAI client", () => {
  let tmp: string;
  let engine: Engine;
  let server: RunningServer;
  let client: OpenAI;
  let base: string;

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), "inlaid-openai-"));
    const modelDir = join(tmp, "demo-chat");
    cpSync(DEMO_BASE, modelDir, { recursive: true });
    const cfgPath = join(modelDir, "tokenizer_config.json");
    const cfg = JSON.parse(readFileSync(cfgPath, "utf8")) as Record<string, unknown>;
    writeFileSync(cfgPath, JSON.stringify({ ...cfg, chat_template: CHAT_TEMPLATE }));
    engine = await createEngine({ modelDir, adapters: DEMO_ADAPTERS, device: "cpu" });
    base = engine.modelId;
    server = await startServer(engine, { host: "127.0.0.1", port: 0 });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  afterAll(async () => {
    await server?.close();
    await engine?.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("lists the base model and every adapter, adapters naming the base as parent", async () => {
    const models = [];
    for await (const m of client.models.list()) models.push(m as typeof m & { root: string; parent: string | null });
    expect(models.map((m) => m.id)).toEqual([base, ...DEMO_TASKS]);
    expect(models[0]).toMatchObject({ object: "model", owned_by: "inlaid", parent: null });
    for (const m of models.slice(1)) {
      expect(m.parent).toBe(base);
      expect(m.root).toBe(DEMO_ADAPTERS[m.id]);
    }
    expect((await client.models.retrieve("reverse")).id).toBe("reverse");
  });

  it("completes with the adapter the model names", async () => {
    const res = await client.completions.create({ model: "reverse", prompt: PROMPT, max_tokens: 12, temperature: 0 });
    expect(res.object).toBe("text_completion");
    expect(res.id).toMatch(/^cmpl-/);
    expect(res.model).toBe("reverse");
    expect(res.choices).toHaveLength(1);
    expect(res.choices[0]!.text).toBe(REVERSED);
    expect(res.choices[0]!.finish_reason).toBe("stop");
    expect(res.usage).toMatchObject({ prompt_tokens: 10 });
    expect(res.usage!.total_tokens).toBe(res.usage!.prompt_tokens + res.usage!.completion_tokens);
    // The base model's id selects no adapter: the base copies its prompt.
    const copy = await client.completions.create({ model: base, prompt: PROMPT, max_tokens: 12, temperature: 0 });
    expect(copy.choices[0]!.text).toBe(" kto bram zu");
  });

  it("streams the same text in deltas, with usage when asked", async () => {
    const plain = await client.completions.create({ model: "sort", prompt: PROMPT, max_tokens: 12, temperature: 0 });
    const stream = await client.completions.create({
      model: "sort", prompt: PROMPT, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true },
    });
    let text = "";
    let usage: OpenAI.CompletionUsage | null | undefined;
    let finish: string | null | undefined;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      if (chunk.usage) usage = chunk.usage;
      for (const ch of chunk.choices) {
        text += ch.text;
        if (ch.finish_reason) finish = ch.finish_reason;
      }
    }
    expect(chunks).toBeGreaterThan(2);
    expect(text).toBe(plain.choices[0]!.text);
    expect(finish).toBe(plain.choices[0]!.finish_reason);
    expect(usage).toEqual(plain.usage);
  });

  it("several prompts, n choices each, seeded sampling reproducible", async () => {
    const req = { model: "caesar", prompt: [PROMPT, "fh ro az yrukm ="], max_tokens: 8, temperature: 1, seed: 7, n: 2 };
    const a = await client.completions.create(req);
    const b = await client.completions.create(req);
    expect(a.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
    expect(b.choices.map((c) => c.text)).toEqual(a.choices.map((c) => c.text));
    // Token-id prompts are accepted too.
    const ids = engine.tokenizer.encode(PROMPT, true);
    const byIds = await client.completions.create({ model: "reverse", prompt: ids, max_tokens: 12, temperature: 0 });
    expect(byIds.choices[0]!.text).toBe(REVERSED);
    const echo = await client.completions.create({ model: "reverse", prompt: PROMPT, max_tokens: 12, temperature: 0, echo: true });
    expect(echo.choices[0]!.text).toBe(PROMPT + REVERSED);
  });

  it("completion logprobs have OpenAI's shape", async () => {
    const res = await client.completions.create({ model: "reverse", prompt: PROMPT, max_tokens: 12, temperature: 0, logprobs: 3 });
    const lp = res.choices[0]!.logprobs!;
    const n = res.usage!.completion_tokens;
    expect(lp.tokens).toHaveLength(n);
    expect(lp.token_logprobs).toHaveLength(n);
    expect(lp.top_logprobs).toHaveLength(n);
    expect(lp.text_offset).toHaveLength(n);
    expect(lp.text_offset![0]).toBe(0);
    expect(lp.tokens!.join("").startsWith(REVERSED)).toBe(true);
    lp.tokens!.forEach((tok, i) => {
      const top = lp.top_logprobs![i]!;
      expect(Object.keys(top).length).toBeGreaterThanOrEqual(3);
      expect(top[tok]).toBe(lp.token_logprobs![i]);
      expect(lp.token_logprobs![i]!).toBeLessThanOrEqual(0);
      if (i > 0) expect(lp.text_offset![i]).toBe(lp.text_offset![i - 1]! + lp.tokens![i - 1]!.length);
    });
    // Greedy: the chosen token is the most likely one.
    expect(Math.max(...Object.values(lp.top_logprobs![0]!))).toBe(lp.token_logprobs![0]);
  });

  it("chat completions render the chat template, plain and streamed, with chat-shaped logprobs", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: PROMPT }];
    const res = await client.chat.completions.create({
      model: "reverse", messages, max_completion_tokens: 12, temperature: 0, logprobs: true, top_logprobs: 2,
    });
    expect(res.object).toBe("chat.completion");
    expect(res.id).toMatch(/^chatcmpl-/);
    const choice = res.choices[0]!;
    expect(choice.message).toMatchObject({ role: "assistant", content: REVERSED });
    expect(choice.finish_reason).toBe("stop");
    // BOS comes from the template, not added again: the same 10 prompt tokens as the completion.
    expect(res.usage!.prompt_tokens).toBe(10);
    const content = choice.logprobs!.content!;
    expect(content).toHaveLength(res.usage!.completion_tokens);
    for (const t of content) {
      expect(typeof t.token).toBe("string");
      expect(t.bytes).toEqual([...Buffer.from(t.token, "utf8")]);
      expect(t.top_logprobs).toHaveLength(2);
      expect(t.top_logprobs[0]!.logprob).toBeGreaterThanOrEqual(t.top_logprobs[1]!.logprob);
    }

    // Array-of-parts content, streamed.
    const stream = await client.chat.completions.create({
      model: "reverse", messages: [{ role: "user", content: [{ type: "text", text: PROMPT }] }], max_tokens: 12, temperature: 0, stream: true,
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks[0]!.object).toBe("chat.completion.chunk");
    expect(chunks[0]!.choices[0]!.delta.role).toBe("assistant");
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? "").join("")).toBe(REVERSED);
    expect(chunks.at(-1)!.choices[0]!.finish_reason).toBe("stop");
  });

  it("an unknown model is a NotFoundError", async () => {
    const err = await client.completions.create({ model: "nope", prompt: PROMPT, max_tokens: 4 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect((err as InstanceType<typeof OpenAI.NotFoundError>).code).toBe("model_not_found");
    expect((err as Error).message).toMatch(/The model `nope` does not exist/);
    const chatErr = await client.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "a" }] }).catch((e: unknown) => e);
    expect(chatErr).toBeInstanceOf(OpenAI.NotFoundError);
  });

  it("loads and unloads an adapter while serving (vLLM's endpoints)", async () => {
    const load = await postJson(`${server.url}/v1/load_lora_adapter`, { lora_name: "reverse2", lora_path: DEMO_ADAPTERS["reverse"] });
    expect(load.status).toBe(200);
    expect(await load.text()).toBe("Success: LoRA adapter 'reverse2' added successfully.");
    const again = await postJson(`${server.url}/v1/load_lora_adapter`, { lora_name: "reverse2", lora_path: DEMO_ADAPTERS["reverse"] });
    expect(again.status).toBe(400);

    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids).toContain("reverse2");
    const res = await client.completions.create({ model: "reverse2", prompt: PROMPT, max_tokens: 12, temperature: 0 });
    expect(res.choices[0]!.text).toBe(REVERSED);

    const unload = await postJson(`${server.url}/v1/unload_lora_adapter`, { lora_name: "reverse2" });
    expect(unload.status).toBe(200);
    expect(await unload.text()).toBe("Success: LoRA adapter 'reverse2' removed successfully.");
    const gone = await postJson(`${server.url}/v1/unload_lora_adapter`, { lora_name: "reverse2" });
    expect(gone.status).toBe(404);
    expect((await errorOf(gone)).type).toBe("NotFoundError");
    await expect(client.completions.create({ model: "reverse2", prompt: PROMPT, max_tokens: 4 })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });

  it("exposes Prometheus metrics", async () => {
    const res = await fetch(`${server.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/^text\/plain/);
    const text = await res.text();
    expect(text).toMatch(/^inlaid_requests_total\{model="reverse",status="200"\} \d+/m);
    expect(text).toMatch(/^inlaid_requests_total\{model="",status="404"\} \d+/m);
    expect(text).toMatch(/^inlaid_prompt_tokens_total\{model="reverse"\} \d+/m);
    expect(text).toMatch(/^inlaid_generation_tokens_total\{model="reverse"\} \d+/m);
    for (const h of ["inlaid_e2e_latency_seconds", "inlaid_ttft_seconds", "inlaid_tpot_seconds"]) {
      expect(text).toMatch(new RegExp(`^${h}_count\\{model="reverse"\\} \\d+`, "m"));
    }
    expect(text).toMatch(new RegExp(`^inlaid_requests_running\\{adapter="${base}"\\} 0`, "m"));
    expect(text).toMatch(/^inlaid_requests_waiting\{adapter="mirror"\} 0/m);
    expect(text).toMatch(/^inlaid_kv_blocks_total \d+/m);
  });
});
