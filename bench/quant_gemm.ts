// Low-bit GEMM microbenchmark (kernels/quant_gemm.cu via CudaBackend.linearQuantized)
// against cuBLASLt bf16 (CudaBackend.linear) in the same run, on Llama-2-7B shapes, and the
// device memory a 4-bit Llama-2-7B-shaped model's weights take. Prints one JSON object.
// GPU only. From the repository root:
//   node --import tsx bench/quant_gemm.ts [--bits 4,3,2] [--rows 1,8,16,32] [--prefill] [--sweep]
//     --prefill  also rows 64..512: the fused kernel, dequantize + cuBLASLt, and bf16 (to place
//                quantFusedMaxRows / INLAID_QUANT_FUSED_MAX_ROWS)
//     --sweep    also 4-bit, every decode shape at --sweep-rows (default 1,8,32), with every
//                token tiles x warps x splits launch (INLAID_QGEMM_TILES, INLAID_QGEMM_WARPS,
//                CudaBackend.quantSplits; keys w{warps}s{splits}[t{tiles}]) against the
//                default plan; each row is also printed to stderr as it is measured
//     --shapes up,qkv,o,gate_up,down  only these shapes;  --no-cublas  skip the bf16 peer;
//     --no-memory  skip the 7B weight-memory section
//
// Timing as bench/kernels.ts: device time per call from CUDA-graph replays of `reps`
// back-to-back calls (no host launch cost), weights rotated over enough copies to exceed
// the L2 cache twice (a decode step streams every weight from HBM once). Bytes are what a
// call must move at least: the weight (packed codes + scales (+ zeros), or bf16) + x + out.
// Weights are 4/3/2-bit, group size 128, symmetric, no act-order (random codes).

import { parseArgs } from "node:util";
import type { QuantizedTensor, StepBatch, Tensor } from "../src/backend/backend.js";
import { CudaBackend } from "../src/backend/cuda/cuda_backend.js";
import { packQuantLayout, quantLayoutBytes, type QuantLayout } from "../src/backend/cuda/quant_layout.js";
import { FUSED_SPLITS, FUSED_WARPS, fusedLaunchName, fusedPlan, tokenTiles } from "../src/backend/cuda/quant_ops.js";
import { measureBandwidth } from "../src/bench/bandwidth.js";
import type { QuantBits, QuantizedWeight } from "../src/quant/types.js";
import { copiesPastL2, graphTimer, weightCopies } from "./graph_timing.js";

const { values } = parseArgs({
  options: {
    bits: { type: "string", default: "4,3,2" },
    rows: { type: "string", default: "1,8,16,32" },
    reps: { type: "string", default: "20" },
    iters: { type: "string", default: "20" },
    prefill: { type: "boolean", default: false },
    sweep: { type: "boolean", default: false },
    "sweep-rows": { type: "string", default: "1,8,32" },
    shapes: { type: "string", default: "" },
    "no-cublas": { type: "boolean", default: false },
    "no-memory": { type: "boolean", default: false },
  },
});
const BITS = values.bits!.split(",").map(Number) as QuantBits[];
const ROWS = values.rows!.split(",").map(Number);
const REPS = Number(values.reps), ITERS = Number(values.iters);
const GROUP = 128;

const gpu = await CudaBackend.create({ maxTokens: 2048, maxSeqs: 256, maxBlocksPerSeq: 256 });
const L2 = gpu.device.l2Bytes;

// replay() captures graphs only with a prepared step: one decode token.
function oneTokenStep(): StepBatch {
  return {
    numTokens: 1, numSeqs: 1, tokenIds: new Int32Array(1), positions: new Int32Array(1), slotMapping: new Int32Array([-1]),
    loraSlots: new Int32Array([-1]), queryStart: new Int32Array([0, 1]), contextLens: new Int32Array([1]),
    blockTables: new Int32Array([0]), maxBlocksPerSeq: 1, sampleRows: new Int32Array([0]),
    sampling: { temperature: new Float32Array(1), topP: new Float32Array([1]), topK: new Int32Array(1), seeds: new Uint32Array(1), counters: new Uint32Array(1), numTopLogprobs: 0 },
  };
}
gpu.prepare(oneTokenStep());

const timeCall = graphTimer(gpu, REPS, ITERS);

/** A random bits-bit weight: codes from a xorshift, scales 0.01, symmetric zeros. */
function randomWeight(bits: QuantBits, K: number, N: number, seed: number): QuantizedWeight {
  let s = (seed * 2654435761) >>> 0 || 1;
  const mask = (1 << bits) - 1;
  const codes = new Uint8Array(K * N);
  for (let i = 0; i < codes.length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    codes[i] = (s >>> 8) & mask;
  }
  const G = Math.ceil(K / GROUP);
  return {
    spec: { bits, groupSize: GROUP, sym: true, descAct: false }, inDim: K, outDim: N, codes,
    scales: new Float32Array(G * N).fill(0.0099945068359375), // an fp16 value
    zeros: new Uint8Array(G * N).fill(1 << (bits - 1)),
    gIdx: Int32Array.from({ length: K }, (_, k) => Math.floor(k / GROUP)),
  };
}

