// Kernel microbenchmarks on decode (and prefill) shapes: achieved GB/s and TFLOP/s of the
// dense GEMM (cuBLASLt), decode attention over the paged KV cache, and the batched
// multi-LoRA kernels. Prints one JSON object. GPU only. From the repository root:
//   node --import tsx bench/kernels.ts [--config llama-2-7b] [--only gemm,attention,lora] [--lora-cases 32x32x16,...]
//
// Every figure is device time per call from CUDA-graph replays of `reps` back-to-back
// calls (so no host launch cost is included), with the weights rotated over enough copies
// to exceed the L2 cache twice (a decode step streams every weight from HBM once; a
// benchmark that reuses one 32 MB matrix would read it from L2). Bytes are what the call
// must move at least: weights + activations in + outputs out (read-modify-write counted twice).

import { parseArgs } from "node:util";
import { join } from "node:path";
import type { StepBatch, Tensor } from "../src/backend/backend.js";
import { CudaBackend } from "../src/backend/cuda/cuda_backend.js";
import { LORA_SLOTS_MAX_COLS } from "../src/backend/cuda/ops.js";
import { measureBandwidth } from "../src/bench/bandwidth.js";
import { loadModelConfig } from "../src/model/config.js";
import { copiesPastL2, graphTimer, weightCopies } from "./graph_timing.js";

const { values } = parseArgs({
  options: {
    config: { type: "string", default: "llama-2-7b" },
    only: { type: "string", default: "gemm,attention,lora,host" },
    // LoRA cases as ROWSxADAPTERSxRANK, comma-separated (default: all four).
    "lora-cases": { type: "string", default: "32x32x16,32x8x16,32x8x64,1x1x16" },
    reps: { type: "string", default: "20" },
    iters: { type: "string", default: "20" },
  },
});
const only = new Set(values.only!.split(","));
const REPS = Number(values.reps), ITERS = Number(values.iters);
const cfg = loadModelConfig(join("bench", "configs", values.config!));
const gpu = await CudaBackend.create({ maxTokens: 2048, maxSeqs: 256, maxBlocksPerSeq: 256 });
const L2 = gpu.device.l2Bytes;

const timeCall = graphTimer(gpu, REPS, ITERS);

const result: Record<string, unknown> = {
  device: gpu.device.name,
  config: values.config,
  bandwidth_gbs: Number(measureBandwidth(gpu)?.gbs.toFixed(1) ?? 0),
  l2_bytes: L2,
  gemm_tuning: process.env.INLAID_GEMM_TUNE !== "0",
};

// ---------------------------------------------------------------- GEMM
if (only.has("gemm")) {
  const H = cfg.hiddenSize, I = cfg.intermediateSize, q = cfg.numHeads * cfg.headDim, kv = cfg.numKvHeads * cfg.headDim;
  const shapes: [string, number, number][] = [
    ["q/o", q, H], ["k/v", kv, H], ["qkv fused", q + 2 * kv, H], ["gate/up", I, H], ["gate+up fused", 2 * I, H], ["down", H, I],
  ];
  const rows = [1, 8, 16, 32, 64, 128, 512];
  const gemm: unknown[] = [];
  for (const [name, N, K] of shapes) {
    const ws = weightCopies(gpu, N, K);
    for (const M of rows) {
      const x = gpu.empty([M, K], "bf16");
      gpu.fillRandom(x, 7, 1);
      const out = gpu.empty([M, N], "f32");
      const us = timeCall(`gemm-${N}-${K}-${M}`, (i) => gpu.linear(out, x, ws[i % ws.length]!), out);
      const bytes = N * K * 2 + M * K * 2 + M * N * 4;
      gemm.push({
        op: name, M, N, K, us: +us.toFixed(2),
        gbs: +(bytes / us / 1e3).toFixed(0), tflops: +((2 * M * N * K) / us / 1e6).toFixed(1),
      });
      gpu.free(x);
      gpu.free(out);
    }
    for (const w of ws) gpu.free(w);
  }
  result.gemm = gemm;
  result.gemm_plans = gpu.gemmTuning.map((t) => ({ ...t, chosenUs: +t.chosenUs.toFixed(2), firstUs: +t.firstUs.toFixed(2) }));
}

