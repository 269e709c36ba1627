// Multi-step decoding (EngineOptions.schedulerSteps) must not change any request's output:
// the same requests run with one decode step per round and with `steps` per round, and
// every token, logprob, finish reason and text must match. Shared by the CPU test and the
// GPU one (test/gpu/multistep.test.ts), which differ only in the device and tolerance.
import { expect } from "vitest";
import type { PendingSteps, PreparedStep, Tensor } from "../../src/backend/backend.js";
import { createEngine, type Engine } from "../../src/engine/engine.js";
import type { SamplingParams } from "../../src/engine/types.js";
import { GREEDY, collect, type Collected } from "./collect.js";
import { DEMO_ADAPTERS, DEMO_BASE } from "./demo.js";

const ADAPTERS: (string | null)[] = ["reverse", null, "sort", "caesar", "mirror", "reverse", "sort"];
const PROMPTS = ["kto bram zu =", "fh ro az yrukm =", "clc ao htkom bslew pq jo =", "eh dwkg uto biwn xm =", "qiho ijqx mnvz dr uoa =", "ab cd ef =", "zz yy xx ww ="];

/** Per request: max tokens (some not a multiple of the steps, one shorter than a round), EOS honoured or not, a stop string, logprobs. */
function params(i: number, base: SamplingParams): SamplingParams {
  return {
    ...base,
    maxTokens: [13, 22, 3, 17, 30, 9, 25][i]!,
    ignoreEos: i % 2 === 0,
    stop: i === 3 ? ["o"] : [],
    logprobs: i === 1 ? 3 : i === 4 ? 0 : -1,
  };
}

async function runAll(engine: Engine, base: SamplingParams): Promise<Collected[]> {
  return Promise.all(PROMPTS.map((p, i) => collect(engine.generate({
    id: `ms-${i}`, promptIds: engine.tokenizer.encode(p), adapter: ADAPTERS[i]!, params: params(i, base),
  }))));
}

type Proto = { decodeSteps?: (n: number, key: string, forward: (step: PreparedStep) => Tensor, step: PreparedStep, blockSize: number) => PendingSteps };

/**
 * Runs the requests greedy and seeded (temperature, top-p, top-k) with 1 and `steps`
 * scheduler steps on `device`, and checks they match (logprobs within `tol`) and that
 * the multi-step run used `proto.decodeSteps` for most of its decode steps.
 */
export async function checkMultiStep(device: "cpu" | "cuda", proto: Proto, steps: number, tol: number): Promise<void> {
  const seeded: SamplingParams = { ...GREEDY, temperature: 0.8, topP: 0.9, topK: 40, seed: 11 };
  const opts = { modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device, maxModelLen: 96 } as const;
  const single = await createEngine({ ...opts, schedulerSteps: 1 });
  let want: Collected[][];
  try {
    want = [await runAll(single, GREEDY), await runAll(single, seeded)];
  } finally {
    await single.close();
  }
  const original = proto.decodeSteps!;
  let calls = 0, stepsIssued = 0;
  proto.decodeSteps = function (this: unknown, n, key, forward, step, blockSize) {
    calls++;
    stepsIssued += n;
    return original.call(this, n, key, forward, step, blockSize);
  };
  const multi = await createEngine({ ...opts, schedulerSteps: steps });
  try {
    const got = [await runAll(multi, GREEDY), await runAll(multi, seeded)];
    for (const r of [0, 1]) {
      for (let i = 0; i < PROMPTS.length; i++) {
        const g = got[r]![i]!, w = want[r]![i]!, what = `run ${r} request ${i}`;
        expect(g.tokenIds, what).toEqual(w.tokenIds);
        expect(g.text, what).toBe(w.text);
        expect(g.finishReason, what).toBe(w.finishReason);
        const lg = g.outputs.flatMap((o) => o.logprobs), lw = w.outputs.flatMap((o) => o.logprobs);
        expect(lg.length, what).toBe(lw.length);
        for (let t = 0; t < lw.length; t++) {
          expect(lg[t]!.tokenId).toBe(lw[t]!.tokenId);
          expect(Math.abs(lg[t]!.logprob - lw[t]!.logprob), `${what} token ${t}`).toBeLessThanOrEqual(tol);
          expect(lg[t]!.top.map((x) => x.tokenId), `${what} token ${t}`).toEqual(lw[t]!.top.map((x) => x.tokenId));
        }
      }
    }
    const { decodeSteps } = multi.stats();
    expect(calls).toBeGreaterThan(0);
    expect(stepsIssued).toBe(calls * steps);
    // Most decode steps ran in rounds (the rest: rounds no request had room for).
    expect(stepsIssued / decodeSteps).toBeGreaterThan(0.5);
  } finally {
    proto.decodeSteps = original;
    await multi.close();
  }
}
