// The low-bit GEMM kernels (kernels/quant_gemm.cu through CudaBackend.linearQuantized)
// against the CPU backend's reference (the dense matmul of the dequantized weight, f64
// sums), for every bit width x group size x act-order, at 1, 7, 32 and 100 rows (the
// fused kernel: one, two and four token tiles, and m-blocks) and 300 rows (dequantize +
// cuBLASLt); split-K cluster merges (forced 1 and 8 splits at 4 and 8 warps per CTA,
// bitwise-repeatable results), a replayed CUDA graph over step-sized views, and a
// Llama-2-7B-sized weight. Then the demo
// served from 4-bit checkpoints on the GPU (low-bit kernels) against the same checkpoint
// on the CPU. Run on the GPU machine:
//   node node_modules/vitest/vitest.mjs run --project gpu test/gpu/quant_gemm.test.ts
//
// Tolerances are bounds, not fits: |gpu - cpu| <= tol * sum_k |x_k| |W_nk| (+ 1e-30).
// - Fused kernel: the weights reach the tensor cores exactly (q - z is a small integer in
//   bf16), x is bf16 on both sides, each product is exact in f32; the error is f32
//   accumulation only: at most one rounding (<= 2^-23 relative, allowing truncating
//   tensor-core adds) per addition on a chain of K/16 mma steps plus the per-group scale
//   folds and the split merge: tol = (K/16 + 64) * 2^-23 (1.6e-5 at K = 1056). A wrong
//   code or scale anywhere moves an output by ~|x| |W| ~ abssum / K, far above it.
// - Dequantize + cuBLASLt: each weight is rounded to bf16 once (<= 2^-9 relative) and
//   cuBLASLt accumulates in f32 in its own order: tol = 2^-9 + (K + 64) * 2^-23.

import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { QuantizedTensor, StepBatch, Tensor } from "../../src/backend/backend.js";
import { CpuBackend } from "../../src/backend/cpu/cpu_backend.js";
import { CudaBackend } from "../../src/backend/cuda/cuda_backend.js";
import { bf16ToF32, f32ToBf16 } from "../../src/backend/tensor.js";
import { createEngine, type Engine } from "../../src/engine/engine.js";
import { readEvalJsonl, runExactMatch } from "../../src/eval/exact_match.js";
import { kSplitCandidates } from "../../src/backend/cuda/quant_ops.js";
import { dequantize, type QuantBits, type QuantizedWeight, type QuantSpec } from "../../src/quant/types.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "../helpers/demo.js";
import { GREEDY, collect } from "../helpers/collect.js";
import { quantizeDemo } from "../helpers/quant_demo.js";
import { randomQuantized, seededRandom } from "../helpers/quant_random.js";

const reason = CudaBackend.unavailableReason();

function bf16Values(n: number, seed: number, scale = 1): Float32Array {
  const r = seededRandom(seed);
  return bf16ToF32(f32ToBf16(Float32Array.from({ length: n }, () => (2 * r() - 1) * scale)));
}

/** sum_k |x[m, k]| |W[n, k]| for every (m, n): the scale of the tolerances. */
function absSums(x: Float32Array, rows: number, W: Float32Array, K: number, N: number): Float64Array {
  const out = new Float64Array(rows * N);
  for (let m = 0; m < rows; m++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += Math.abs(x[m * K + k]! * W[n * K + k]!);
      out[m * N + n] = s;
    }
  return out;
}

function expectWithin(label: string, got: Float32Array, ref: Float32Array, scale: Float64Array, tol: number): void {
  let bad = 0, worst = -1, worstRatio = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(got[i]! - ref[i]!), lim = tol * scale[i]! + 1e-30;
    const ratio = d / lim;
    if (!(d <= lim)) bad++;
    if (!(ratio <= worstRatio)) {
      worstRatio = Number.isNaN(ratio) ? Infinity : ratio;
      worst = i;
    }
  }
  expect(bad, `${label}: ${bad} of ${ref.length} outside ${tol.toExponential(2)} x abssum; worst [${worst}] gpu ${got[worst]} cpu ${ref[worst]} (${worstRatio.toFixed(2)} x the bound)`).toBe(0);
}