// ---------------------------------------------------------------- attention (decode)
interface Seq { q: number; ctx: number; slot: number }
function makeStep(seqs: readonly Seq[], blockSize: number, firstBlock = 0): { batch: StepBatch; blocks: number } {
  const numTokens = seqs.reduce((a, s) => a + s.q, 0);
  const maxBlocks = Math.max(...seqs.map((s) => Math.ceil(s.ctx / blockSize)));
  const positions = new Int32Array(numTokens), slotMapping = new Int32Array(numTokens), loraSlots = new Int32Array(numTokens);
  const queryStart = new Int32Array(seqs.length + 1), contextLens = new Int32Array(seqs.length);
  const blockTables = new Int32Array(seqs.length * maxBlocks).fill(-1);
  const sampleRows = new Int32Array(seqs.length);
  let t = 0, nextBlock = firstBlock;
  seqs.forEach((s, i) => {
    queryStart[i] = t;
    contextLens[i] = s.ctx;
    const nb = Math.ceil(s.ctx / blockSize);
    for (let j = 0; j < nb; j++) blockTables[i * maxBlocks + j] = nextBlock++;
    for (let p = s.ctx - s.q; p < s.ctx; p++, t++) {
      positions[t] = p;
      slotMapping[t] = blockTables[i * maxBlocks + Math.floor(p / blockSize)]! * blockSize + (p % blockSize);
      loraSlots[t] = s.slot;
    }
    sampleRows[i] = t - 1;
  });
  queryStart[seqs.length] = t;
  const m = seqs.length;
  return {
    batch: {
      numTokens, numSeqs: m, tokenIds: new Int32Array(numTokens), positions, slotMapping, loraSlots, queryStart, contextLens,
      blockTables, maxBlocksPerSeq: maxBlocks, sampleRows,
      sampling: {
        temperature: new Float32Array(m), topP: new Float32Array(m).fill(1), topK: new Int32Array(m),
        seeds: new Uint32Array(m), counters: new Uint32Array(m), numTopLogprobs: 0,
      },
    },
    blocks: nextBlock,
  };
}

if (only.has("attention")) {
  const nH = cfg.numHeads, nKv = cfg.numKvHeads, D = cfg.headDim, blockSize = 16;
  const attention: unknown[] = [];
  for (const [B, ctx] of [[32, 192], [32, 1024], [8, 4096], [1, 4096], [64, 512]] as const) {
    const { batch, blocks } = makeStep(Array.from({ length: B }, () => ({ q: 1, ctx, slot: -1 })), blockSize);
    // Enough layers that their caches together exceed L2 twice, as in a step over all layers.
    const layerBytes = blocks * blockSize * nKv * D * 2 * 2;
    const layers = copiesPastL2(L2, layerBytes);
    const kvc = gpu.createKvCache({ numLayers: layers, numBlocks: blocks, blockSize, numKvHeads: nKv, headDim: D });
    const step = gpu.prepare(batch);
    const q = gpu.empty([B, nH * D], "f32"), k = gpu.empty([B, nKv * D], "f32"), v = gpu.empty([B, nKv * D], "f32");
    const out = gpu.empty([B, nH * D], "bf16");
    for (const [t, s] of [[q, 1], [k, 2], [v, 3]] as const) gpu.fillRandom(t, s, 1);
    const us = timeCall(`attn-${B}-${ctx}`, (i) => gpu.attention(out, q, k, v, kvc, i % layers, 1 / Math.sqrt(D), step), out);
    const bytes = B * ctx * nKv * D * 2 * 2 + B * nH * D * (4 + 2);
    attention.push({ B, ctx, heads: nH, kv_heads: nKv, head_dim: D, us: +us.toFixed(2), gbs: +(bytes / us / 1e3).toFixed(0) });
    for (const t of [q, k, v, out]) gpu.free(t);
    gpu.freeKvCache(kvc);
  }
  result.attention = attention;
}

