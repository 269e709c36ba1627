// The server under bad and hostile input: every refusal is an OpenAI-shaped error with
// the right status, nothing leaks a sequence, and the server keeps serving afterwards.

import { cpSync, mkdtempSync, rmSync, statSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import type { GenerateOutput, GenerateRequest, ServingEngine } from "../src/engine/types.js";
import { createApp, startServer, type RunningServer } from "../src/server/app.js";
import { DEMO_ADAPTERS, DEMO_BASE, readReference } from "./helpers/demo.js";
import { errorOf, postJson, readSse, waitFor } from "./helpers/http.js";

interface CompletionChunk {
  choices: { index: number; text: string; finish_reason: string | null }[];
}

describe("server: bad input", () => {
  let engine: Engine;
  let server: RunningServer;
  let tmp: string;
  const url = (path: string) => `${server.url}${path}`;
  const complete = (body: unknown) => postJson(url("/v1/completions"), body);
  const metricsText = async () => (await fetch(url("/metrics"))).text();
  const idle = () => {
    const s = engine.stats();
    return [...s.running.values(), ...s.waiting.values()].every((n) => n === 0);
  };

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), "inlaid-server-"));
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu" });
    server = await startServer(engine, { host: "127.0.0.1", port: 0 });
  });
  afterAll(async () => {
    await server?.close();
    await engine?.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("malformed JSON is a 400", async () => {
    const res = await complete('{"model": "reverse", "prompt": ');
    expect(res.status).toBe(400);
    const err = await errorOf(res);
    expect(err.code).toBe("invalid_json");
    expect(err.type).toBe("BadRequestError");
    expect((await errorOf(await complete("[1, 2]"))).message).toMatch(/JSON object/);
  });

  it("wrong types are 400s naming the field and what was expected", async () => {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [{ prompt: 5 }, "prompt", /string, an array of strings, an array of token ids/],
      [{ prompt: "a =", temperature: "hot" }, "temperature", /expected a number, got the string "hot"/],
      [{ prompt: 5, temperature: "hot" }, "prompt", /'prompt'.*'temperature'/],
      [{ prompt: "a =", max_tokens: "x" }, "max_tokens", /expected .*number.*got the string "x"/],
      [{ prompt: "a =", max_tokens: 2.5 }, "max_tokens", /expected an integer, got 2.5/],
      [{ prompt: "a =", stream: "yes" }, "stream", /boolean/],
      [{ prompt: "a =", top_p: 0 }, "top_p", /> 0/],
      [{ prompt: "a =", logprobs: 50 }, "logprobs", /<= 20/],
      [{ prompt: "a =", stop: [1] }, "stop", /string or an array of strings/],
      [{}, "prompt", /required/],
    ];
    for (const [body, param, message] of cases) {
      const res = await complete({ model: "reverse", ...body });
      expect(res.status, JSON.stringify(body)).toBe(400);
      const err = await errorOf(res);
      expect(err.param, JSON.stringify(body)).toBe(param);
      expect(err.message, JSON.stringify(body)).toMatch(message);
    }
    const chat = await postJson(url("/v1/chat/completions"), { model: "reverse", messages: [{ role: "user", content: 7 }] });
    expect(chat.status).toBe(400);
    expect((await errorOf(chat)).param).toBe("messages[0].content");
  });

  it("max_tokens below 1 or beyond the context window is a 400 naming max_tokens and the limit", async () => {
    for (const max of [-5, 0]) {
      const err = await errorOf(await complete({ model: "reverse", prompt: "kto bram zu =", max_tokens: max }));
      expect(err.param).toBe("max_tokens");
      expect(err.message).toMatch(/max_tokens must be at least 1/);
    }
    const res = await complete({ model: "reverse", prompt: "kto bram zu =", max_tokens: 1_000_000 });
    expect(res.status).toBe(400);
    const err = await errorOf(res);
    expect(err.param).toBe("max_tokens");
    // The prompt is 10 tokens (BOS included) of a 512-token window.
    expect(err.message).toMatch(/512/);
    expect(err.message).toMatch(/at most 502/);
    expect(idle()).toBe(true);
  });

  it("a prompt beyond the context window is a 413 context_length_exceeded", async () => {
    const res = await complete({ model: "reverse", prompt: "kto bram zu ".repeat(200) + "=" });
    expect(res.status).toBe(413);
    const err = await errorOf(res);
    expect(err.code).toBe("context_length_exceeded");
    expect(err.param).toBe("prompt");
    expect(err.message).toMatch(/maximum context length is 512 tokens/);
    // Token-id prompts too, and one bad prompt in a list refuses the whole request before anything runs.
    const ids = await complete({ model: "reverse", prompt: [[1, 77], new Array(600).fill(77)] });
    expect(ids.status).toBe(413);
    expect(idle()).toBe(true);
  });

  it("other refusals: unknown model, chat without a template, unsupported fields", async () => {
    const nope = await complete({ model: "nope", prompt: "a =" });
    expect(nope.status).toBe(404);
    expect(await errorOf(nope)).toEqual({
      message: "The model `nope` does not exist.", type: "NotFoundError", param: "model", code: "model_not_found",
    });
    const chat = await postJson(url("/v1/chat/completions"), { model: "reverse", messages: [{ role: "user", content: "a =" }] });
    expect(chat.status).toBe(400);
    expect((await errorOf(chat)).message).toMatch(/\/v1\/completions/);
    const echo = await complete({ model: "reverse", prompt: "a =", echo: true, logprobs: 1 });
    expect(echo.status).toBe(400);
    expect((await errorOf(echo)).param).toBe("echo");
    const penalty = await complete({ model: "reverse", prompt: "a =", presence_penalty: 1 });
    expect((await errorOf(penalty)).param).toBe("presence_penalty");
    const outOfVocab = await complete({ model: "reverse", prompt: [1, 999_999] });
    expect(outOfVocab.status).toBe(400);
    expect(idle()).toBe(true);
  });

  it("a 64 MB body is refused with 413 without killing the server", async () => {
    const big = JSON.stringify({ model: "reverse", prompt: "x".repeat(64 * 1024 * 1024) });
    const res = await complete(big);
    expect(res.status).toBe(413);
    expect((await errorOf(res)).message).toMatch(/16777216 bytes/);
    // Chunked (no Content-Length): counted as it arrives.
    const chunks = (async function* () {
      for (let i = 0; i < 64; i++) yield new Uint8Array(1024 * 1024).fill(0x20);
    })();
    const chunked = await fetch(url("/v1/completions"), {
      method: "POST", body: ReadableStream.from(chunks), duplex: "half",
    } as RequestInit & { duplex: "half" });
    expect(chunked.status).toBe(413);
    expect((await fetch(url("/health"))).status).toBe(200);
  });

  it("load_lora_adapter refuses missing fields, a missing path and a truncated adapter with 400", async () => {
    const missing = await postJson(url("/v1/load_lora_adapter"), { lora_name: "x" });
    expect(missing.status).toBe(400);
    expect((await errorOf(missing)).param).toBe("lora_path");

    const noPath = await postJson(url("/v1/load_lora_adapter"), { lora_name: "x", lora_path: join(tmp, "does-not-exist") });
    expect(noPath.status).toBe(400);
    expect((await errorOf(noPath)).message).toMatch(/does-not-exist.*not a folder/);

    const cut = join(tmp, "truncated");
    cpSync(DEMO_ADAPTERS["reverse"]!, cut, { recursive: true });
    const weights = join(cut, "adapter_model.safetensors");
    truncateSync(weights, Math.floor(statSync(weights).size / 2));
    const truncated = await postJson(url("/v1/load_lora_adapter"), { lora_name: "cut", lora_path: cut });
    expect(truncated.status).toBe(400);
    const err = await errorOf(truncated);
    expect(err.message).toMatch(/truncated/);
    expect(err.type).toBe("BadRequestError");

    const unknown = await postJson(url("/v1/unload_lora_adapter"), { lora_name: "cut" });
    expect(unknown.status).toBe(404);
    const models = (await (await fetch(url("/v1/models"))).json()) as { data: { id: string }[] };
    expect(models.data.map((m) => m.id)).not.toContain("cut");
  });

  it("unknown routes are 404 and wrong methods 405, OpenAI-shaped", async () => {
    const nf = await fetch(url("/v1/nothing"));
    expect(nf.status).toBe(404);
    expect((await errorOf(nf)).type).toBe("NotFoundError");
    const wrong = await fetch(url("/v1/completions"));
    expect(wrong.status).toBe(405);
    expect(wrong.headers.get("allow")).toBe("POST");
    expect((await errorOf(wrong)).code).toBe("method_not_allowed");
  });

  it("200 concurrent streaming requests over all adapters all complete with the right text", async () => {
    // Greedy references cut to their first 8 tokens keep this quick on a CPU.
    const refs = readReference().map((r) => ({ ...r, ids: r.greedy_ids.slice(0, 8) }));
    const jobs = Array.from({ length: 200 }, (_, i) => refs[i % refs.length]!);
    const results = await Promise.all(
      jobs.map(async (r) => {
        const res = await complete({ model: r.adapter ?? engine.modelId, prompt: r.prompt, max_tokens: r.ids.length, temperature: 0, stream: true });
        expect(res.status).toBe(200);
        const { events, done } = await readSse<CompletionChunk>(res);
        return { done, text: events.map((e) => e.choices[0]?.text ?? "").join(""), finish: events.at(-1)?.choices[0]?.finish_reason };
      }),
    );
    results.forEach((got, i) => {
      const job = jobs[i]!;
      expect(got.done).toBe(true);
      expect(got.text, `${job.adapter}: ${job.prompt}`).toBe(engine.tokenizer.decode(job.ids));
      expect(got.finish).toBe("length");
    });
    expect(await waitFor(idle, 2000)).toBe(true);
  });

  it("a client that disconnects mid-stream frees its sequence", async () => {
    const before = generatedTokens(await metricsText());
    const abort = new AbortController();
    const res = await fetch(url("/v1/completions"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: engine.modelId, prompt: "kto bram zu =", max_tokens: 500, ignore_eos: true, stream: true }),
      signal: abort.signal,
    });
    const reader = res.body!.getReader();
    const first = await reader.read();
    expect(new TextDecoder().decode(first.value)).toMatch(/^data: /);
    abort.abort();
    // 500 tokens take seconds on CPU; the abort frees the sequence long before.
    expect(await waitFor(idle, 2000)).toBe(true);
    const text = await metricsText();
    expect(generatedTokens(text) - before).toBeLessThan(400);
    expect(text).toMatch(/inlaid_requests_total\{model="base",status="499"\} 1/);
  });

  it("afterwards the server still answers correctly", async () => {
    const res = await complete({ model: "reverse", prompt: "kto bram zu =", max_tokens: 12, temperature: 0 });
    expect(res.status).toBe(200);
    const json = (await res.json()) as { choices: { text: string }[] };
    expect(json.choices[0]!.text).toBe(" zu bram kto");
    expect((await fetch(url("/health"))).status).toBe(200);
    expect(idle()).toBe(true);
  });

  it("--api-key guards /v1/* with 401 and leaves /health and /metrics open", async () => {
    const guarded = await startServer(engine, { host: "127.0.0.1", port: 0, apiKey: "sekret" });
    try {
      const body = { model: "reverse", prompt: "kto bram zu =", max_tokens: 12, temperature: 0 };
      for (const headers of [{}, { Authorization: "Bearer wrong" }, { Authorization: "sekret" }] as Record<string, string>[]) {
        const res = await postJson(`${guarded.url}/v1/completions`, body, headers);
        expect(res.status).toBe(401);
        const err = await errorOf(res);
        expect(err.type).toBe("AuthenticationError");
        expect(err.code).toBe("invalid_api_key");
      }
      expect((await fetch(`${guarded.url}/v1/models`)).status).toBe(401);
      const ok = await postJson(`${guarded.url}/v1/completions`, body, { Authorization: "Bearer sekret" });
      expect(ok.status).toBe(200);
      expect((await fetch(`${guarded.url}/health`)).status).toBe(200);
      expect((await fetch(`${guarded.url}/metrics`)).status).toBe(200);
    } finally {
      await guarded.close();
    }
  });

  it("closing the server ends open streams and frees their sequences", async () => {
    const closing = await startServer(engine, { host: "127.0.0.1", port: 0 });
    const res = await postJson(`${closing.url}/v1/completions`, {
      model: "mirror", prompt: "kto bram zu =", max_tokens: 500, ignore_eos: true, stream: true,
    });
    const reader = res.body!.getReader();
    await reader.read();
    const t0 = performance.now();
    await closing.close();
    let rest = "";
    for (let r = await reader.read(); !r.done; r = await reader.read()) rest += new TextDecoder().decode(r.value);
    expect(performance.now() - t0).toBeLessThan(1500);
    // The stream says why it ended, then ends properly.
    expect(rest).toMatch(/"code":"request_cancelled"/);
    expect(rest.endsWith("data: [DONE]\n\n")).toBe(true);
    expect(await waitFor(idle, 1000)).toBe(true);
    await expect(fetch(`${closing.url}/health`)).rejects.toThrow();
  });

  it("an exception inside a handler is a 500 without a stack trace, and the app keeps serving", async () => {
    const { app } = createApp(throwingEngine(engine));
    // The server logs the stack of a 500 on stderr (for its operator), never in the response.
    const stderr = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    let res: Response;
    try {
      res = await app.request("/v1/completions", {
        method: "POST", body: JSON.stringify({ model: "reverse", prompt: "boom =", max_tokens: 4 }),
      });
      expect(stderr).toHaveBeenCalledWith(expect.stringMatching(/undefined is not a function/));
    } finally {
      stderr.mockRestore();
    }
    expect(res.status).toBe(500);
    const err = await errorOf(res);
    expect(err.type).toBe("InternalServerError");
    expect(err.message).not.toMatch(/\bat .*\.ts:\d+/);
    const ok = await app.request("/v1/completions", {
      method: "POST", body: JSON.stringify({ model: "reverse", prompt: "kto bram zu =", max_tokens: 12, temperature: 0 }),
    });
    expect(ok.status).toBe(200);
  });
});

function generatedTokens(metrics: string): number {
  return [...metrics.matchAll(/^inlaid_generation_tokens_total\{[^}]*\} (\d+)/gm)].reduce((s, m) => s + Number(m[1]), 0);
}

/** The real engine, except that generating from a prompt containing "boom" throws (a bug in the engine). */
function throwingEngine(engine: ServingEngine): ServingEngine {
  const boom = engine.tokenizer.encode("boom =", true).join(",");
  return {
    get modelId() { return engine.modelId; },
    get maxModelLen() { return engine.maxModelLen; },
    get tokenizer() { return engine.tokenizer; },
    generate(req: GenerateRequest, signal?: AbortSignal): AsyncIterable<GenerateOutput> {
      if (req.promptIds.join(",") === boom) throw new TypeError("undefined is not a function");
      return engine.generate(req, signal);
    },
    listAdapters: () => engine.listAdapters(),
    loadAdapter: (n, p) => engine.loadAdapter(n, p),
    unloadAdapter: (n) => engine.unloadAdapter(n),
    stats: () => engine.stats(),
    close: () => engine.close(),
  };
}
