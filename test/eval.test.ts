// The demo adapters' 200-prompt eval sets through the engine: exact match >= 0.93 each
// (HF transformers + PEFT scores reverse 0.995, sort 0.945, caesar 1.0, mirror 0.98).

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { readEvalJsonl, runExactMatch } from "../src/eval/exact_match.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "./helpers/demo.js";
import { join } from "node:path";

const REFERENCE: Record<string, number> = { reverse: 0.995, sort: 0.945, caesar: 1.0, mirror: 0.98 };

describe("demo eval (CPU)", () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu" });
  });
  afterAll(async () => engine?.close());

  for (const task of DEMO_TASKS) {
    it(`${task}: exact match >= 0.93 on 200 prompts, equal to the reference implementation's`, async () => {
      const rows = readEvalJsonl(join(DEMO, "data", task, "eval.jsonl"));
      expect(rows.length).toBe(200);
      const r = await runExactMatch(engine, task, rows, { maxTokens: 48 });
      expect(r.exactMatch).toBeGreaterThanOrEqual(0.93);
      expect(r.exactMatch).toBeCloseTo(REFERENCE[task]!, 3);
    });
  }
});
