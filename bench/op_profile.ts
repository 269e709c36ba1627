// Where a decode step's device time goes, op by op: runs a model eagerly (no CUDA
// graphs) and times every backend op with device events, then prints one JSON object
// with each op kind's device time per decode step and, for matmuls, achieved GB/s.
// GPU only. Run from the repository root:
//   node --import tsx bench/op_profile.ts [--config llama-2-7b] [--batch 32] [--adapters 8] [--rank 16]

import { parseArgs } from "node:util";
import { join } from "node:path";
import { randomPrompts } from "../src/bench/offline.js";
import { syntheticAdapters } from "../src/bench/synthetic_adapter.js";
import { CudaBackend } from "../src/backend/cuda/cuda_backend.js";
import type { Tensor } from "../src/backend/backend.js";
import { createEngine } from "../src/engine/engine.js";
import { loadModelConfig } from "../src/model/config.js";

const { values } = parseArgs({
  options: {
    config: { type: "string", default: "llama-2-7b" },
    batch: { type: "string", default: "32" },
    "prompt-len": { type: "string", default: "128" },
    gen: { type: "string", default: "16" },
    adapters: { type: "string", default: "8" },
    rank: { type: "string", default: "16" },
  },
});
const B = Number(values.batch), P = Number(values["prompt-len"]), G = Number(values.gen);
const K = Number(values.adapters), R = Number(values.rank);
process.env.INLAID_CUDA_GRAPHS = "0"; // eager, so every op can be timed on its own

const dir = join("bench", "configs", values.config!);
const config = loadModelConfig(dir);
const adapterDirs = K > 0 ? syntheticAdapters(config, K, R) : [];

// Time every op; only decode steps (B rows) are kept.
const OPS = ["embedding", "rmsnorm", "addRmsnorm", "linear", "lora", "rope", "attention", "siluMul", "gatherRows", "sample"] as const;
const totals = new Map<string, { ms: number; calls: number; bytes: number }>();
let recording = false;
const proto = CudaBackend.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
for (const op of OPS) {
  const orig = proto[op]!;
  proto[op] = function (this: CudaBackend, ...args: unknown[]) {
    if (!recording) return orig.apply(this, args);
    let result: unknown;
    const ms = this.timeMs(() => {
      result = orig.apply(this, args);
    });
    let key: string = op;
    let bytes = 0;
    if (op === "linear") {
      const w = args[2] as Tensor;
      key = `linear ${w.shape[0]}x${w.shape[1]}`;
      bytes = w.shape[0]! * w.shape[1]! * 2;
    }
    const t = totals.get(key) ?? { ms: 0, calls: 0, bytes: 0 };
    t.ms += ms;
    t.calls++;
    t.bytes += bytes;
    totals.set(key, t);
    return result;
  };
}

const engine = await createEngine({
  modelDir: dir, loadFormat: "dummy", device: "cuda", maxBatch: B, maxModelLen: P + G + 16,
  adapters: Object.fromEntries(adapterDirs.map((d, i) => [`a${i}`, d])), maxLoras: Math.max(1, K), maxLoraRank: Math.max(1, R),
});
const prompts = randomPrompts(B, P, config.vocabSize, 0);
let firstTokens = 0;
const stepsBefore = { n: 0 };
await Promise.all(prompts.map(async (promptIds, i) => {
  const it = engine.generate({
    id: `p${i}`, promptIds, adapter: K > 0 ? `a${i % K}` : null,
    params: { maxTokens: G, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: true, logprobs: -1 },
  });
  let n = 0;
  for await (const o of it) {
    n += o.tokenIds.length;
    if (n === 1 && o.tokenIds.length > 0 && ++firstTokens === B) {
      // Every prefill is done: from here on every step is a decode step over B rows.
      recording = true;
      stepsBefore.n = engine.stats().steps;
    }
  }
}));
recording = false;
const steps = engine.stats().steps - stepsBefore.n;
await engine.close();

const rows = [...totals.entries()]
  .map(([op, t]) => ({
    op,
    ms_per_step: +(t.ms / steps).toFixed(4),
    calls_per_step: +(t.calls / steps).toFixed(1),
    us_per_call: +((t.ms * 1000) / t.calls).toFixed(2),
    ...(t.bytes ? { weight_gbs: +(t.bytes / (t.ms / 1000) / 1e9).toFixed(0) } : {}),
  }))
  .sort((a, b) => b.ms_per_step - a.ms_per_step);
const sum = rows.reduce((s, r) => s + r.ms_per_step, 0);
console.log(JSON.stringify({ bench: "op_profile", model: values.config, batch: B, adapters: K, rank: R, decode_steps: steps, device_ms_per_step: +sum.toFixed(3), ops: rows }, null, 1));