// ---------------------------------------------------------------- LoRA (decode: BGMV)
if (only.has("lora")) {
  const H = cfg.hiddenSize, I = cfg.intermediateSize;
  const lora: unknown[] = [];
  const q = cfg.numHeads * cfg.headDim, kvw = cfg.numKvHeads * cfg.headDim;
  // [K, output splits]: plain projections, and the fused groups the model runs (q/k/v, gate/up).
  const shapes: [string, number, number[]][] = [
    ["o", H, [H]], ["up", H, [I]], ["down", I, [H]], ["qkv fused", H, [q, kvw, kvw]], ["gate/up fused", H, [I, I]],
  ];
  const loraCases = values["lora-cases"]!.split(",").map((c) => {
    const v = c.split("x").map(Number);
    if (v.length !== 3 || !v.every((n) => Number.isInteger(n) && n > 0)) throw new Error(`--lora-cases: "${c}" is not ROWSxADAPTERSxRANK`);
    return v as [number, number, number];
  });
  for (const [rows, adapters, R] of loraCases) {
    for (const [name, K, dims] of shapes) {
      const N = dims.reduce((a, b) => a + b, 0);
      // Several stacks (one per "layer") so the adapters' A and B come from HBM.
      const stackBytes = adapters * R * (K * dims.length + N) * 2;
      const copies = copiesPastL2(L2, stackBytes);
      const stacks = Array.from({ length: copies }, () => {
        const s = gpu.createLoraStack(adapters, R, K, dims);
        for (let a = 0; a < adapters; a++) {
          dims.forEach((d, j) => gpu.writeLoraSlot(s, a, R, 2, new Float32Array(R * K).fill(0.01), new Float32Array(d * R).fill(0.01), j));
        }
        return s;
      });
      const { batch } = makeStep(Array.from({ length: rows }, (_, i) => ({ q: 1, ctx: 4, slot: i % adapters })), 16);
      const step = gpu.prepare(batch);
      const x = gpu.empty([rows, K], "bf16");
      gpu.fillRandom(x, 3, 1);
      const out = gpu.empty([rows, N], "f32");
      const us = timeCall(`lora-${rows}-${adapters}-${R}-${K}-${dims.join("x")}`, (i) => gpu.lora(out, x, stacks[i % copies]!, step), out);
      // The bytes a launch must move: each adapter's A and B once, x, and out read and written.
      const bytes = stackBytes + rows * K * 2 + 2 * rows * N * 4;
      const entry: Record<string, unknown> = { op: name, rows, adapters, rank: R, K, N, us: +us.toFixed(2), gbs: +(bytes / us / 1e3).toFixed(0) };
      // The all-slots path the decode steps take where the pool is small (backend.ts
      // attachLoraStack / linearLora): A beside the base weight, one GEMM for both, then the
      // expand. Its LoRA cost is the time over the base GEMM alone on the same weights; the
      // bytes are the same adapters' A and B.
      if (R % 8 === 0 && adapters * dims.length * R <= LORA_SLOTS_MAX_COLS) {
        const ws = stacks.map((st, i) => {
          const w = gpu.empty([N, K], "bf16");
          gpu.fillRandom(w, 11 + i, 0.02);
          if (!gpu.attachLoraStack(st, w)) throw new Error(`lora ${name}: the stack did not attach (INLAID_LORA_SLOTS=0?)`);
          return w;
        });
        const tag = `${rows}-${adapters}-${R}-${K}-${dims.join("x")}`;
        const baseUs = timeCall(`gemm-${tag}`, (i) => gpu.linear(out, x, ws[i % copies]!), out);
        const bothUs = timeCall(`linear-lora-${tag}`, (i) => {
          if (!gpu.linearLora(out, x, ws[i % copies]!, stacks[i % copies]!, step)) throw new Error(`lora ${name}: linearLora declined`);
        }, out);
        const loraUs = bothUs - baseUs;
        // Where the LoRA time goes: the same GEMM widened by the shrink's columns (as the
        // attached weight is) alone, so that gemm_lora_us - gemm_wide_us is the expand kernel.
        const wideN = N + adapters * dims.length * R;
        const wides = Array.from({ length: copies }, (_, i) => {
          const w = gpu.empty([wideN, K], "bf16");
          gpu.fillRandom(w, 31 + i, 0.02);
          return w;
        });
        const outWide = gpu.empty([rows, wideN], "f32");
        const wideUs = timeCall(`gemm-wide-${tag}`, (i) => gpu.linear(outWide, x, wides[i % copies]!), outWide);
        entry.attached = {
          gemm_us: +baseUs.toFixed(2), gemm_wide_us: +wideUs.toFixed(2), gemm_lora_us: +bothUs.toFixed(2),
          lora_us: +loraUs.toFixed(2), gbs: +(stackBytes / loraUs / 1e3).toFixed(0),
          // The two parts: the shrink's columns in the widened GEMM, then the expand kernel.
          shrink_us: +(wideUs - baseUs).toFixed(2), expand_us: +(bothUs - wideUs).toFixed(2),
        };
        for (const w of [...ws, ...wides, outWide]) gpu.free(w);
      }
      lora.push(entry);
      gpu.free(x);
      gpu.free(out);
      for (const s of stacks) gpu.freeLoraStack(s);
    }
  }
  result.lora = lora;
  // Launches captured on a cuBLASLt GEMM's launch-order port (INLAID_GEMM_EARLY; 0 when off).
  result.launch_order_edges = gpu.launcher.launchOrderEdges;
}

