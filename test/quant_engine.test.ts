// Serving RTN-quantized GPTQ checkpoints of the demo through the engine (CPU path:
// dequantize at load). 8 bits must keep the adapters' exact match where the unquantized
// base has it, on the first prompts of each eval set; 4 bits must load and run.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { readEvalJsonl, runExactMatch } from "../src/eval/exact_match.js";
import { loadModelConfig } from "../src/model/config.js";
import { SafetensorsDir } from "../src/model/safetensors.js";
import { writeQuantizedCheckpoint } from "../src/quant/checkpoint.js";
import { quantizeModelRtn } from "../src/quant/rtn.js";
import type { QuantSpec } from "../src/quant/types.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "./helpers/demo.js";

/** Prompts per task: enough to see a broken load, few enough to run in seconds. */
const LIMIT = 24;

function quantizeDemo(out: string, spec: QuantSpec): void {
  const src = SafetensorsDir.open(DEMO_BASE);
  try {
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: out, spec, weights: quantizeModelRtn(src, loadModelConfig(DEMO_BASE), spec) });
  } finally {
    src.close();
  }
}

describe("quantized demo checkpoints through createEngine (CPU)", () => {
  let work: string;
  let base: Engine, q8: Engine, q4: Engine;
  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), "inlaid-qengine-"));
    quantizeDemo(join(work, "rtn8"), { bits: 8, groupSize: 64, sym: false, descAct: false });
    quantizeDemo(join(work, "rtn4"), { bits: 4, groupSize: 64, sym: true, descAct: false });
    [base, q8, q4] = await Promise.all([
      createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu" }),
      createEngine({ modelDir: join(work, "rtn8"), adapters: DEMO_ADAPTERS, device: "cpu" }),
      createEngine({ modelDir: join(work, "rtn4"), adapters: DEMO_ADAPTERS, device: "cpu" }),
    ]);
  });
  afterAll(async () => {
    await Promise.all([base?.close(), q8?.close(), q4?.close()]);
    rmSync(work, { recursive: true, force: true });
  });

  it("the quantized weights are what the engine runs: logits move a little at 8 bits, more at 4", () => {
    const ids = base.tokenizer.encode("kto bram zu =");
    const ref = base.lastLogits(ids, "reverse");
    const diff = (e: Engine) => Math.max(...e.lastLogits(ids, "reverse").map((v, i) => Math.abs(v - ref[i]!)));
    const d8 = diff(q8), d4 = diff(q4);
    expect(d8).toBeGreaterThan(0);
    expect(d8).toBeLessThan(0.5);
    expect(d4).toBeGreaterThan(d8);
  });

  for (const task of DEMO_TASKS) {
    it(`${task}: 8-bit RTN exact match on the first ${LIMIT} prompts within one prompt of the unquantized base`, async () => {
      const rows = readEvalJsonl(join(DEMO, "data", task, "eval.jsonl"), LIMIT);
      const [b, q] = await Promise.all([runExactMatch(base, task, rows, { maxTokens: 48 }), runExactMatch(q8, task, rows, { maxTokens: 48 })]);
      expect(b.exactMatch).toBeGreaterThanOrEqual(0.9);
      expect(q.exactMatch).toBeGreaterThanOrEqual(b.exactMatch - 1 / LIMIT);
    });
  }

  it("4-bit RTN loads and generates with every adapter and the base", async () => {
    for (const adapter of [...DEMO_TASKS, null]) {
      const out = await collect(q4.generate({ id: `q4-${adapter}`, promptIds: q4.tokenizer.encode("eh dwkg uto biwn xm ="), adapter, params: { ...GREEDY, maxTokens: 16 } }));
      expect(out.tokenIds.length, adapter ?? "base").toBeGreaterThan(0);
    }
    const rows = readEvalJsonl(join(DEMO, "data", "reverse", "eval.jsonl"), 8);
    const r = await runExactMatch(q4, "reverse", rows, { maxTokens: 48 });
    expect(r.n).toBe(8);
  });
});
