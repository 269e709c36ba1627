// The engine's step bookkeeping under churn: sequences preempted and readmitted when the
// KV cache runs out, aborted mid-stream, and batches that shrink and grow, must each give
// every request the tokens it gets alone (the engine reuses its step arrays, rows and
// batch views from step to step, rewriting only what changed).

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import type { SamplingParams } from "../src/engine/types.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE } from "./helpers/demo.js";

const ADAPTERS: (string | null)[] = ["reverse", null, "sort", "caesar", "mirror"];
const PROMPTS = ["kto bram zu =", "fh ro az yrukm =", "clc ao htkom bslew pq jo =", "eh dwkg uto biwn xm =", "qiho ijqx mnvz dr uoa ="];

describe("engine steps under churn (cpu)", () => {
  let engine: Engine;
  const blockSize = 4;
  const blocks = 20;
  beforeAll(async () => {
    const probe = await createEngine({ modelDir: DEMO_BASE, device: "cpu", maxModelLen: 64, blockSize, kvCacheBytes: 2 ** 20 });
    const { kvBlocksTotal } = probe.stats();
    await probe.close();
    // The same engine with `blocks` blocks: bytes per block from the probe's count.
    const bytesPerBlock = Math.floor(2 ** 20 / kvBlocksTotal);
    engine = await createEngine({
      modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu", maxModelLen: 64, blockSize, kvCacheBytes: bytesPerBlock * blocks + 1,
    });
  });
  afterAll(async () => engine?.close());

  const cases = Array.from({ length: 10 }, (_, i) => ({ p: PROMPTS[i % PROMPTS.length]!, a: ADAPTERS[i % ADAPTERS.length]!, max: 20 + 3 * i }));
  const run = (c: (typeof cases)[number], i: number, params: SamplingParams, signal?: AbortSignal) =>
    collect(engine.generate({
      id: `churn-${i}`, promptIds: engine.tokenizer.encode(c.p), adapter: c.a, params: { ...params, maxTokens: c.max, ignoreEos: true },
    }, signal));

  it("preempted and readmitted sequences, seeded sampling: the tokens each gets alone", async () => {
    expect(engine.stats().kvBlocksTotal).toBe(blocks);
    const params: SamplingParams = { ...GREEDY, temperature: 0.8, topP: 0.9, topK: 40, seed: 7 };
    const alone = [];
    for (const [i, c] of cases.entries()) alone.push(await run(c, i, params));
    // Together they need far more than the cache holds (each ends with 8 to 20 blocks of
    // 4 tokens, 20 blocks in all), so sequences are preempted and recomputed.
    const needed = cases.reduce((n, c) => n + Math.ceil((engine.tokenizer.encode(c.p).length + c.max) / blockSize), 0);
    expect(needed).toBeGreaterThan(3 * blocks);
    const together = await Promise.all(cases.map((c, i) => run(c, i, params)));
    for (let i = 0; i < cases.length; i++) {
      expect(together[i]!.tokenIds, `case ${i}`).toEqual(alone[i]!.tokenIds);
      expect(together[i]!.finishReason).toBe("length");
    }
    expect(engine.stats().kvBlocksUsed).toBe(0);
  });

  it("aborting some requests mid-stream leaves the others' tokens unchanged", async () => {
    const alone = [];
    for (const [i, c] of cases.entries()) alone.push(await run(c, i, GREEDY));
    const controllers = cases.map(() => new AbortController());
    const together = await Promise.all(cases.map(async (c, i) => {
      const it = engine.generate({
        id: `abort-${i}`, promptIds: engine.tokenizer.encode(c.p), adapter: c.a, params: { ...GREEDY, maxTokens: c.max, ignoreEos: true },
      }, controllers[i]!.signal);
      const tokens: number[] = [];
      let reason: string | null = null;
      for await (const o of it) {
        tokens.push(...o.tokenIds);
        reason = o.finishReason;
        // Every third request goes away after its fifth token.
        if (i % 3 === 1 && tokens.length >= 5) controllers[i]!.abort();
      }
      return { tokens, reason };
    }));
    for (let i = 0; i < cases.length; i++) {
      if (i % 3 === 1) {
        expect(together[i]!.reason).toBe("abort");
        expect(together[i]!.tokens).toEqual(alone[i]!.tokenIds.slice(0, together[i]!.tokens.length));
      } else {
        expect(together[i]!.reason).toBe("length");
        expect(together[i]!.tokens, `case ${i}`).toEqual(alone[i]!.tokenIds);
      }
    }
    expect(engine.stats().kvBlocksUsed).toBe(0);
  });

  it("lastLogits between steps does not disturb the next batch", async () => {
    const c = cases[2]!;
    const a = await run(c, 0, GREEDY);
    engine.lastLogits(engine.tokenizer.encode("zz yy ="), "sort");
    const b = await run(c, 0, GREEDY);
    expect(b.tokenIds).toEqual(a.tokenIds);
  });
});