const fusedTol = (K: number): number => (K / 16 + 64) * 2 ** -23;
const prefillTol = (K: number): number => 2 ** -9 + (K + 64) * 2 ** -23;

function decodeStep(n: number): StepBatch {
  return {
    numTokens: n, numSeqs: n,
    tokenIds: new Int32Array(n), positions: new Int32Array(n).fill(3),
    slotMapping: Int32Array.from({ length: n }, (_, i) => i * 16 + 3), loraSlots: new Int32Array(n).fill(-1),
    queryStart: Int32Array.from({ length: n + 1 }, (_, i) => i), contextLens: new Int32Array(n).fill(4),
    blockTables: Int32Array.from({ length: n }, (_, i) => i), maxBlocksPerSeq: 1,
    sampleRows: Int32Array.from({ length: n }, (_, i) => i),
    sampling: {
      temperature: new Float32Array(n), topP: new Float32Array(n).fill(1), topK: new Int32Array(n),
      seeds: new Uint32Array(n), counters: new Uint32Array(n), numTopLogprobs: 0,
    },
  };
}

describe.skipIf(reason !== null)(`low-bit GEMM on CUDA vs the CPU reference${reason ? ` (skipped: ${reason})` : ""}`, () => {
  let gpu: CudaBackend;
  const cpu = new CpuBackend();
  beforeAll(async () => {
    gpu = await CudaBackend.create({ maxTokens: 512, maxSeqs: 64, maxBlocksPerSeq: 4 });
  });
  afterAll(() => gpu?.dispose());

  /** out = x @ W^T (+ bias) on both backends; returns [gpu, cpu]. */
  function both(q: QuantizedWeight, qg: QuantizedTensor, x: Float32Array, rows: number, bias?: Float32Array): [Float32Array, Float32Array] {
    const K = q.inDim, N = q.outDim;
    const qc = cpu.uploadQuantized(q);
    const xg = gpu.upload({ shape: [rows, K], dtype: "f32", data: x }); // bf16 on the GPU: exact (x is bf16-valued)
    const xc = cpu.upload({ shape: [rows, K], dtype: "f32", data: x });
    const og = gpu.empty([rows, N], "f32"), oc = cpu.empty([rows, N], "f32");
    const bg = bias ? gpu.upload({ shape: [N], dtype: "f32", data: bias }, "f32") : undefined;
    const bc = bias ? cpu.upload({ shape: [N], dtype: "f32", data: bias }, "f32") : undefined;
    gpu.linearQuantized(og, xg, qg, bg);
    cpu.linearQuantized(oc, xc, qc, bc);
    const got = gpu.read(og) as Float32Array;
    for (const t of [xg, og, ...(bg ? [bg] : [])]) gpu.free(t);
    return [got, cpu.read(oc) as Float32Array];
  }

  const K = 1056, N = 416; // K: 8.25 units of 128 (a padded last unit); N: 13 warp columns (idle warps in the last CTA)
  for (const bits of [2, 3, 4, 8] as QuantBits[]) {
    for (const groupSize of [32, 128, -1]) {
      for (const descAct of [false, true]) {
        // Symmetric and asymmetric zeros both meet every bit width with and without act-order.
        const spec: QuantSpec = { bits, groupSize, sym: descAct ? groupSize !== 32 : groupSize === 32, descAct };
        it(`${bits}-bit, group ${groupSize}, ${spec.sym ? "sym" : "asym"}${descAct ? ", act-order" : ""}: rows 1, 7, 32, 100 fused; 300 dequantize + cuBLASLt`, () => {
          const q = randomQuantized(spec, K, N, bits * 100 + groupSize + (descAct ? 7 : 0));
          const W = dequantize(q);
          const qg = gpu.uploadQuantized(q);
          const bias = Float32Array.from({ length: N }, (_, n) => ((n % 7) - 3) * 0.125);
          try {
            for (const rows of [1, 7, 32, 100, 300]) {
              const x = bf16Values(rows * K, rows + bits);
              const [got, ref] = both(q, qg, x, rows, rows === 7 ? bias : undefined);
              const scale = absSums(x, rows, W, K, N);
              if (rows === 7) for (let i = 0; i < scale.length; i++) scale[i]! += Math.abs(bias[i % N]!);
              const fused = rows <= gpu.quantFusedMaxRows;
              expectWithin(`rows ${rows}`, got, ref, scale, fused ? fusedTol(K) : prefillTol(K));
            }
          } finally {
            gpu.freeQuantized(qg);
          }
        });
      }
    }
  }

  it("split-K clusters: 1 and 8 forced splits and the default, at 4 and 8 warps per CTA, agree within the bound; each is bitwise repeatable, and 4 and 8 warps bitwise equal at a forced split", () => {
    const q = randomQuantized({ bits: 4, groupSize: 128, sym: false, descAct: true }, 2048, 1056, 77); // 33 columns: a CTA with idle warps
    const qg = gpu.uploadQuantized(q);
    const W = dequantize(q);
    const prev = gpu.quantSplits, prevWarps = process.env.INLAID_QGEMM_WARPS;
    try {
      for (const rows of [1, 8, 32]) {
        const x = bf16Values(rows * 2048, 5 + rows);
        const scale = absSums(x, rows, W, 2048, 1056);
        // A warp's column sums do not depend on its CTA's width (at 32 rows, 4 warps run
        // quant_gemm_b4_t4_w4_*, other launch bounds, the same loop).
        const byWarps = new Map<number, number[]>();
        for (const warps of ["4", "8"]) {
          process.env.INLAID_QGEMM_WARPS = warps;
          for (const splits of [1, 8, null]) {
            gpu.quantSplits = splits;
            const [a, ref] = both(q, qg, x, rows);
            const [b] = both(q, qg, x, rows);
            const label = `warps ${warps} splits ${splits ?? "auto"} rows ${rows}`;
            expect(Array.from(b), `${label}: deterministic`).toEqual(Array.from(a));
            expectWithin(label, a, ref, scale, fusedTol(2048));
            if (splits !== null) {
              const other = byWarps.get(splits);
              if (other) expect(Array.from(a), `${label}: bitwise the other width's`).toEqual(other);
              else byWarps.set(splits, Array.from(a));
            }
          }
        }
      }
    } finally {
      gpu.quantSplits = prev;
      if (prevWarps === undefined) delete process.env.INLAID_QGEMM_WARPS;
      else process.env.INLAID_QGEMM_WARPS = prevWarps;
      gpu.freeQuantized(qg);
    }
  });

  it("K-split kernel (quant_gemm_k_*, every warps x depth): within the bound of the CPU; 2/3/4/8 bits, groups 128 and one, rows 1, 5, 8, a padded last unit and warps without units", () => {
    const prev = gpu.quantKSplit;
    try {
      for (const bits of [2, 3, 4, 8] as QuantBits[]) {
        for (const [groupSize, sym, descAct] of [[128, false, false], [-1, true, true]] as const) {
          // 17.25 units (a padded last unit, uneven warp ranges); 256: two units (idle warps at 4 and more)
          for (const [K, N] of [[2208, 416], [256, 64]] as const) {
            const q = randomQuantized({ bits, groupSize, sym, descAct }, K, N, 500 + bits + K + (sym ? 1 : 0));
            const qg = gpu.uploadQuantized(q);
            const W = dequantize(q);
            const bias = Float32Array.from({ length: N }, (_, n) => ((n % 5) - 2) * 0.25);
            try {
              for (const rows of [1, 5, 8]) {
                const x = bf16Values(rows * K, 60 + rows + bits);
                const scale = absSums(x, rows, W, K, N);
                for (let i = 0; i < scale.length; i++) scale[i]! += Math.abs(bias[i % N]!);
                for (const p of kSplitCandidates(bits, K, N, rows)) {
                  gpu.quantKSplit = { warps: p.warps, depth: p.kDepth! };
                  const [got, ref] = both(q, qg, x, rows, bias);
                  expectWithin(`${bits}-bit group ${groupSize} K ${K} rows ${rows} k${p.warps}d${p.kDepth}`, got, ref, scale, fusedTol(K));
                }
              }
            } finally {
              gpu.freeQuantized(qg);
            }
          }
        }
      }
    } finally {
      gpu.quantKSplit = prev;
    }
  });

  it("token tiles: 13, 24 and 32 rows in m-blocks of 8, 16 and 32 rows (the tuner's candidates) agree within the bound", () => {
    const q = randomQuantized({ bits: 4, groupSize: 64, sym: false, descAct: false }, 1056, 1056, 91);
    const qg = gpu.uploadQuantized(q);
    const W = dequantize(q);
    const prev = process.env.INLAID_QGEMM_TILES;
    try {
      for (const rows of [13, 24, 32]) {
        const x = bf16Values(rows * 1056, 11 + rows);
        const scale = absSums(x, rows, W, 1056, 1056);
        for (const tiles of ["1", "2", "4"]) {
          process.env.INLAID_QGEMM_TILES = tiles;
          const [got, ref] = both(q, qg, x, rows);
          expectWithin(`tiles ${tiles} rows ${rows}`, got, ref, scale, fusedTol(1056));
        }
      }
    } finally {
      if (prev === undefined) delete process.env.INLAID_QGEMM_TILES;
      else process.env.INLAID_QGEMM_TILES = prev;
      gpu.freeQuantized(qg);
    }
  });

  it("a replayed decode graph over step-sized views equals eager runs (live rows read on the device)", () => {
    const Kx = 512, Nx = 768;
    const q = randomQuantized({ bits: 4, groupSize: 64, sym: true, descAct: true }, Kx, Nx, 9);
    const qg = gpu.uploadQuantized(q);
    const cap = 32;
    const X = gpu.upload({ shape: [cap, Kx], dtype: "f32", data: bf16Values(cap * Kx, 3) });
    const O = gpu.empty([cap, Nx], "f32");
    const forward = (n: number) => (): Tensor => {
      const o = gpu.rows(O, n);
      gpu.linearQuantized(o, gpu.rows(X, n), qg);
      return o;
    };
    const run = (n: number, graph: boolean): Float32Array => {
      gpu.prepare(decodeStep(n));
      const out = graph ? gpu.replay("decode:quant", forward(n)) : forward(n)();
      return (gpu.read(out) as Float32Array).slice();
    };
    const first = run(20, true); // bucket 24: eager, then capture
    const replayed = run(23, true);
    const eager = run(23, false);
    expect(Array.from(replayed)).toEqual(Array.from(eager));
    expect(Array.from(first)).toEqual(Array.from(run(20, false)));
    for (const t of [X, O]) gpu.free(t);
    gpu.freeQuantized(qg);
  });

  it("a Llama-2-7B up_proj (K 4096, N 11008), 4-bit group 128 act-order, at 1 and 32 rows", () => {
    const q = randomQuantized({ bits: 4, groupSize: 128, sym: true, descAct: true }, 4096, 11008, 123);
    const qg = gpu.uploadQuantized(q);
    const W = dequantize(q);
    try {
      for (const rows of [1, 32]) {
        const x = bf16Values(rows * 4096, 40 + rows);
        const [got, ref] = both(q, qg, x, rows);
        expectWithin(`7B rows ${rows}`, got, ref, absSums(x, rows, W, 4096, 11008), fusedTol(4096));
      }
    } finally {
      gpu.freeQuantized(qg);
    }
  });
});

