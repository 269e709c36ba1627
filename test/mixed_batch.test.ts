// Heterogeneous batches: one step mixing all four adapters and the base gives each
// request exactly the tokens it gets alone.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import type { SamplingParams } from "../src/engine/types.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE } from "./helpers/demo.js";

const PROMPTS = ["kto bram zu =", "fh ro az yrukm =", "clc ao htkom bslew pq jo =", "eh dwkg uto biwn xm =", "qiho ijqx mnvz dr uoa ="];
const ADAPTERS: (string | null)[] = ["reverse", "sort", "caesar", "mirror", null];
const SAMPLED: SamplingParams = { ...GREEDY, temperature: 0.9, topP: 0.95, topK: 50, seed: 1234, maxTokens: 20 };

describe("mixed-adapter batches", () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu" });
  });
  afterAll(async () => engine?.close());

  for (const [label, params] of [["greedy", GREEDY], ["seeded sampling", SAMPLED]] as const) {
    it(`${label}: every (prompt, adapter) pair yields the same tokens alone and in one mixed batch`, async () => {
      const cases = PROMPTS.flatMap((p) => ADAPTERS.map((a) => ({ p, a })));
      const run = (c: { p: string; a: string | null }, i: number) =>
        collect(engine.generate({ id: `${label}-${i}`, promptIds: engine.tokenizer.encode(c.p), adapter: c.a, params }));
      const alone = [];
      for (const [i, c] of cases.entries()) alone.push(await run(c, i));
      const stepsBefore = engine.stats().steps;
      const together = await Promise.all(cases.map(run));
      // The whole set ran together: far fewer steps than running them one by one.
      const stepsAlone = alone.reduce((n, o) => n + o.tokenIds.length, 0);
      expect(engine.stats().steps - stepsBefore).toBeLessThan(stepsAlone / 4);
      for (let i = 0; i < cases.length; i++) {
        expect(together[i]!.tokenIds, `${cases[i]!.a ?? "base"}: ${cases[i]!.p}`).toEqual(alone[i]!.tokenIds);
      }
      // And the adapters really differ: one prompt, five different answers.
      const firstPrompt = together.slice(0, ADAPTERS.length).map((o) => o.text);
      if (label === "greedy") expect(new Set(firstPrompt).size).toBe(ADAPTERS.length);
    });
  }
});
