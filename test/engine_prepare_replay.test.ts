// The engine's use of Backend.prepareReplaySample (a backend that prepares and replays a
// decode step in one call: CUDA with INLAID_UPLOAD_IN_GRAPH=1). Given to the CPU backend
// here, as prepare + forward at the call and sampling at wait(), it must be used for every
// decode-only step and no other, and every request must get the tokens it gets without it.
import { afterAll, describe, expect, it } from "vitest";
import type { PendingSample, PreparedStep, StepBatch, Tensor } from "../src/backend/backend.js";
import { CpuBackend } from "../src/backend/cpu/cpu_backend.js";
import { createEngine, type Engine } from "../src/engine/engine.js";
import type { SamplingParams } from "../src/engine/types.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE } from "./helpers/demo.js";

const ADAPTERS: (string | null)[] = ["reverse", null, "sort", "caesar", "mirror", "reverse"];
const PROMPTS = ["kto bram zu =", "fh ro az yrukm =", "clc ao htkom bslew pq jo =", "eh dwkg uto biwn xm =", "qiho ijqx mnvz dr uoa =", "ab cd ef ="];

type Proto = { prepareReplaySample?: (batch: StepBatch, key: string, forward: (step: PreparedStep) => Tensor) => { step: PreparedStep; pending: PendingSample } };

describe("engine with a backend that prepares and replays decode steps in one call", () => {
  const proto = CpuBackend.prototype as unknown as Proto & CpuBackend;
  const steps = { combined: 0, combinedNotDecode: 0 };
  afterAll(() => {
    delete proto.prepareReplaySample;
  });

  const runAll = async (engine: Engine, params: SamplingParams) =>
    Promise.all(PROMPTS.map((p, i) => collect(engine.generate({
      id: `pr-${i}`, promptIds: engine.tokenizer.encode(p), adapter: ADAPTERS[i]!, params: { ...params, maxTokens: 12 + 3 * i, ignoreEos: true },
    }))));

  it("uses it for every decode-only step, and the tokens are unchanged (greedy and seeded sampling)", async () => {
    const seeded: SamplingParams = { ...GREEDY, temperature: 0.8, topP: 0.9, topK: 40, seed: 11 };
    const plain = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu", maxModelLen: 96 });
    const want = [await runAll(plain, GREEDY), await runAll(plain, seeded)];
    await plain.close();

    proto.prepareReplaySample = function (this: CpuBackend, batch, key, forward) {
      expect(key).toBe("decode");
      if (batch.numTokens === batch.numSeqs) steps.combined++;
      else steps.combinedNotDecode++;
      const step = this.prepare(batch);
      const logits = forward(step);
      return { step, pending: { wait: () => this.sample(logits, step) } };
    };
    const engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu", maxModelLen: 96 });
    try {
      const got = [await runAll(engine, GREEDY), await runAll(engine, seeded)];
      for (const r of [0, 1]) {
        for (let i = 0; i < PROMPTS.length; i++) expect(got[r]![i]!.tokenIds, `run ${r} request ${i}`).toEqual(want[r]![i]!.tokenIds);
      }
      const { decodeSteps } = engine.stats();
      expect(steps.combinedNotDecode).toBe(0);
      expect(steps.combined).toBe(decodeSteps);
      expect(steps.combined).toBeGreaterThan(20);
    } finally {
      await engine.close();
    }
  });
});