// ---------------------------------------------------------------- host costs
// What a decode step's host time is made of, on this machine: one FFI call into the driver
// (koffi), and launching a captured graph of n small kernels (host time of the launch
// call only; the device work is waited for outside the timing).
if (only.has("host")) {
  const calls = 2000;
  let t0 = performance.now();
  for (let i = 0; i < calls; i++) gpu.synchronize();
  const ffiUs = ((performance.now() - t0) * 1000) / calls;
  const gu = gpu.empty([1, 16], "f32"), act = gpu.empty([1, 8], "bf16");
  const graphs: unknown[] = [];
  const { batch } = makeStep([{ q: 1, ctx: 4, slot: -1 }], 16);
  gpu.prepare(batch);
  for (const nodes of [16, 128, 512]) {
    const fwd = (): Tensor => {
      for (let i = 0; i < nodes; i++) gpu.siluMul(act, gu);
      return act;
    };
    gpu.replay(`host-${nodes}`, fwd);
    let host = 0;
    const launches = 50;
    for (let i = 0; i < launches; i++) {
      t0 = performance.now();
      gpu.replay(`host-${nodes}`, fwd);
      host += performance.now() - t0;
      gpu.synchronize();
    }
    graphs.push({ nodes, launch_us: +((host * 1000) / launches).toFixed(1) });
  }
  // prepare(): packing a 32-sequence decode step and uploading it, at the capacities the
  // Llama-2-7B bench runs with (tokens for a 4096-token prefill, 256 blocks per sequence).
  const seqs = Array.from({ length: 32 }, (_, i) => ({ q: 1, ctx: 192 + i, slot: i % 8 }));
  const { batch: step32 } = makeStep(seqs, 16);
  gpu.reserve({ maxTokens: 4160, maxSeqs: 32, maxBlocksPerSeq: 256, numHeads: cfg.numHeads, headDim: cfg.headDim, vocabSize: cfg.vocabSize, maxTopLogprobs: 0 });
  const prep: number[] = [];
  for (let i = 0; i < 200; i++) {
    t0 = performance.now();
    gpu.prepare(step32);
    prep.push((performance.now() - t0) * 1000);
    gpu.synchronize();
  }
  prep.sort((a, b) => a - b);
  const pctl = (q: number): number => +prep[Math.floor(q * (prep.length - 1))]!.toFixed(1);
  result.host = { ffi_call_us: +ffiUs.toFixed(2), graph_launch: graphs, prepare_us: { p50: pctl(0.5), p90: pctl(0.9) } };
}

console.log(JSON.stringify(result, null, 1));
gpu.dispose();