const layoutBytes = (l: QuantLayout): number => l.words.byteLength + l.scales.byteLength + (l.zeros?.byteLength ?? 0) + (l.perm?.byteLength ?? 0);

/** Copies of a packed weight on the device: enough that cycling through them misses L2. */
function quantCopies(l: QuantLayout): QuantizedTensor[] {
  const n = copiesPastL2(L2, layoutBytes(l));
  return Array.from({ length: n }, () => gpu.uploadQuantLayout(l));
}

function activations(M: number, K: number, N: number): { x: Tensor; out: Tensor } {
  const x = gpu.empty([M, K], "bf16");
  gpu.fillRandom(x, 7, 1);
  return { x, out: gpu.empty([M, N], "f32") };
}

const round = (v: number, d = 2): number => +v.toFixed(d);

const result: Record<string, unknown> = {
  device: gpu.device.name,
  sm_count: gpu.device.smCount,
  bandwidth_gbs: Number(measureBandwidth(gpu)?.gbs.toFixed(1) ?? 0),
  l2_bytes: L2,
  reps: REPS,
  iters: ITERS,
  group_size: GROUP,
  quant_fused_max_rows: gpu.quantFusedMaxRows,
  qgemm_splits_override: gpu.quantSplits,
};

// ---------------------------------------------------------------- decode shapes
// Llama-2-7B's decode GEMMs as the engine runs them (q/k/v and gate/up fused along N), and
// the unfused up_proj of issue 4's targets.
const ALL_SHAPES: [string, number, number][] = [
  ["up K4096 N11008", 4096, 11008], ["qkv K4096 N12288", 4096, 12288], ["o K4096 N4096", 4096, 4096],
  ["gate_up K4096 N22016", 4096, 22016], ["down K11008 N4096", 11008, 4096],
];
// --shapes up,o,...: the shapes whose name starts with one of these (all by default).
const SHAPES = values.shapes ? ALL_SHAPES.filter(([name]) => values.shapes!.split(",").includes(name.split(" ")[0]!)) : ALL_SHAPES;
const rowsOut: unknown[] = [];
for (const [name, K, N] of SHAPES) {
  const cublasUs = new Map<number, number>();
  const dense = values["no-cublas"] ? [] : weightCopies(gpu, N, K);
  for (const M of values["no-cublas"] ? [] : ROWS) {
    const { x, out } = activations(M, K, N);
    cublasUs.set(M, timeCall(`bf16-${N}-${K}-${M}`, (i) => gpu.linear(out, x, dense[i % dense.length]!), out));
    gpu.free(x);
    gpu.free(out);
  }
  for (const t of dense) gpu.free(t);
  for (const bits of BITS) {
    const layout = packQuantLayout(randomWeight(bits, K, N, bits * 7 + K));
    const copies = quantCopies(layout);
    for (const M of ROWS) {
      const { x, out } = activations(M, K, N);
      const us = timeCall(`q${bits}-${N}-${K}-${M}`, (i) => gpu.linearQuantized(out, x, copies[i % copies.length]!), out);
      const bytes = layoutBytes(layout) + M * K * 2 + M * N * 4;
      const cu = cublasUs.get(M) ?? NaN;
      // The launch the backend kept (tuned at the first eager call: CudaBackend #quantPlan), else the rule's.
      const plan = fusedPlan(bits, K, N, M, gpu.device.smCount, gpu.quantSplits);
      const kept = gpu.quantLaunch(copies[0]!, M) ?? fusedLaunchName(plan, M);
      rowsOut.push({
        op: name, bits, M, K, N, plan: M <= gpu.quantFusedMaxRows ? kept : "dequant", us: round(us), gbs: Math.round(bytes / us / 1e3), tflops: round((2 * M * N * K) / us / 1e6, 1),
        cublas_bf16_us: round(cu), cublas_bf16_gbs: Math.round((N * K * 2 + M * K * 2 + M * N * 4) / cu / 1e3),
        vs_cublas: round(us / cu, 3),
      });
      gpu.free(x);
      gpu.free(out);
    }
    for (const c of copies) gpu.freeQuantized(c);
  }
}
result.gemm = rowsOut;

