// Every CUDA op against the CPU backend (the oracle), through the public Backend
// interface exactly as the engine drives it: prepare() a step, allocate workspace tensors
// at a capacity larger than the step, take rows() views of the live count, run the op on
// both backends with identical inputs, read back and compare.
//
// Every op runs in the dtypes the model gives it (src/model/llama.ts; backend.ts's rule:
// matmul inputs bf16 on the GPU, matmul outputs, the residual stream and logits f32):
//   embedding out f32 <- table bf16; rmsnorm out bf16 <- x f32; addRmsnorm out bf16,
//   residual f32 <- x f32; rope q, k f32; attention out bf16 <- q, k, v f32 (bf16 cache);
//   siluMul out bf16 <- gateUp f32; lora out f32 += (x bf16); gatherRows bf16.
// Inputs the GPU holds in bf16 are rounded to bf16 before they reach either backend, so
// both start from the same values; f32 inputs carry full f32 values (f32Values), so an op
// that rounded them to bf16 would fail. Differences then come only from the GPU's bf16
// outputs and its f32 math. Tolerances are |gpu - cpu| <= atol + rtol * |cpu|, with the
// reason stated where each is used.
//
// Runs only on the GPU machine (`npm run test:gpu`); skips with the reason elsewhere.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Backend, KvCache, LoraStack, SampleResult, SamplingBatch, StepBatch, Tensor } from "../../src/backend/backend.js";
import { nextDecodeBatch } from "../../src/backend/decode_steps.js";
import { CpuBackend } from "../../src/backend/cpu/cpu_backend.js";
import { CudaBackend } from "../../src/backend/cuda/cuda_backend.js";
import { bf16ToF32, f32ToBf16 } from "../../src/backend/tensor.js";
import { randomQuantized } from "../helpers/quant_random.js";

const reason = CudaBackend.unavailableReason();

// ------------------------------------------------------------------ data

/** Deterministic values in [-scale, scale), rounded to bf16 (exact on both backends). */
function bf16Values(n: number, seed: number, scale = 1): Float32Array {
  let s = (seed * 2654435761) >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s >>> 8) / 16777216 * 2 - 1) * scale;
  }
  return bf16ToF32(f32ToBf16(out));
}

/** Deterministic values in [-scale, scale) with full f32 mantissas (not bf16-representable). */
function f32Values(n: number, seed: number, scale = 1): Float32Array {
  let s = (seed * 2654435761 + 12345) >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const hi = s >>> 8;
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((hi + (s >>> 8) / 16777216) / 16777216 * 2 - 1) * scale;
  }
  return out;
}

/** Deterministic integers in [0, n). */
function ints(count: number, n: number, seed: number): Int32Array {
  let s = (seed * 2246822519) >>> 0;
  const out = new Int32Array(count);
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = Math.floor(((s >>> 8) / 16777216) * n);
  }
  return out;
}

