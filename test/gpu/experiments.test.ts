// The CUDA switches still being measured (README's environment table), all on, through
// end-to-end checks on the GPU: the demo's reference tokens identical and top-8 logits
// within 5e-2, mixed batches equal single requests, and on a 4-bit demo checkpoint (whose
// adapters take the unattached LoRA path) exact match within one prompt of the same
// checkpoint with the switches off. Every switch is read when a backend is created, and
// each test file runs in its own process, so setting them here touches no other file.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../../src/engine/engine.js";
import { loadModelConfig } from "../../src/model/config.js";
import { SafetensorsDir } from "../../src/model/safetensors.js";
import { writeQuantizedCheckpoint } from "../../src/quant/checkpoint.js";
import { quantizeModelRtn } from "../../src/quant/rtn.js";
import { readEvalJsonl, runExactMatch } from "../../src/eval/exact_match.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "../helpers/demo.js";
import { mixedBatchSuite, referenceSuite } from "../helpers/suites.js";
import { HAS_GPU, NO_GPU_REASON } from "./gpu.js";

const SETTINGS = {
  INLAID_UPLOAD_IN_GRAPH: "1", // the step's metadata upload inside its graph
  INLAID_LORA_SKIP_IDLE: "1", // graphs without adapter rows leave out the per-row LoRA kernels
  INLAID_QGEMM_EARLY: "1", // the expand after the fused low-bit GEMM on that GEMM's launch-order port
} as const;
const SWITCHES = Object.keys(SETTINGS) as (keyof typeof SETTINGS)[];
for (const k of SWITCHES) process.env[k] = SETTINGS[k];

if (HAS_GPU) {
  referenceSuite("cuda", 5e-2);
  mixedBatchSuite("cuda");

  describe("4-bit demo on CUDA: the switches on against off, the four tasks at once", () => {
    const LIMIT = 24;
    let work: string;
    let on: Engine, off: Engine;
    beforeAll(async () => {
      work = mkdtempSync(join(tmpdir(), "inlaid-experiments-"));
      const src = SafetensorsDir.open(DEMO_BASE);
      try {
        const spec = { bits: 4, groupSize: 64, sym: true, descAct: false } as const;
        writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: join(work, "rtn4"), spec, weights: quantizeModelRtn(src, loadModelConfig(DEMO_BASE), spec) });
      } finally {
        src.close();
      }
      on = await createEngine({ modelDir: join(work, "rtn4"), adapters: DEMO_ADAPTERS, device: "cuda" });
      // The switches are read when a backend is created (kernels compiled with or without).
      const saved = SWITCHES.map((k) => [k, process.env[k]] as const);
      for (const k of SWITCHES) delete process.env[k];
      try {
        off = await createEngine({ modelDir: join(work, "rtn4"), adapters: DEMO_ADAPTERS, device: "cuda" });
      } finally {
        for (const [k, v] of saved) if (v !== undefined) process.env[k] = v;
      }
    });
    afterAll(async () => {
      await Promise.all([on?.close(), off?.close()]);
      if (work) rmSync(work, { recursive: true, force: true });
    });

    it(`exact match on the first ${LIMIT} prompts of each task, all tasks in flight together: within one prompt of the switches off`, async () => {
      const rows = DEMO_TASKS.map((t) => readEvalJsonl(join(DEMO, "data", t, "eval.jsonl"), LIMIT));
      const score = (e: Engine) => Promise.all(DEMO_TASKS.map((t, i) => runExactMatch(e, t, rows[i]!, { maxTokens: 48 })));
      const [a, b] = [await score(on), await score(off)];
      for (let i = 0; i < DEMO_TASKS.length; i++) {
        expect(b[i]!.exactMatch, `${DEMO_TASKS[i]} with the switches off`).toBeGreaterThanOrEqual(0.75);
        expect(Math.abs(a[i]!.exactMatch - b[i]!.exactMatch), `${DEMO_TASKS[i]}: on ${a[i]!.exactMatch}, off ${b[i]!.exactMatch}`).toBeLessThanOrEqual(1 / LIMIT + 1e-9);
      }
    });
  });
} else {
  describe.skip(`GPU experiments (${NO_GPU_REASON})`, () => it("skipped", () => {}));
}