// ---------------------------------------------------------------- prefill rows: which path
if (values.prefill) {
  const K = 4096, N = 11008;
  const layout = packQuantLayout(randomWeight(4, K, N, 99));
  const copies = quantCopies(layout);
  const dense = weightCopies(gpu, N, K);
  const prefill: unknown[] = [];
  const saved = gpu.quantFusedMaxRows;
  for (const M of [32, 64, 96, 128, 192, 256, 512]) {
    const { x, out } = activations(M, K, N);
    gpu.quantFusedMaxRows = 1 << 30;
    const fused = timeCall(`pf-fused-${M}`, (i) => gpu.linearQuantized(out, x, copies[i % copies.length]!), out);
    gpu.quantFusedMaxRows = 0;
    const dq = timeCall(`pf-dq-${M}`, (i) => gpu.linearQuantized(out, x, copies[i % copies.length]!), out);
    const bf = timeCall(`pf-bf16-${M}`, (i) => gpu.linear(out, x, dense[i % dense.length]!), out);
    prefill.push({ M, K, N, bits: 4, fused_us: round(fused), dequant_cublas_us: round(dq), cublas_bf16_us: round(bf) });
    gpu.free(x);
    gpu.free(out);
  }
  gpu.quantFusedMaxRows = saved;
  for (const c of copies) gpu.freeQuantized(c);
  for (const t of dense) gpu.free(t);
  result.prefill = prefill;
}

// ---------------------------------------------------------------- launch sweep
if (values.sweep) {
  const sweep: unknown[] = [];
  const saved = gpu.quantSplits, savedWarps = process.env.INLAID_QGEMM_WARPS;
  const sweepRows = values["sweep-rows"]!.split(",").map(Number);
  for (const [name, K, N] of SHAPES) {
    const layout = packQuantLayout(randomWeight(4, K, N, 5));
    const copies = quantCopies(layout);
    for (const M of sweepRows) {
      const { x, out } = activations(M, K, N);
      const time = (key: string): number => round(timeCall(key, (i) => gpu.linearQuantized(out, x, copies[i % copies.length]!), out));
      gpu.quantSplits = null;
      delete process.env.INLAID_QGEMM_WARPS;
      const auto = fusedPlan(4, K, N, M, gpu.device.smCount);
      const autoUs = time(`sw-${N}-${K}-${M}-auto`);
      const row: Record<string, unknown> = { op: name.split(" ")[0], M, rule: fusedLaunchName(auto, M), auto: gpu.quantLaunch(copies[0]!, M), auto_us: autoUs };
      for (const T of ([4, 2, 1] as const).filter((t) => t <= tokenTiles(M))) {
        process.env.INLAID_QGEMM_TILES = String(T);
        for (const w of FUSED_WARPS) {
          process.env.INLAID_QGEMM_WARPS = String(w);
          for (const S of FUSED_SPLITS) {
            if (S > Math.ceil(K / 128)) continue;
            gpu.quantSplits = S;
            row[`w${w}s${S}${T === tokenTiles(M) ? "" : `t${T}`}`] = time(`sw-${N}-${K}-${M}-${w}-${S}-${T}`);
          }
        }
      }
      delete process.env.INLAID_QGEMM_TILES;
      sweep.push(row);
      console.error(JSON.stringify(row));
      gpu.free(x);
      gpu.free(out);
    }
    for (const c of copies) gpu.freeQuantized(c);
  }
  gpu.quantSplits = saved;
  if (savedWarps === undefined) delete process.env.INLAID_QGEMM_WARPS;
  else process.env.INLAID_QGEMM_WARPS = savedWarps;
  result.launch_sweep = sweep;
}

// ---------------------------------------------------------------- 4-bit Llama-2-7B weight memory
if (!values["no-memory"]) {
  const H = 4096, I = 11008, V = 32000, L = 32;
  const groups: [string, number, number][] = [["qkv", H, 3 * H], ["o", H, H], ["gate_up", H, 2 * I], ["down", I, H]];
  const denseBytes = 2 * V * H * 2 + (2 * L + 1) * H * 2; // embed + lm_head, norms (bf16)
  const memory: Record<string, unknown> = {};
  for (const [label, sym, act] of [["sym", true, false], ["asym", false, false], ["asym_actorder", false, true]] as const) {
    const perLayer = groups.reduce((a, [, K, N]) => a + quantLayoutBytes(4, K, N, Math.ceil(K / GROUP), sym, act), 0);
    const total = L * perLayer + denseBytes;
    memory[label] = { quantized_linears_bytes: L * perLayer, dense_bytes: denseBytes, total_gb: round(total / 1e9, 3), total_gib: round(total / 2 ** 30, 3) };
  }
  // One layer actually uploaded (sym): the allocator's bytes (256-byte aligned parts), times 32.
  const before = gpu.quantizedBytes;
  const layer = groups.map(([, K, N], i) => gpu.uploadQuantized(randomWeight(4, K, N, 300 + i)));
  const measured = gpu.quantizedBytes - before;
  for (const t of layer) gpu.freeQuantized(t);
  memory.measured_one_layer_sym_bytes = measured;
  memory.measured_sym_total_gb = round((L * measured + denseBytes) / 1e9, 3);
  memory.note = "4-bit, group 128; gate/up and q/k/v fused; embeddings, lm_head and norms bf16; excludes the KV cache and workspaces";
  result.llama2_7b_4bit_weights = memory;
}

console.log(JSON.stringify(result, null, 1));
gpu.dispose();
