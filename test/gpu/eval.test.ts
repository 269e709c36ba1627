// The demo eval on the CUDA backend: exact match within one point of the CPU backend's
// (which equals HF + PEFT's: reverse 0.995, sort 0.945, caesar 1.0, mirror 0.98).
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../../src/engine/engine.js";
import { readEvalJsonl, runExactMatch } from "../../src/eval/exact_match.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "../helpers/demo.js";
import { HAS_GPU, NO_GPU_REASON } from "./gpu.js";

const CPU: Record<string, number> = { reverse: 0.995, sort: 0.945, caesar: 1.0, mirror: 0.98 };

describe.skipIf(!HAS_GPU)(`demo eval on cuda${HAS_GPU ? "" : ` (skipped: ${NO_GPU_REASON})`}`, () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cuda" });
  });
  afterAll(async () => engine?.close());

  for (const task of DEMO_TASKS) {
    it(`${task}: exact match within 0.01 of the CPU backend`, async () => {
      const rows = readEvalJsonl(join(DEMO, "data", task, "eval.jsonl"));
      const r = await runExactMatch(engine, task, rows, { maxTokens: 48 });
      console.log(JSON.stringify({ eval: task, device: "cuda", exact_match: r.exactMatch, cpu: CPU[task], seconds: r.seconds, tokens_per_s: r.tokensPerS }));
      expect(Math.abs(r.exactMatch - CPU[task]!)).toBeLessThanOrEqual(0.01 + 1e-9);
    });
  }
});
