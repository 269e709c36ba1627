// End-to-end suites shared by the CPU run (CI) and the GPU run (`npm run test:gpu`):
// the same checks against whichever backend the engine is created on.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DeviceName } from "../../src/backend/select.js";
import { createEngine, type Engine } from "../../src/engine/engine.js";
import type { SamplingParams } from "../../src/engine/types.js";
import { GREEDY, collect } from "./collect.js";
import { DEMO_ADAPTERS, DEMO_BASE, readReference } from "./demo.js";

/** Greedy tokens equal to HF's; top-8 last-position logits within `logitTol`. */
export function referenceSuite(device: DeviceName, logitTol: number): void {
  const refs = readReference();
  describe(`demo reference on ${device}`, () => {
    let engine: Engine;
    beforeAll(async () => {
      engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device });
    });
    afterAll(async () => engine?.close());

    it("has 20 reference lines covering every adapter and the base", () => {
      expect(refs.length).toBe(20);
      expect(new Set(refs.map((r) => r.adapter))).toEqual(new Set([null, "reverse", "sort", "caesar", "mirror"]));
    });

    for (const [i, ref] of refs.entries()) {
      it(`line ${i} (${ref.adapter ?? "base"}): prompt ids, greedy tokens and top-8 logits`, async () => {
        expect(engine.backendName).toBe(device);
        expect(engine.tokenizer.encode(ref.prompt)).toEqual(ref.prompt_ids);
        const out = await collect(engine.generate({ id: `ref-${i}`, promptIds: ref.prompt_ids, adapter: ref.adapter, params: GREEDY }));
        const eos = new Set(engine.tokenizer.eosTokenIds);
        expect(out.tokenIds.filter((t) => !eos.has(t))).toEqual(ref.greedy_ids);
        expect(out.text).toBe(ref.greedy_text);

        const logits = engine.lastLogits(ref.prompt_ids, ref.adapter);
        const { ids, values } = ref.last_logits_top8;
        const worst = Math.max(...ids.map((id, k) => Math.abs(logits[id]! - values[k]!)));
        expect(worst).toBeLessThan(logitTol);
        // The same eight tokens are the eight largest. Under bf16 tolerances two
        // near-tied tokens at rank 8 may swap, so there only the leader must agree.
        const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!).slice(0, 8);
        if (logitTol <= 1e-2) expect(new Set(order)).toEqual(new Set(ids));
        else expect(order[0]).toBe(ids[0]);
      });
    }
  });
}

const PROMPTS = ["kto bram zu =", "fh ro az yrukm =", "clc ao htkom bslew pq jo =", "eh dwkg uto biwn xm =", "qiho ijqx mnvz dr uoa ="];
const ADAPTERS: (string | null)[] = ["reverse", "sort", "caesar", "mirror", null];
const SAMPLED: SamplingParams = { ...GREEDY, temperature: 0.9, topP: 0.95, topK: 50, seed: 1234, maxTokens: 20 };

/** One step mixing all four adapters and the base gives each request exactly the tokens it gets alone. */
export function mixedBatchSuite(device: DeviceName): void {
  describe(`mixed-adapter batches on ${device}`, () => {
    let engine: Engine;
    beforeAll(async () => {
      engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device });
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
        // The adapters really differ: one prompt, five different answers.
        if (label === "greedy") expect(new Set(together.slice(0, ADAPTERS.length).map((o) => o.text)).size).toBe(ADAPTERS.length);
      });
    }
  });
}
