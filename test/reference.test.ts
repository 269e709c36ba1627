// The demo's reference outputs (HF transformers + PEFT, fp32 over the bf16 checkpoint)
// reproduced by the CPU backend: greedy tokens exactly, last-position logits within 1e-2.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CpuBackend } from "../src/backend/cpu/cpu_backend.js";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE, readReference } from "./helpers/demo.js";

const refs = readReference();

describe("demo reference (CPU backend)", () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu" });
  });
  afterAll(async () => engine?.close());

  it("has 20 reference lines covering every adapter and the base", () => {
    expect(refs.length).toBe(20);
    expect(new Set(refs.map((r) => r.adapter))).toEqual(new Set([null, "reverse", "sort", "caesar", "mirror"]));
  });

  for (const [i, ref] of refs.entries()) {
    it(`line ${i} (${ref.adapter ?? "base"}): prompt ids, greedy tokens and top-8 logits`, async () => {
      expect(engine.tokenizer.encode(ref.prompt)).toEqual(ref.prompt_ids);
      const out = await collect(engine.generate({ id: `ref-${i}`, promptIds: ref.prompt_ids, adapter: ref.adapter, params: GREEDY }));
      const eos = new Set(engine.tokenizer.eosTokenIds);
      expect(out.tokenIds.filter((t) => !eos.has(t))).toEqual(ref.greedy_ids);
      expect(out.text).toBe(ref.greedy_text);

      const logits = engine.lastLogits(ref.prompt_ids, ref.adapter);
      const { ids, values } = ref.last_logits_top8;
      for (let k = 0; k < ids.length; k++) expect(Math.abs(logits[ids[k]!]! - values[k]!)).toBeLessThan(1e-2);
      // The same eight tokens are the eight largest.
      const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!).slice(0, 8);
      expect(new Set(order)).toEqual(new Set(ids));
    });
  }

  it("the CPU backend is what ran", () => {
    expect(engine.backendName).toBe(new CpuBackend().name);
  });
});