// ------------------------------------------------------------------ the demo, served quantized

/** Prompts per task: enough to see a kernel bug in the eval, few enough for the CPU engine. */
const LIMIT = 64;

describe.skipIf(reason !== null)(`the demo from 4-bit checkpoints: GPU low-bit kernels vs the CPU${reason ? ` (skipped: ${reason})` : ""}`, () => {
  let work: string;
  const engines: Record<string, { gpu: Engine; cpu: Engine; messages: string[] }> = {};
  const variants: Record<string, QuantSpec> = {
    "rtn4-g64-sym": { bits: 4, groupSize: 64, sym: true, descAct: false },
    "rtn4-g64-asym-actorder": { bits: 4, groupSize: 64, sym: false, descAct: true },
  };
  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), "inlaid-gpu-quant-"));
    for (const [name, spec] of Object.entries(variants)) {
      const dir = join(work, name);
      quantizeDemo(dir, spec);
      const messages: string[] = [];
      engines[name] = {
        gpu: await createEngine({ modelDir: dir, adapters: DEMO_ADAPTERS, device: "cuda", onProgress: (m) => messages.push(m) }),
        cpu: await createEngine({ modelDir: dir, adapters: DEMO_ADAPTERS, device: "cpu" }),
        messages,
      };
    }
  });
  afterAll(async () => {
    for (const e of Object.values(engines)) await Promise.all([e.gpu.close(), e.cpu.close()]);
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it("--load-format dummy of a quantized config: random low-bit weights on every fused linear", async () => {
    const dir = join(work, "dummy-q4");
    mkdirSync(dir);
    const cfg = JSON.parse(readFileSync(join(DEMO_BASE, "config.json"), "utf8"));
    cfg.quantization_config = { quant_method: "gptq", bits: 4, group_size: 64, desc_act: false, sym: true };
    writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(DEMO_BASE, f), join(dir, f));
    const messages: string[] = [];
    const e = await createEngine({ modelDir: dir, device: "cuda", loadFormat: "dummy", onProgress: (m) => messages.push(m) });
    try {
      expect(messages).toContain("24 fused linears served by low-bit kernels");
      const out = await collect(e.generate({ id: "d", promptIds: [1, 5, 9], adapter: null, params: { ...GREEDY, maxTokens: 8, ignoreEos: true } }));
      expect(out.tokenIds.length).toBe(8);
    } finally {
      await e.close();
    }
  });

  for (const name of Object.keys(variants)) {
    it(`${name}: every fused linear on the low-bit kernels; per-task exact match within 2/${LIMIT} of the CPU's`, async () => {
      const e = engines[name]!;
      expect(e.messages.some((m) => m === "24 fused linears served by low-bit kernels"), e.messages.join("\n")).toBe(true);
      for (const task of DEMO_TASKS) {
        const rows = readEvalJsonl(join(DEMO, "data", task, "eval.jsonl"), LIMIT);
        const [g, c] = await Promise.all([runExactMatch(e.gpu, task, rows, { maxTokens: 48 }), runExactMatch(e.cpu, task, rows, { maxTokens: 48 })]);
        console.log(JSON.stringify({ checkpoint: name, task, gpu: g.exactMatch, cpu: c.exactMatch, gpu_tokens_per_s: g.tokensPerS }));
        // bf16 activations on the GPU against f32 on the CPU flip a prompt now and then, as in
        // the unquantized eval (test/gpu/eval.test.ts allows 0.01 of 200 prompts).
        expect(Math.abs(g.exactMatch - c.exactMatch), task).toBeLessThanOrEqual(2 / LIMIT + 1e-9);
      }
    });
  }
});