/** A permutation of 0..n-1 (scattered block tables). */
function shuffled(n: number, seed: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  const r = ints(n, 1 << 30, seed);
  for (let i = n - 1; i > 0; i--) {
    const j = r[i]! % (i + 1);
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

/** One sequence of a step: q query tokens ending at context length ctx; its adapter slot. */
interface Seq {
  readonly q: number;
  readonly ctx: number;
  readonly slot?: number;
}

interface Paging {
  readonly blockSize: number;
  readonly maxBlocksPerSeq: number;
  /** Block ids per sequence (scattered), long enough for its final context. */
  readonly tables: readonly (readonly number[])[];
}

/** Gives each of `maxCtx.length` sequences its own scattered blocks of a pool. */
function paging(maxCtx: readonly number[], blockSize: number, seed: number): Paging & { numBlocks: number } {
  const need = maxCtx.map((c) => Math.ceil(c / blockSize));
  const total = need.reduce((a, b) => a + b, 0) + 3; // a few never-used blocks
  const perm = shuffled(total, seed);
  let at = 0;
  const tables = need.map((n) => perm.slice(at, (at += n)));
  return { blockSize, maxBlocksPerSeq: Math.max(...need), tables, numBlocks: total };
}

const GREEDY_ROWS = (m: number): SamplingBatch => ({
  temperature: new Float32Array(m), topP: new Float32Array(m).fill(1), topK: new Int32Array(m),
  seeds: new Uint32Array(m), counters: new Uint32Array(m), numTopLogprobs: 0,
});

function makeStep(seqs: readonly Seq[], pg: Paging, sampling?: SamplingBatch, tokenSeed = 1): StepBatch {
  const numTokens = seqs.reduce((a, s) => a + s.q, 0);
  const tokenIds = ints(numTokens, 500, tokenSeed);
  const positions = new Int32Array(numTokens), slotMapping = new Int32Array(numTokens), loraSlots = new Int32Array(numTokens);
  const queryStart = new Int32Array(seqs.length + 1), contextLens = new Int32Array(seqs.length);
  const blockTables = new Int32Array(seqs.length * pg.maxBlocksPerSeq).fill(-1);
  const sampleRows = new Int32Array(seqs.length);
  let t = 0;
  seqs.forEach((s, i) => {
    queryStart[i] = t;
    contextLens[i] = s.ctx;
    const table = pg.tables[i]!;
    table.forEach((b, j) => (blockTables[i * pg.maxBlocksPerSeq + j] = b));
    for (let p = s.ctx - s.q; p < s.ctx; p++, t++) {
      positions[t] = p;
      slotMapping[t] = table[Math.floor(p / pg.blockSize)]! * pg.blockSize + (p % pg.blockSize);
      loraSlots[t] = s.slot ?? -1;
    }
    sampleRows[i] = t - 1;
  });
  queryStart[seqs.length] = t;
  return {
    numTokens, numSeqs: seqs.length, tokenIds, positions, slotMapping, loraSlots, queryStart, contextLens, blockTables,
    maxBlocksPerSeq: pg.maxBlocksPerSeq, sampleRows, sampling: sampling ?? GREEDY_ROWS(seqs.length),
  };
}

// ------------------------------------------------------------------ comparing

/**
 * Asserts |got - ref| <= atol + rtol * |ref| everywhere (NaN fails), naming the worst
 * element and how many are out.
 */
function expectClose(label: string, got: ArrayLike<number>, ref: ArrayLike<number>, atol: number, rtol: number): void {
  expect(got.length, `${label}: length`).toBe(ref.length);
  let bad = 0, worst = -1, worstExcess = -Infinity;
  for (let i = 0; i < ref.length; i++) {
    const d = Math.abs(got[i]! - ref[i]!);
    const excess = d - (atol + rtol * Math.abs(ref[i]!));
    if (!(excess <= 0)) {
      bad++;
      if (!(excess <= worstExcess)) {
        worst = i;
        worstExcess = Number.isNaN(excess) ? Infinity : excess;
      }
    }
  }
  expect(bad, `${label}: ${bad} of ${ref.length} outside atol ${atol} + rtol ${rtol}; worst [${worst}]: gpu ${got[worst]} cpu ${ref[worst]}`).toBe(0);
}

/** The CPU's f32 values as the GPU stores them (bf16), for exact comparisons. */
const asBf16 = (x: ArrayLike<number>): Float32Array => bf16ToF32(f32ToBf16(Float32Array.from(x)));

// ------------------------------------------------------------------ both backends

/** A tensor on both backends with the same contents. */
interface Pair {
  readonly cpu: Tensor;
  readonly gpu: Tensor;
}

class Both {
  constructor(readonly cpu: Backend, readonly gpu: Backend) {}

  /**
   * Floats as `dtype` on the GPU (bf16 matmul inputs / f32 matmul outputs, residual,
   * logits) and f32 on the CPU; `cpuData` (default `data`) when the CPU must see what the
   * GPU will make of `data` (e.g. the bf16 KV cache).
   */
  tensor(shape: number[], data: Float32Array, dtype: "bf16" | "f32", cpuData = data): Pair {
    return {
      cpu: this.cpu.upload({ shape, dtype: "f32", data: cpuData }),
      gpu: this.gpu.upload({ shape, dtype: "f32", data }, dtype),
    };
  }

  rows(p: Pair, n: number): Pair {
    return { cpu: this.cpu.rows(p.cpu, n), gpu: this.gpu.rows(p.gpu, n) };
  }

  read(p: Pair): { cpu: Float32Array; gpu: Float32Array } {
    return { cpu: this.cpu.read(p.cpu) as Float32Array, gpu: this.gpu.read(p.gpu) as Float32Array };
  }

  free(...ps: Pair[]): void {
    for (const p of ps) {
      this.cpu.free(p.cpu);
      this.gpu.free(p.gpu);
    }
  }
}

const SENTINEL = 7.25; // exact in bf16; rows past the live count must keep it

function expectUntouched(label: string, full: Float32Array, liveRows: number, width: number): void {
  for (let i = liveRows * width; i < full.length; i++) {
    if (full[i] !== SENTINEL) {
      expect.fail(`${label}: element ${i} (row ${Math.floor(i / width)}, past the ${liveRows} live rows) was written: ${full[i]}`);
    }
  }
}

// ------------------------------------------------------------------ the suite

if (reason !== null) {
  describe.skip(`CUDA ops vs CPU (skipped: ${reason})`, () => it("needs a GPU", () => {}));
} else {
  describe("CUDA ops vs the CPU backend", () => {
    let cuda: CudaBackend;
    let b: Both;

    beforeAll(async () => {
      cuda = await CudaBackend.create({ maxTokens: 4096, maxSeqs: 64 });
      b = new Both(new CpuBackend(), cuda);
    });
    afterAll(() => cuda?.dispose());

    it("embedding: rows of the bf16 table, exactly; padded capacity rows zeroed", () => {
      for (const [V, H, n] of [[1000, 200, 37], [512, 256, 8], [32000, 4096, 5]] as const) {
        const table = b.tensor([V, H], bf16Values(V * H, V + H), "bf16");
        const cap = n + 11;
        const out = b.tensor([cap, H], new Float32Array(cap * H).fill(SENTINEL), "f32");
        const step = makeStep([{ q: n, ctx: n }], paging([n], 16, 1), undefined, V);
        const view = b.rows(out, n);
        b.cpu.embedding(view.cpu, table.cpu, b.cpu.prepare(step));
        b.gpu.embedding(view.gpu, table.gpu, b.gpu.prepare(step));
        const r = b.read(view);
        // The table is bf16 on both sides, so the f32 rows are equal bit for bit.
        expectClose(`embedding V=${V} H=${H}`, r.gpu, r.cpu, 0, 0);
        b.free(table, out);
      }
    });

    it("rmsnorm and addRmsnorm: f32 residual and f32 x in, bf16 out; rows past the live count untouched", () => {
      for (const [H, n, cap] of [[256, 8, 8], [4096, 37, 64], [200, 3, 9], [5120, 1, 4]] as const) {
        const x = b.tensor([cap, H], f32Values(cap * H, H, 3), "f32");
        const w = b.tensor([H], bf16Values(H, H + 1, 1.5), "bf16");
        const out = b.tensor([cap, H], new Float32Array(cap * H).fill(SENTINEL), "bf16");
        const step = makeStep([{ q: n, ctx: n }], paging([n], 16, 2));
        b.cpu.prepare(step);
        b.gpu.prepare(step);
        const xv = b.rows(x, n), ov = b.rows(out, n);
        b.cpu.rmsnorm(ov.cpu, xv.cpu, w.cpu, 1e-5);
        b.gpu.rmsnorm(ov.gpu, xv.gpu, w.gpu, 1e-5);
        // The GPU rounds its f32 result to bf16 (relative 2^-9) and sums squares in f32 in a
        // different order than the CPU's f64 loop (~1e-6 relative): rtol 2^-8.
        let r = b.read(ov);
        expectClose(`rmsnorm H=${H}`, r.gpu, r.cpu, 1e-6, 2 ** -8);
        expectUntouched(`rmsnorm H=${H}`, cuda.read(out.gpu) as Float32Array, n, H);

        // x is an o_proj / down_proj output: f32 with a full mantissa.
        const add = b.tensor([cap, H], f32Values(cap * H, H + 2, 2), "f32");
        b.cpu.addRmsnorm(ov.cpu, xv.cpu, b.rows(add, n).cpu, w.cpu, 1e-6);
        b.gpu.addRmsnorm(ov.gpu, xv.gpu, b.rows(add, n).gpu, w.gpu, 1e-6);
        // residual += x is one correctly rounded f32 addition on both sides: exact.
        const res = b.read(xv);
        expectClose(`addRmsnorm residual H=${H}`, res.gpu, res.cpu, 0, 0);
        r = b.read(ov);
        expectClose(`addRmsnorm out H=${H}`, r.gpu, r.cpu, 1e-6, 2 ** -8);
        b.free(x, w, out, add);
      }
    });

    it("rope: the fused qkv split into q / k / v with rotate-half on q and k, scattered positions, GQA widths", () => {
      for (const [nH, nKv, D, theta] of [[8, 4, 32, 1e4], [32, 8, 128, 5e5], [14, 2, 64, 1e6], [4, 4, 80, 1e4], [2, 1, 36, 1e4]] as const) {
        const n = 29;
        const inv = Float32Array.from({ length: D / 2 }, (_, i) => 1 / theta ** ((2 * i) / D));
        const invFreq = { cpu: b.cpu.upload({ shape: [D / 2], dtype: "f32", data: inv }), gpu: b.gpu.upload({ shape: [D / 2], dtype: "f32", data: inv }, "f32") };
        const W = (nH + 2 * nKv) * D;
        const qkv = b.tensor([n, W], f32Values(n * W, D, 2), "f32");
        const q = b.tensor([n, nH * D], new Float32Array(n * nH * D).fill(SENTINEL), "f32");
        const k = b.tensor([n, nKv * D], new Float32Array(n * nKv * D).fill(SENTINEL), "f32");
        const v = b.tensor([n, nKv * D], new Float32Array(n * nKv * D).fill(SENTINEL), "f32");
        const step = makeStep([{ q: 10, ctx: 10 }, { q: 19, ctx: 5000 }], paging([10, 5000], 16, 3));
        b.cpu.rope(q.cpu, k.cpu, v.cpu, qkv.cpu, invFreq.cpu, D, b.cpu.prepare(step));
        b.gpu.rope(q.gpu, k.gpu, v.gpu, qkv.gpu, invFreq.gpu, D, b.gpu.prepare(step));
        expectClose(`rope v (a copy) nH=${nH}/${nKv} D=${D}`, b.read(v).gpu, b.read(v).cpu, 0, 0);
        // Same f32 angles; sin/cos in f64 rounded to f32 on both sides; the rotation in f64
        // with one f32 rounding on both sides. Equal bit for bit unless CUDA's f64 sincos and
        // V8's differ in a last f64 bit that survives the f32 rounding: then c or s is 1 f32
        // ulp (<= 2^-24) off, which moves a result by <= 2 * 2^-24 (|x| < 2) plus its own
        // rounding: atol 5e-7 absolute, rtol 2^-22. (The old bf16 form needed 2^-8.) D = 36
        // takes the scalar path (D/2 % 8 != 0).
        for (const [name, t] of [["q", q], ["k", k]] as const) {
          const r = b.read(t);
          expectClose(`rope ${name} nH=${nH}/${nKv} D=${D}`, r.gpu, r.cpu, 5e-7, 2 ** -22);
        }
        b.free(q, k, v, qkv);
        b.cpu.free(invFreq.cpu);
        b.gpu.free(invFreq.gpu);
      }
    });

    it("siluMul (f32 fused gate / up, bf16 out) and gatherRows", () => {
      for (const [I, n, cap] of [[704, 8, 8], [11008, 21, 32], [100, 5, 6]] as const) {
        // gate in columns [0, I) of each row, up in [I, 2I).
        const guHost = new Float32Array(cap * 2 * I);
        const gv = f32Values(cap * I, I, 6), uv = f32Values(cap * I, I + 1, 2);
        for (let r = 0; r < cap; r++) {
          guHost.set(gv.subarray(r * I, (r + 1) * I), r * 2 * I);
          guHost.set(uv.subarray(r * I, (r + 1) * I), r * 2 * I + I);
        }
        const gateUp = b.tensor([cap, 2 * I], guHost, "f32");
        const out = b.tensor([cap, I], new Float32Array(cap * I).fill(SENTINEL), "bf16");
        const seqs: Seq[] = [{ q: n - 2, ctx: n - 2 }, { q: 1, ctx: 40 }, { q: 1, ctx: 3 }];
        const step = makeStep(seqs, paging(seqs.map((s) => s.ctx), 16, 4));
        const cs = b.cpu.prepare(step), gs = b.gpu.prepare(step);
        const ov = b.rows(out, n);
        b.cpu.siluMul(ov.cpu, b.rows(gateUp, n).cpu);
        b.gpu.siluMul(ov.gpu, b.rows(gateUp, n).gpu);
        // f32 silu (accurate expf vs f64 exp: ~1e-7 relative) then one bf16 rounding (at most
        // half a bf16 ulp, 2^-9 relative): rtol 2^-8 is that with a factor 2 to spare. The
        // output is a matmul input, so bf16 it stays.
        const r = b.read(ov);
        expectClose(`siluMul I=${I}`, r.gpu, r.cpu, 1e-6, 2 ** -8);
        expectUntouched(`siluMul I=${I}`, cuda.read(out.gpu) as Float32Array, n, I);
        if (I % 8 === 0) {
          const m = seqs.length;
          const last = b.tensor([m + 3, I], new Float32Array((m + 3) * I), "bf16");
          const lv = b.rows(last, m);
          b.cpu.gatherRows(lv.cpu, ov.cpu, cs);
          b.gpu.gatherRows(lv.gpu, ov.gpu, gs);
          const g = b.read(lv);
          // A copy of rows the GPU already holds: compare to its own rows exactly.
          const src = cuda.read(ov.gpu) as Float32Array;
          const want = Float32Array.from(Array.from(step.sampleRows).flatMap((row) => Array.from(src.subarray(row * I, (row + 1) * I))));
          expectClose(`gatherRows I=${I}`, g.gpu, want, 0, 0);
          expectClose(`gatherRows I=${I} vs cpu`, g.gpu, asBf16(g.cpu), 1e-6, 2 ** -7);
          b.free(last);
        }
        b.free(gateUp, out);
      }
    });

    /**
     * Runs `steps` of attention on both backends (each step writes its k/v and attends over
     * the cache so far) and compares every step's output.
     */
    function attentionCase(label: string, nH: number, nKv: number, D: number, pg: Paging & { numBlocks: number }, steps: Seq[][], seed: number): void {
      const spec = { numLayers: 2, numBlocks: pg.numBlocks, blockSize: pg.blockSize, numKvHeads: nKv, headDim: D };
      const kv: { cpu: KvCache; gpu: KvCache } = { cpu: b.cpu.createKvCache(spec), gpu: b.gpu.createKvCache(spec) };
      const scale = 1 / Math.sqrt(D);
      try {
        steps.forEach((seqs, si) => {
          const step = makeStep(seqs, pg);
          const n = step.numTokens, cap = n + 5;
          // q, k, v are f32 projections; the GPU rounds k and v to bf16 into its cache (the
          // KV cache is activation-dtype by contract), so the CPU gets those bf16 values: the
          // comparison then isolates the kernels, and a GPU that failed to round (or rounded
          // another way than to nearest even) would fail it.
          const kf = f32Values(cap * nKv * D, seed + 10 * si + 1, 1.5), vf = f32Values(cap * nKv * D, seed + 10 * si + 2);
          const q = b.tensor([cap, nH * D], f32Values(cap * nH * D, seed + 10 * si, 1.5), "f32");
          const k = b.tensor([cap, nKv * D], kf, "f32", asBf16(kf));
          const v = b.tensor([cap, nKv * D], vf, "f32", asBf16(vf));
          const out = b.tensor([cap, nH * D], new Float32Array(cap * nH * D).fill(SENTINEL), "bf16");
          const cs = b.cpu.prepare(step), gs = b.gpu.prepare(step);
          const [qv, kvv, vv, ov] = [b.rows(q, n), b.rows(k, n), b.rows(v, n), b.rows(out, n)];
          b.cpu.attention(ov.cpu, qv.cpu, kvv.cpu, vv.cpu, kv.cpu, 1, scale, cs);
          b.gpu.attention(ov.gpu, qv.gpu, kvv.gpu, vv.gpu, kv.gpu, 1, scale, gs);
          const r = b.read(ov);
          // Outputs are convex combinations of V rows in [-1, 1]. q enters QK^T as hi + lo bf16
          // parts (~2^-17 relative, negligible). The GPU rounds the softmax weights to bf16
          // for the PV product (relative 2^-9 each, averaging out over the context) and the
          // output to bf16 (2^-9; it is the o_proj input, so it stays bf16 and the bound
          // cannot tighten): 1e-2 absolute and relative is ~4 bf16 ulps at 1, and far below
          // any real error (a wrong key, mask or scale moves outputs by ~0.1 or more).
          expectClose(`${label} step ${si}`, r.gpu, r.cpu, 1e-2, 1e-2);
          expectUntouched(`${label} step ${si}`, cuda.read(out.gpu) as Float32Array, n, nH * D);
          b.free(q, k, v, out);
        });
      } finally {
        b.cpu.freeKvCache(kv.cpu);
        b.gpu.freeKvCache(kv.gpu);
      }
    }

    for (const [nH, nKv, D] of [[8, 4, 32], [32, 8, 128], [14, 2, 64], [4, 4, 64], [16, 1, 80], [32, 1, 96]] as const) {
      it(`attention prefill, chunked prefill, decode and mixed steps: nH=${nH} nKv=${nKv} D=${D}`, () => {
        // Three sequences: a long prompt prefilled in two chunks, a short one, one decoding.
        const finalCtx = [150, 9, 70];
        const pg = paging(finalCtx, 16, nH + D);
        attentionCase(`attention ${nH}/${nKv}/${D}`, nH, nKv, D, pg, [
          [{ q: 100, ctx: 100 }, { q: 7, ctx: 7 }, { q: 66, ctx: 66 }], // prefill (ragged lengths)
          [{ q: 47, ctx: 147 }, { q: 1, ctx: 8 }, { q: 1, ctx: 67 }], // chunked prefill + decode in one step
          [{ q: 1, ctx: 148 }, { q: 1, ctx: 9 }, { q: 1, ctx: 68 }], // decode only
          [{ q: 2, ctx: 150 }, { q: 0, ctx: 9 }, { q: 2, ctx: 70 }], // two-token chunks, an idle sequence
        ], nH * 100 + D);
      });
    }

    it("attention decode over a ~3000-token context (flash-decoding split path) beside short ones", () => {
      const [nH, nKv, D] = [8, 2, 128];
      const finalCtx = [3001, 300, 2, 257];
      const pg = paging(finalCtx, 16, 77);
      attentionCase("long decode", nH, nKv, D, pg, [
        [{ q: 2999, ctx: 2999 }, { q: 299, ctx: 299 }, { q: 1, ctx: 1 }, { q: 256, ctx: 256 }],
        [{ q: 1, ctx: 3000 }, { q: 1, ctx: 300 }, { q: 1, ctx: 2 }, { q: 1, ctx: 257 }],
        [{ q: 1, ctx: 3001 }, { q: 0, ctx: 300 }, { q: 0, ctx: 2 }, { q: 0, ctx: 257 }],
      ], 4242);
    });

    it("attention with block size 8 and a single sequence of one token", () => {
      const pg = paging([2, 34], 8, 5);
      attentionCase("block 8", 8, 4, 64, pg, [
        [{ q: 1, ctx: 1 }, { q: 0, ctx: 0 }],
        [{ q: 1, ctx: 2 }, { q: 33, ctx: 33 }],
        [{ q: 0, ctx: 2 }, { q: 1, ctx: 34 }],
      ], 99);
    });

    /** Loads the same adapters into a stack on both backends. */
    // With output splits (a fused q/k/v or gate/up), split j of a slot of rank r gets rank
    // r >> j (so members' ranks differ, and a rank-1 slot's later splits are absent) and its
    // own scale.
    function loraStacks(numSlots: number, maxRank: number, K: number, dims: number[], ranks: (number | null)[], seed: number): { cpu: LoraStack; gpu: LoraStack } {
      const s = { cpu: b.cpu.createLoraStack(numSlots, maxRank, K, dims), gpu: b.gpu.createLoraStack(numSlots, maxRank, K, dims) };
      ranks.forEach((r0, slot) => {
        if (r0 === null) return;
        dims.forEach((N, j) => {
          const r = r0 >> j;
          const a = bf16Values(r * K, seed + slot + 7 * j, 0.05), bb = bf16Values(N * r, seed + 100 + slot + 7 * j, 0.05);
          const scale = (16 + j) / Math.max(1, r);
          b.cpu.writeLoraSlot(s.cpu, slot, r, scale, a, bb, j);
          b.gpu.writeLoraSlot(s.gpu, slot, r, scale, a, bb, j);
        });
      });
      return s;
    }

    const LORA_CASES: { label: string; K: number; N: number; dims?: number[]; maxRank: number; ranks: (number | null)[]; seqs: Seq[] }[] = [
      {
        label: "decode rows, 32 x 4096 -> 4096, r 16 (BGMV)", K: 4096, N: 4096, maxRank: 16, ranks: [16, 8, 16, 4],
        seqs: Array.from({ length: 32 }, (_, i) => ({ q: 1, ctx: 10 + i, slot: i % 5 === 4 ? -1 : i % 4 })),
      },
      {
        label: "decode rows, 4096 -> 11008, mixed ranks (BGMV)", K: 4096, N: 11008, maxRank: 16, ranks: [16, 3, 13, 0],
        seqs: Array.from({ length: 9 }, (_, i) => ({ q: 1, ctx: 5, slot: [0, 1, 2, 3, -1, 2, 2, 0, 1][i]! })),
      },
      {
        label: "prefill segments, ragged (SGMV)", K: 704, N: 256, maxRank: 8, ranks: [8, 5, 8],
        seqs: [{ q: 70, ctx: 70, slot: 0 }, { q: 3, ctx: 3, slot: 0 }, { q: 130, ctx: 130, slot: 2 }, { q: 17, ctx: 17, slot: -1 }, { q: 40, ctx: 40, slot: 1 }],
      },
      {
        label: "mixed prefill + decode, max rank 64 (SGMV r64 + BGMV)", K: 256, N: 704, maxRank: 64, ranks: [64, 33, 7, null],
        seqs: [{ q: 1, ctx: 9, slot: 1 }, { q: 90, ctx: 90, slot: 0 }, { q: 1, ctx: 4, slot: 2 }, { q: 65, ctx: 65, slot: 1 }, { q: 1, ctx: 2, slot: -1 }, { q: 12, ctx: 30, slot: 2 }],
      },
      {
        label: "fused q/k/v splits (GQA widths), decode rows (BGMV)", K: 4096, N: 6144, dims: [4096, 1024, 1024], maxRank: 16,
        ranks: [16, 8, 1, 0], seqs: Array.from({ length: 20 }, (_, i) => ({ q: 1, ctx: 7, slot: i % 6 === 5 ? -1 : i % 4 })),
      },
      {
        label: "fused gate/up splits, mixed prefill + decode (SGMV + BGMV)", K: 256, N: 1408, dims: [704, 704], maxRank: 32,
        ranks: [32, 5, 16], seqs: [{ q: 1, ctx: 9, slot: 1 }, { q: 70, ctx: 70, slot: 0 }, { q: 1, ctx: 4, slot: 2 }, { q: 9, ctx: 30, slot: 2 }],
      },
      {
        label: "prefill, max rank 32, one row per adapter change", K: 512, N: 1024, maxRank: 32, ranks: [32, 17],
        seqs: [{ q: 64, ctx: 64, slot: 1 }, { q: 64, ctx: 64, slot: 0 }, { q: 2, ctx: 2, slot: 1 }],
      },
    ];

    for (const c of LORA_CASES) {
      it(`lora: ${c.label}`, () => {
        const stack = loraStacks(c.ranks.length, c.maxRank, c.K, c.dims ?? [c.N], c.ranks, c.K + c.N);
        const step = makeStep(c.seqs, paging(c.seqs.map((s) => Math.max(1, s.ctx)), 16, 6));
        const n = step.numTokens, cap = n + 7;
        // x (the normed hidden state / attention output / silu-mul output) is bf16; out (the
        // base projection's output) is f32 with full mantissas.
        const x = b.tensor([cap, c.K], bf16Values(cap * c.K, c.K), "bf16");
        const out = b.tensor([cap, c.N], f32Values(cap * c.N, c.N, 0.5), "f32");
        const before = cuda.read(out.gpu) as Float32Array;
        const ov = b.rows(out, n), xv = b.rows(x, n);
        b.cpu.lora(ov.cpu, xv.cpu, stack.cpu, b.cpu.prepare(step));
        b.gpu.lora(ov.gpu, xv.gpu, stack.gpu, b.gpu.prepare(step));
        const r = b.read(ov);
        // out = f32(out + delta) on both sides. The delta's inputs (x, A, B) are bf16 on both;
        // the GPU's f32 dot products (K terms, other order) differ from the CPU's f64 ones by
        // ~1e-6 of the delta, and the f32 sum's rounding is the same: BGMV (decode rows) gets
        // atol 1e-5 (|out| < 1.5). The SGMV path (prefill rows) also rounds the rank-r
        // intermediate to bf16 as the tensor-core operand: up to 2^-9 of each term of the
        // delta, so atol grows by 2^-8 of the largest |delta| (the old bf16 out needed 1e-2
        // absolute and relative).
        const hasPrefill = c.seqs.some((q) => q.q > 1);
        let maxDelta = 0;
        const beforeCpu = f32Values(cap * c.N, c.N, 0.5);
        for (let i = 0; i < r.cpu.length; i++) maxDelta = Math.max(maxDelta, Math.abs(r.cpu[i]! - beforeCpu[i]!));
        expect(maxDelta, `lora ${c.label}: the adapters change out`).toBeGreaterThan(1e-3);
        expectClose(`lora ${c.label}`, r.gpu, r.cpu, 1e-5 + (hasPrefill ? 2 ** -8 * maxDelta : 0), 0);
        // Rows without an adapter (slot -1, rank 0, or past the live count) are untouched.
        const after = cuda.read(out.gpu) as Float32Array;
        for (let t = 0; t < cap; t++) {
          const slot = t < n ? step.loraSlots[t]! : -1;
          if (slot >= 0 && (c.ranks[slot] ?? 0) > 0) continue;
          for (let j = 0; j < c.N; j++) {
            if (after[t * c.N + j] !== before[t * c.N + j]) expect.fail(`lora ${c.label}: row ${t} (slot ${slot}) changed at ${j}`);
          }
        }
        b.free(x, out);
        b.cpu.freeLoraStack(stack.cpu);
        b.gpu.freeLoraStack(stack.gpu);
      });
    }

    /** A LORA_CASES case with a base weight: its stacks, step, x, weight and garbage out (views of the step's rows). */
    function linearLoraCase(c: (typeof LORA_CASES)[number]) {
      const stack = loraStacks(c.ranks.length, c.maxRank, c.K, c.dims ?? [c.N], c.ranks, c.K + c.N);
      const step = makeStep(c.seqs, paging(c.seqs.map((s) => Math.max(1, s.ctx)), 16, 6));
      const n = step.numTokens, cap = n + 7;
      const x = b.tensor([cap, c.K], bf16Values(cap * c.K, c.K), "bf16");
      const w = b.tensor([c.N, c.K], bf16Values(c.N * c.K, c.N + 3, 0.05), "bf16");
      const out = b.tensor([cap, c.N], f32Values(cap * c.N, c.N, 1e3), "f32");
      const free = (): void => {
        b.free(x, w, out);
        b.cpu.freeLoraStack(stack.cpu);
        b.gpu.freeLoraStack(stack.gpu);
      };
      const xv = b.rows(x, n);
      /** The largest |out - x w^T| of a CPU result: the size of the LoRA term it holds. */
      const termSize = (outCpu: Float32Array): number => {
        const plain = b.cpu.empty([n, c.N], "f32");
        b.cpu.linear(plain, xv.cpu, w.cpu);
        const base = b.cpu.read(plain) as Float32Array;
        b.cpu.free(plain);
        let maxDelta = 0;
        for (let i = 0; i < base.length; i++) maxDelta = Math.max(maxDelta, Math.abs(outCpu[i]! - base[i]!));
        return maxDelta;
      };
      return { stack, step, n, w, ov: b.rows(out, n), xv, free, termSize };
    }

    // LoraLinear's GPU order (backend.ts loraFirst): the LoRA term written first (the fused
    // decode kernel's write mode on decode-only steps; zero + add otherwise), then the base
    // GEMM accumulating onto it, against the CPU's GEMM-then-add. out starts as garbage: every
    // live row must be overwritten.
    for (const c of LORA_CASES) {
      it(`loraFirst + accumulating linear: ${c.label}`, () => {
        const { stack, step, w, ov, xv, free } = linearLoraCase(c);
        const cpuStep = b.cpu.prepare(step);
        b.cpu.linear(ov.cpu, xv.cpu, w.cpu);
        b.cpu.lora(ov.cpu, xv.cpu, stack.cpu, cpuStep);
        const gpuStep = b.gpu.prepare(step);
        expect(cuda.loraFirst, "loraFirst is on (INLAID_LORA_FIRST unset)").toBeDefined();
        const wrote = cuda.loraFirst!(ov.gpu, xv.gpu, stack.gpu, gpuStep);
        expect(wrote, "every case has adapter rows").toBe(true);
        b.gpu.linear(ov.gpu, xv.gpu, w.gpu, undefined, wrote);
        const r = b.read(ov);
        let maxAbs = 0;
        for (const v of r.cpu) maxAbs = Math.max(maxAbs, Math.abs(v));
        // The GEMM's f32 sums over K bf16 products in another order than the CPU's: ~1e-6
        // relative to the row's scale; SGMV's bf16 intermediate as in the lora test above.
        const hasPrefill = c.seqs.some((q) => q.q > 1);
        expectClose(`loraFirst ${c.label}`, r.gpu, r.cpu, 1e-4 * maxAbs + (hasPrefill ? 2 ** -8 * maxAbs : 0), 0);
        free();
      });
    }

    // The all-slots path (backend.ts attachLoraStack + linearLora): the stack's A moves beside
    // the base weight; on decode-only steps one GEMM makes [base | every slot's shrink] and a
    // one-phase expand writes base + term; other steps decline (the caller's usual path).
    // Against the CPU's GEMM-then-add, out starting as garbage; then a slot rewritten after
    // the move must land in the moved A.
    for (const c of LORA_CASES) {
      it(`attached linearLora: ${c.label}`, () => {
        const dims = c.dims ?? [c.N];
        const { stack, step, w, ov, xv, free, termSize } = linearLoraCase(c);
        const small = c.maxRank % 8 === 0 && c.ranks.length * dims.length * c.maxRank <= 1024;
        expect(cuda.attachLoraStack!(stack.gpu, w.gpu), "the stack attaches").toBe(c.maxRank % 8 === 0 && process.env.INLAID_LORA_SLOTS !== "0");
        const decodeOnly = c.seqs.every((q) => q.q === 1);
        // Rounds 2 and 3: only slot 0 in use (the GEMM covers one slot), then no adapter at
        // all (the plain GEMM).
        const only = (keep: (slot: number) => boolean): StepBatch =>
          makeStep(c.seqs.map((q) => ({ ...q, slot: keep(q.slot ?? -1) ? q.slot : -1 })), paging(c.seqs.map((q) => Math.max(1, q.ctx)), 16, 6));
        const steps = [step, step, only((sl) => sl === 0), only(() => false)];
        for (const round of [0, 1, 2, 3]) {
          const st = steps[round]!;
          if (round === 1) {
            // Slot 0 rewritten with other (bf16-exact, as the device keeps them) values, rank 8
            // or the max rank when smaller.
            const r = Math.min(8, c.maxRank);
            for (let j = 0; j < dims.length; j++) {
              const a = bf16Values(r * c.K, 31 + j, 0.05), bb = bf16Values(dims[j]! * r, 37 + j, 0.05);
              b.cpu.writeLoraSlot(stack.cpu, 0, r, 0.75, a, bb, j);
              b.gpu.writeLoraSlot(stack.gpu, 0, r, 0.75, a, bb, j);
            }
          }
          const cpuStep = b.cpu.prepare(st), gpuStep = b.gpu.prepare(st);
          b.cpu.linear(ov.cpu, xv.cpu, w.cpu);
          b.cpu.lora(ov.cpu, xv.cpu, stack.cpu, cpuStep);
          const took = cuda.linearLora!(ov.gpu, xv.gpu, w.gpu, stack.gpu, gpuStep);
          expect(took, "linearLora takes the attached decode-only steps").toBe(small && decodeOnly && process.env.INLAID_LORA_SLOTS !== "0");
          if (!took) {
            b.gpu.linear(ov.gpu, xv.gpu, w.gpu);
            b.gpu.lora(ov.gpu, xv.gpu, stack.gpu, gpuStep);
          }
          const r = b.read(ov);
          let maxAbs = 0;
          for (const v of r.cpu) maxAbs = Math.max(maxAbs, Math.abs(v));
          const tol = 1e-4 * maxAbs + (decodeOnly ? 0 : 2 ** -8 * maxAbs);
          // The LoRA term must stand well above the tolerance, or a missing term would pass.
          const maxDelta = termSize(r.cpu);
          // (Prefill steps are the usual path's, tested above, with SGMV's looser tolerance.)
          if (round === 3) expect(maxDelta, "no adapter rows: the plain GEMM").toBe(0);
          else if (decodeOnly) expect(maxDelta, `linearLora ${c.label}: the LoRA term is visible at this tolerance`).toBeGreaterThan(20 * tol);
          expectClose(`linearLora ${c.label} (round ${round})`, r.gpu, r.cpu, tol, 0);
        }
        if (small && decodeOnly && process.env.INLAID_LORA_SLOTS !== "0") {
          // The same call captured in a graph and replayed, on a new x and onto garbage, against
          // the eager call on that x. In the graph the expand hangs off the GEMM's launch-order
          // port (launcher.ts; INLAID_GEMM_EARLY=0, INLAID_PDL=0 or no graphs leave it on the
          // usual launch): it runs alongside the GEMM and must still read the GEMM's output for
          // this x, not the previous call's, which is still in the scratch it reads.
          const gpuStep = b.gpu.prepare(step);
          const edges = cuda.launcher.launchOrderEdges;
          const fwd = (): Tensor => {
            cuda.linearLora!(ov.gpu, xv.gpu, w.gpu, stack.gpu, gpuStep);
            return ov.gpu;
          };
          const key = `attached linearLora ${c.label}`;
          cuda.replay(key, fwd); // eager, then captured
          cuda.fillRandom(xv.gpu, 77, 1);
          cuda.fillRandom(ov.gpu, 99, 1e3);
          cuda.replay(key, fwd); // the graph
          const replayed = Float32Array.from(b.read(ov).gpu);
          cuda.fillRandom(ov.gpu, 98, 1e3);
          fwd();
          const eager = b.read(ov).gpu;
          let maxAbs = 0;
          for (const v of eager) maxAbs = Math.max(maxAbs, Math.abs(v));
          expectClose(`linearLora ${c.label}: replayed graph against eager`, replayed, eager, 1e-5 * maxAbs, 0);
          const hung = cuda.device.computeCapability[0] >= 9 && ["INLAID_PDL", "INLAID_GEMM_EARLY", "INLAID_CUDA_GRAPHS"].every((k) => process.env[k] !== "0");
          expect(cuda.launcher.launchOrderEdges - edges, "expands captured on the GEMM's launch-order port").toBe(hung ? 1 : 0);
        }
        free();
      });
    }

    // linearQuantizedLora (INLAID_QGEMM_LORA, on by default): the low-bit GEMM's launch also makes
    // the shrink of the step's slots (quant_gemm_lora_*), then the expand in place. Against the
    // CPU's dequantized matmul then `lora`; bit widths vary by case (2 and 3 bits at 4 warps per
    // CTA decline: their stages are too small for a unit of A).
    LORA_CASES.forEach((c, ci) => {
      const bits = ([4, 8, 2, 3] as const)[ci % 4]!;
      it(`linearQuantizedLora, ${bits}-bit: ${c.label}`, () => {
        const dims = c.dims ?? [c.N];
        const was = cuda.quantLoraFused;
        cuda.quantLoraFused = true;
        const q = randomQuantized({ bits, groupSize: 64, sym: ci % 2 === 0, descAct: false }, c.K, c.N, 400 + ci);
        const qc = b.cpu.uploadQuantized!(q), qg = cuda.uploadQuantized(q);
        try {
          const { stack, step, ov, xv, free } = linearLoraCase(c);
          const small = c.maxRank % 8 === 0 && c.ranks.length * dims.length * c.maxRank <= 1024;
          const decodeOnly = c.seqs.every((s) => s.q === 1);
          const only = (keep: (slot: number) => boolean): StepBatch =>
            makeStep(c.seqs.map((s) => ({ ...s, slot: keep(s.slot ?? -1) ? s.slot : -1 })), paging(c.seqs.map((s) => Math.max(1, s.ctx)), 16, 6));
          for (const [round, st] of [step, only((sl) => sl === 0), only(() => false)].entries()) {
            const cpuStep = b.cpu.prepare(st), gpuStep = b.gpu.prepare(st);
            b.cpu.linearQuantized!(ov.cpu, xv.cpu, qc);
            const plain = Float32Array.from(b.cpu.read(ov.cpu) as Float32Array);
            b.cpu.lora(ov.cpu, xv.cpu, stack.cpu, cpuStep);
            const took = cuda.linearQuantizedLora(ov.gpu, xv.gpu, qg, stack.gpu, gpuStep);
            if (bits >= 4) expect(took, "takes the decode-only steps within the all-slots column limit").toBe(small && decodeOnly);
            if (!took) {
              cuda.linearQuantized(ov.gpu, xv.gpu, qg);
              cuda.lora(ov.gpu, xv.gpu, stack.gpu, gpuStep);
            }
            const r = b.read(ov);
            let maxAbs = 0, term = 0;
            for (let i = 0; i < r.cpu.length; i++) {
              maxAbs = Math.max(maxAbs, Math.abs(r.cpu[i]!));
              term = Math.max(term, Math.abs(r.cpu[i]! - plain[i]!));
            }
            const tol = 1e-4 * maxAbs + (decodeOnly ? 0 : 2 ** -8 * maxAbs);
            // The term must stand above the tolerance, or a missing term would pass (the 8-bit
            // weights make outputs ~16x those of 4 bits, and the tolerance with them).
            if (round < 2 && took) expect(term, `${c.label}: the LoRA term is visible at this tolerance`).toBeGreaterThan(5 * tol);
            expectClose(`linearQuantizedLora ${bits}-bit ${c.label} (round ${round})`, r.gpu, r.cpu, tol, 0);
          }
          free();
        } finally {
          cuda.quantLoraFused = was;
          b.cpu.freeQuantized!(qc);
          cuda.freeQuantized(qg);
        }
      });
    });

    /** Sampling rows: one per parameter set, each with its own logits row. */
    interface Row {
      readonly t: number;
      readonly p: number;
      readonly k: number;
      readonly seed: number;
      readonly counter: number;
      readonly logits?: "flat" | "ties" | "peaked";
    }

    function logitsFor(rows: readonly Row[], V: number, seed: number): Float32Array {
      const all = new Float32Array(rows.length * V);
      rows.forEach((r, i) => {
        const row = all.subarray(i * V, (i + 1) * V);
        const base = bf16Values(V, seed + i, 1);
        for (let j = 0; j < V; j++) {
          // Spread like an LM's logits: a few strong tokens over a long tail.
          row[j] = base[j]! * 4 + (j % 97 === 5 ? 6 : 0);
        }
        if (r.logits === "flat") row.fill(0.5);
        if (r.logits === "ties") {
          row[V - 3] = 20;
          row[7] = 20;
          row[V >> 1] = 20;
        }
        if (r.logits === "peaked") row[V - 1] = 40;
      });
      return all;
    }

    const SAMPLE_ROWS: Row[] = [
      { t: 0, p: 1, k: 0, seed: 0, counter: 0 },
      { t: 0, p: 1, k: 0, seed: 0, counter: 0, logits: "ties" },
      { t: 0, p: 1, k: 0, seed: 0, counter: 0, logits: "flat" },
      { t: 1, p: 1, k: 0, seed: 1, counter: 0 }, // pure temperature: the whole-row scan
      { t: 0.7, p: 0.9, k: 50, seed: 2, counter: 3 },
      { t: 0.9, p: 0.95, k: 50, seed: 1234, counter: 17 },
      { t: 1.5, p: 0.95, k: 0, seed: 3, counter: 1 }, // nucleus that may reach past the candidates
      { t: 1, p: 0.5, k: 0, seed: 4, counter: 9 },
      { t: 1, p: 1, k: 1, seed: 5, counter: 2 },
      { t: 1, p: 1e-6, k: 0, seed: 6, counter: 4 },
      { t: 2, p: 1, k: 5000, seed: 7, counter: 5 }, // top-k beyond the candidate capacity
      { t: 1, p: 0.3, k: 0, seed: 8, counter: 6, logits: "flat" }, // every token tied: bisection paths
      { t: 1, p: 1, k: 3, seed: 9, counter: 7, logits: "ties" },
      { t: 0.01, p: 0.8, k: 0, seed: 10, counter: 8, logits: "peaked" },
      { t: 1, p: 0.9, k: 0, seed: 0xffffffff, counter: 0xfffffffe },
    ];

    for (const V of [512, 1000, 32000, 128256]) {
      it(`sample: greedy, seeded top-k / top-p draws and top logprobs equal the CPU's (V=${V})`, () => {
        for (const nTop of [0, 5, 20]) {
          // The same parameter sets under many counters: 3 passes over the rows.
          const rows = [0, 1, 2].flatMap((pass) => SAMPLE_ROWS.map((r) => ({ ...r, counter: r.counter + 1000 * pass })));
          const m = rows.length;
          const sampling: SamplingBatch = {
            temperature: Float32Array.from(rows, (r) => r.t), topP: Float32Array.from(rows, (r) => r.p),
            topK: Int32Array.from(rows, (r) => r.k), seeds: Uint32Array.from(rows, (r) => r.seed),
            counters: Uint32Array.from(rows, (r) => r.counter), numTopLogprobs: nTop,
          };
          const seqs: Seq[] = rows.map(() => ({ q: 1, ctx: 1 }));
          const step = makeStep(seqs, paging(seqs.map(() => 1), 16, 8), sampling);
          const data = logitsFor(rows, V, V + nTop);
          const cap = m + 6;
          const full = new Float32Array(cap * V);
          full.set(data);
          const logits = b.tensor([cap, V], full, "f32");
          const lv = b.rows(logits, m);
          const want = b.cpu.sample(lv.cpu, b.cpu.prepare(step));
          const got = b.gpu.sample(lv.gpu, b.gpu.prepare(step));
          const label = `V=${V} nTop=${nTop}`;
          // Tokens: the same keep set and the same index-order scan of the same uniform draw.
          expect(Array.from(got.tokens), `${label} tokens`).toEqual(Array.from(want.tokens));
          // Log-softmax of the raw f32 logits: f32 log-sum-exp on the GPU vs f64 on the CPU.
          expectClose(`${label} logprobs`, got.logprobs, want.logprobs, 1e-3, 0);
          expect(Array.from(got.topIds), `${label} top ids`).toEqual(Array.from(want.topIds));
          expectClose(`${label} top logprobs`, got.topLogprobs, want.topLogprobs, 1e-3, 0);
          b.free(logits);
        }
      });
    }

    /** The per-backend tensors of the mini-forward below (dtypes as in llama.ts). */
    interface Mini {
      table: Tensor; w1: Tensor; w2: Tensor; wqkv: Tensor; wgu: Tensor; wo: Tensor; bqkv: Tensor;
      invFreq: Tensor; kv: KvCache; stack: LoraStack;
      res: Tensor; normed: Tensor; qkv: Tensor; qx: Tensor; kx: Tensor; vx: Tensor; att: Tensor; hid: Tensor; gu: Tensor;
      act: Tensor; last: Tensor; logits: Tensor;
    }

    /**
     * Every op of a decoder layer in engine order and in the model's dtypes, on workspace
     * views of the live count: what a captured decode graph holds.
     */
    function miniForward(be: Backend, t: Mini, step: ReturnType<Backend["prepare"]>, D: number): Tensor {
      const n = step.batch.numTokens, m = step.batch.sampleRows.length;
      const r = (x: Tensor) => be.rows(x, n);
      const [res, normed, qkv, qx, kx, vx, att, hid, gu, act] =
        [r(t.res), r(t.normed), r(t.qkv), r(t.qx), r(t.kx), r(t.vx), r(t.att), r(t.hid), r(t.gu), r(t.act)];
      be.embedding(res, t.table, step);
      be.rmsnorm(normed, res, t.w1, 1e-5);
      be.linear(qkv, normed, t.wqkv, t.bqkv);
      be.lora(qkv, normed, t.stack, step);
      be.rope(qx, kx, vx, qkv, t.invFreq, D, step);
      be.attention(att, qx, kx, vx, t.kv, 0, 1 / Math.sqrt(D), step);
      be.linear(hid, att, t.wo);
      be.addRmsnorm(normed, res, hid, t.w2, 1e-5);
      be.linear(gu, normed, t.wgu);
      be.siluMul(act, gu);
      be.linear(hid, act, t.wo);
      be.addRmsnorm(normed, res, hid, t.w1, 1e-5);
      const last = be.rows(t.last, m), logits = be.rows(t.logits, m);
      be.gatherRows(last, normed, step);
      be.linear(logits, last, t.table);
      return logits;
    }

    it("a captured decode graph replays correctly for other steps of its bucket (live counts read on the device)", () => {
      const nH = 4, D = 64, H = nH * D, V = 512, cap = 1024;
      const prompt = Array.from({ length: 30 }, (_, i) => 1 + ((i * 7) % 40));
      const pg = paging(prompt.map((p) => p + 8), 16, 123);
      const mk = (be: Backend, gpu: boolean): Mini => {
        const up = (shape: number[], data: Float32Array, dtype: "bf16" | "f32") =>
          gpu ? be.upload({ shape, dtype: "f32", data }, dtype) : be.upload({ shape, dtype: "f32", data });
        const inv = Float32Array.from({ length: D / 2 }, (_, i) => 1 / 1e4 ** ((2 * i) / D));
        const stack = be.createLoraStack(3, 16, H, [H, H, H]);
        for (const [slot, rank] of [[0, 16], [1, 8]] as const) {
          for (let j = 0; j < 3; j++) {
            const r = j === 1 ? rank / 2 : rank;
            be.writeLoraSlot(stack, slot, r, 2, bf16Values(r * H, 50 + slot + 3 * j, 0.05), bf16Values(H * r, 60 + slot + 3 * j, 0.05), j);
          }
        }
        const e = (cols: number, dtype: "bf16" | "f32", rows = cap) => be.empty([rows, cols], dtype);
        const mat = (seed: number) => up([H, H], bf16Values(H * H, seed, 0.1), "bf16");
        return {
          table: up([V, H], bf16Values(V * H, 1), "bf16"), w1: up([H], bf16Values(H, 2, 1.5), "bf16"),
          w2: up([H], bf16Values(H, 3, 1.5), "bf16"), wqkv: up([3 * H, H], bf16Values(3 * H * H, 4, 0.1), "bf16"),
          wgu: up([2 * H, H], bf16Values(2 * H * H, 5, 0.1), "bf16"), wo: mat(7),
          bqkv: up([3 * H], f32Values(3 * H, 8, 0.5), "f32"), invFreq: up([D / 2], inv, "f32"),
          kv: be.createKvCache({ numLayers: 1, numBlocks: pg.numBlocks, blockSize: pg.blockSize, numKvHeads: nH, headDim: D }),
          stack, res: e(H, "f32"), normed: e(H, "bf16"), qkv: e(3 * H, "f32"), qx: e(H, "f32"), kx: e(H, "f32"), vx: e(H, "f32"),
          att: e(H, "bf16"), hid: e(H, "f32"), gu: e(2 * H, "f32"), act: e(H, "bf16"), last: e(H, "bf16", 64), logits: e(V, "f32", 64),
        };
      };
      const tc = mk(b.cpu, false), tg = mk(b.gpu, true);
      const ctx = [...prompt];
      const slotOf = (i: number) => (i % 3 === 2 ? -1 : i % 2);
      const run = (seqs: Seq[], label: string, graph: boolean) => {
        const step = makeStep(seqs, pg, undefined, seqs.length * 31 + seqs[0]!.ctx);
        const want = b.cpu.read(miniForward(b.cpu, tc, b.cpu.prepare(step), D)) as Float32Array;
        const ps = b.gpu.prepare(step);
        const out = graph ? b.gpu.replay!("ops-mini-decode", () => miniForward(b.gpu, tg, ps, D)) : miniForward(b.gpu, tg, ps, D);
        const got = b.gpu.read(out) as Float32Array;
        // A whole layer plus the lm_head: the GPU rounds each matmul input (normed x3,
        // attention output, silu-mul output, the gathered last hidden) to bf16, 2^-9 relative
        // each, and the cache's K / V; every other value is f32 on both sides. Logits are
        // sums of H = 256 products of O(1) values (|logit| up to ~10): 5e-2 absolute and
        // relative, the reference suite's own bar for the demo model's logits. Measured on
        // an H200: the eager 30-token prefill put 1 of 15360 logits 0.06 off (random
        // weights, no training to keep activations tame), so the bar here is 1e-1 absolute.
        expectClose(label, got, want, 1e-1, 5e-2);
      };
      // The prompts (mixed prefill and one-token prompts), eagerly.
      run(prompt.map((p, i) => ({ q: p, ctx: p, slot: slotOf(i) })), "prompts", false);
      // Decode steps of 30, 25 and 27 live sequences share the bucket of 32: one graph.
      const before = cuda.graphCount;
      for (const live of [30, 25, 27, 32 - 2]) {
        const seqs = ctx.slice(0, live).map((c, i) => ({ q: 1, ctx: c + 1, slot: slotOf(i) }));
        for (let i = 0; i < live; i++) ctx[i]! += 1;
        run(seqs, `decode of ${live} sequences`, true);
      }
      // One graph for the four decode steps (none when INLAID_CUDA_GRAPHS=0 runs them eagerly).
      expect(cuda.graphCount).toBe(before + (process.env.INLAID_CUDA_GRAPHS === "0" ? 0 : 1));
    });

    it("decodeSteps: n steps from one call (advance_decode_step between them) equal the steps the host builds with nextDecodeBatch", () => {
      const nH = 4, D = 64, H = nH * D, V = 512, cap = 1024, bs = 16, n = 4;
      // Contexts that cross a block boundary within the n steps (14 + 4 > 16, 31 + 4 > 32).
      const prompt = [14, 31, 5, 9, 16, 3, 22, 40, 12, 7, 27, 1];
      const pg = paging(prompt.map((p) => p + 2 * n + 1), bs, 321);
      const inv = Float32Array.from({ length: D / 2 }, (_, i) => 1 / 1e4 ** ((2 * i) / D));
      const be = b.gpu;
      const up = (shape: number[], data: Float32Array, dtype: "bf16" | "f32") => be.upload({ shape, dtype: "f32", data }, dtype);
      const stack = be.createLoraStack(2, 16, H, [H, H, H]);
      for (let j = 0; j < 3; j++) be.writeLoraSlot(stack, 0, 16, 2, bf16Values(16 * H, 70 + j, 0.05), bf16Values(H * 16, 80 + j, 0.05), j);
      const e = (cols: number, dtype: "bf16" | "f32", rows = cap) => be.empty([rows, cols], dtype);
      const t: Mini = {
        table: up([V, H], bf16Values(V * H, 11), "bf16"), w1: up([H], bf16Values(H, 12, 1.5), "bf16"),
        w2: up([H], bf16Values(H, 13, 1.5), "bf16"), wqkv: up([3 * H, H], bf16Values(3 * H * H, 14, 0.1), "bf16"),
        wgu: up([2 * H, H], bf16Values(2 * H * H, 15, 0.1), "bf16"), wo: up([H, H], bf16Values(H * H, 16, 0.1), "bf16"),
        bqkv: up([3 * H], f32Values(3 * H, 17, 0.5), "f32"), invFreq: up([D / 2], inv, "f32"),
        kv: be.createKvCache({ numLayers: 1, numBlocks: pg.numBlocks, blockSize: bs, numKvHeads: nH, headDim: D }),
        stack, res: e(H, "f32"), normed: e(H, "bf16"), qkv: e(3 * H, "f32"), qx: e(H, "f32"), kx: e(H, "f32"), vx: e(H, "f32"),
        att: e(H, "bf16"), hid: e(H, "f32"), gu: e(2 * H, "f32"), act: e(H, "bf16"), last: e(H, "bf16", 64), logits: e(V, "f32", 64),
      };
      const slotOf = (i: number) => (i % 3 === 1 ? -1 : 0);
      const forward = (ps: ReturnType<Backend["prepare"]>) => miniForward(be, t, ps, D);
      // The prompts, eagerly (their KV is what the decode steps attend to).
      const pre = be.prepare(makeStep(prompt.map((p, i) => ({ q: p, ctx: p, slot: slotOf(i) })), pg));
      be.sample(forward(pre), pre);
      const m = prompt.length;
      // Seeded draws (the counters must advance), greedy rows, and top logprobs.
      const sampling: SamplingBatch = {
        temperature: Float32Array.from({ length: m }, (_, i) => (i % 4 === 0 ? 0 : 0.9)), topP: new Float32Array(m).fill(0.95),
        topK: new Int32Array(m).fill(50), seeds: Uint32Array.from({ length: m }, (_, i) => 1000 + i),
        counters: Uint32Array.from({ length: m }, (_, i) => 3 + i), numTopLogprobs: 3,
      };
      const first = makeStep(prompt.map((p, i) => ({ q: 1, ctx: p + 1, slot: slotOf(i) })), pg, sampling, 99);
      // The host's steps: one at a time, each built from the last one's tokens by nextDecodeBatch.
      const want: SampleResult[] = [];
      let s = first;
      for (let j = 0; j < n; j++) {
        if (j > 0) s = nextDecodeBatch(s, want[j - 1]!.tokens, bs);
        const ps = be.prepare(s);
        want.push(be.sample(forward(ps), ps));
      }
      // The same n steps from one call, three times: eager (and captured), then replayed twice.
      for (const round of [0, 1, 2]) {
        const got = be.decodeSteps!(n, "ops-mini-steps", forward, be.prepare(first), bs).wait();
        expect(got.length).toBe(n);
        for (let j = 0; j < n; j++) {
          const label = `round ${round} step ${j}`;
          expect(Array.from(got[j]!.tokens), `${label} tokens`).toEqual(Array.from(want[j]!.tokens));
          expectClose(`${label} logprobs`, got[j]!.logprobs, want[j]!.logprobs, 1e-4, 0);
          expect(Array.from(got[j]!.topIds), `${label} top ids`).toEqual(Array.from(want[j]!.topIds));
        }
      }
      be.freeKvCache(t.kv);
      be.freeLoraStack(stack);
    });

    it("timing: BGMV LoRA on decode shapes (32 rows, one adapter each, rank 16), replayed graphs", () => {
      const rows = 32, R = 16, reps = 20, iters = 50;
      for (const [K, N] of [[4096, 4096], [4096, 11008], [11008, 4096]] as const) {
        const stack = b.gpu.createLoraStack(rows, R, K, N);
        for (let s = 0; s < rows; s++) b.gpu.writeLoraSlot(stack, s, R, 2, bf16Values(R * K, s, 0.05), bf16Values(N * R, 100 + s, 0.05));
        const seqs: Seq[] = Array.from({ length: rows }, (_, i) => ({ q: 1, ctx: 4, slot: i }));
        const step = b.gpu.prepare(makeStep(seqs, paging(seqs.map(() => 4), 16, 9)));
        const x = b.gpu.upload({ shape: [rows, K], dtype: "f32", data: bf16Values(rows * K, 1) }, "bf16");
        const out = b.gpu.empty([rows, N], "f32");
        const fwd = () => {
          for (let i = 0; i < reps; i++) b.gpu.lora(out, x, stack, step);
          return out;
        };
        b.gpu.replay!(`bench-bgmv-${K}-${N}`, fwd); // eager run + capture
        b.gpu.replay!(`bench-bgmv-${K}-${N}`, fwd);
        b.gpu.read(out);
        const t0 = performance.now();
        for (let i = 0; i < iters; i++) b.gpu.replay!(`bench-bgmv-${K}-${N}`, fwd);
        b.gpu.read(out);
        const us = ((performance.now() - t0) * 1000) / (iters * reps);
        // Bytes each call must move: every row's A and B (distinct adapters), x (bf16), and out (f32) read + written.
        const bytes = rows * (R * K + N * R) * 2 + rows * K * 2 + 2 * rows * N * 4;
        console.log(`BGMV lora K=${K} N=${N} r=${R} rows=${rows}: ${us.toFixed(2)} us/call, ${(bytes / us / 1e3).toFixed(0)} GB/s`);
        expect(us).toBeGreaterThan(0);
        b.gpu.free(x);
        b.gpu.free(out);
        b.gpu.freeLoraStack(stack);
      }
    });

    it("fillRandom: the CPU backend's values (bf16-rounded on the GPU)", () => {
      for (const [shape, seed, std] of [[[1000, 24], 7, 0.02], [[3, 5], 0xffffffff, 1]] as const) {
        const n = shape[0] * shape[1];
        const g = { cpu: b.cpu.empty([...shape], "f32"), bf: b.gpu.empty([...shape], "bf16"), f: b.gpu.empty([...shape], "f32") };
        b.cpu.fillRandom(g.cpu, seed, std);
        b.gpu.fillRandom(g.bf, seed, std);
        b.gpu.fillRandom(g.f, seed, std);
        const ref = b.cpu.read(g.cpu) as Float32Array;
        expect(ref.length).toBe(n);
        expectClose("fillRandom f32", b.gpu.read(g.f) as Float32Array, ref, 0, 0);
        expectClose("fillRandom bf16", b.gpu.read(g.bf) as Float32Array, asBf16(ref), 0, 0);
        b.cpu.free(g.cpu);
        b.gpu.free(g.bf);
        b.gpu.free(g.f);
      }
    });
  });
}
