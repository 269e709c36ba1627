// GPTQ solve microbenchmark: the CUDA solver (quant/gpu_gptq_cuda.ts) on Llama-2-7B's
// linear shapes at 4 bits, groups of 128, act-order; prints one JSON object. GPU only.
// From the repository root:
//   node --import tsx bench/gptq_solve.ts [--reps 3] [--shapes 4096x4096,11008x4096,4096x11008] [--no-act-order]
//
// Shapes are KxN (inputs x outputs): q/k/v/o 4096x4096, down 11008x4096, gate/up
// 4096x11008. Each solve is the whole solver call from host arrays to host results (what a
// model driver pays): uploads, damping + Cholesky + inverse, the column loop and lazy
// DGEMMs, downloads; the profile splits it by device events. The Hessian is a synthetic
// positive-definite one (H = S (0.7 C + 0.3 I) S, C[i, j] = exp(-|i - j| / 16), S = diag of
// spread-out input scales): every step's cost depends on the shapes only, not the values.
// `model7bSeconds` = 32 layers x (4 x 4096x4096 + 2 x 4096x11008 + 11008x4096), from the
// fastest repetition of each shape.

import { parseArgs } from "node:util";
import { cudaDriver } from "../src/backend/cuda/ffi/driver.js";
import { CudaGptqSolver, type GptqSolveProfile } from "../src/quant/gpu_gptq_cuda.js";
import type { QuantSpec } from "../src/quant/types.js";

const { values } = parseArgs({
  options: {
    reps: { type: "string", default: "3" },
    shapes: { type: "string", default: "4096x4096,11008x4096,4096x11008" },
    "no-act-order": { type: "boolean", default: false },
  },
});
const REPS = Number(values.reps);
const SHAPES = values.shapes!.split(",").map((s) => s.split("x").map(Number) as [number, number]);
const spec: QuantSpec = { bits: 4, groupSize: 128, sym: false, descAct: !values["no-act-order"] };

function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

function problem(K: number, N: number, seed: number): { w: Float32Array; h: Float32Array } {
  const r = seeded(seed);
  const sc = Float64Array.from({ length: K }, () => Math.exp(3 * (r() - 0.5)));
  const h = new Float32Array(K * K);
  const decay = Float64Array.from({ length: K }, (_, d) => 0.7 * Math.exp(-d / 16));
  for (let i = 0; i < K; i++) {
    for (let j = 0; j < K; j++) {
      const c = decay[Math.abs(i - j)]! + (i === j ? 0.3 : 0);
      h[i * K + j] = sc[i]! * sc[j]! * c;
    }
  }
  const w = Float32Array.from({ length: N * K }, () => 0.04 * (r() + r() + r() - 1.5));
  return { w, h };
}

const solver = await CudaGptqSolver.create();
const d = cudaDriver();
const freeBefore = d.memGetInfo().free;
const results: Record<string, unknown>[] = [];
const best = new Map<string, number>();
for (const [K, N] of SHAPES) {
  const t0 = performance.now();
  const { w, h } = problem(K, N, K * 7 + N);
  const genMs = performance.now() - t0;
  const runs: (GptqSolveProfile & { loss: number; damp: number })[] = [];
  for (let i = 0; i < REPS; i++) {
    const r = solver.solve(w, N, K, h, spec);
    runs.push({ ...solver.lastProfile!, loss: r.loss, damp: r.damp });
  }
  const wall = runs.map((r) => r.wallMs);
  best.set(`${K}x${N}`, Math.min(...wall));
  results.push({ K, N, generateMs: Math.round(genMs), runs: runs.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === "number" && k.endsWith("Ms") ? +v.toFixed(2) : v]))) });
}
const free = d.memGetInfo();
const t = (k: string): number => best.get(k) ?? NaN;
const model7b = 32 * (4 * t("4096x4096") + 2 * t("4096x11008") + t("11008x4096")) / 1000;
console.log(JSON.stringify({
  device: d.deviceName(d.device(Number(process.env.INLAID_CUDA_DEVICE ?? 0))), spec, reps: REPS,
  shapes: results,
  solverDeviceBytes: solver.deviceBytes,
  deviceBytesTakenSinceCreate: freeBefore - free.free,
  model7bSeconds: +model7b.toFixed(1),
}, null, 1));
solver.dispose();
