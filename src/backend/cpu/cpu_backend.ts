// The plain TypeScript backend: every op in fp32 (sums in float64) over host memory.
// It is the oracle the CUDA backend is tested against, so clarity beats speed here,
// except in the matmul, which dominates and is blocked (matmul.ts).

import type {
  Backend, HostTensor, KvCache, KvCacheSpec, LoraStack, PendingSteps, PreparedStep, QuantizedTensor, SampleResult, StepBatch, Tensor,
} from "../backend.js";
import { nextDecodeBatch } from "../decode_steps.js";
import { dequantize, type QuantBits, type QuantizedWeight } from "../../quant/types.js";
import { loraOutDims, numel, toF32, type DType, type Shape } from "../tensor.js";
import { uniform } from "../rng.js";
import { pagedAttention, writeKv, type PagedLayer } from "./attention.js";
import { matmulNT } from "./matmul.js";
import { logSoftmax, sampleRow, topK } from "./sample.js";
import { CpuTensor, cpu, dims2 } from "./tensor.js";

class CpuKvCache implements KvCache {
  readonly layers: PagedLayer[];
  constructor(readonly spec: KvCacheSpec) {
    const n = spec.numBlocks * spec.blockSize * spec.numKvHeads * spec.headDim;
    this.layers = Array.from({ length: spec.numLayers }, () => ({ k: new Float32Array(n), v: new Float32Array(n) }));
  }
}

interface CpuLoraSlot {
  rank: number;
  scale: number;
  a: Float32Array;
  b: Float32Array;
}

class CpuLoraStack implements LoraStack {
  /** slots[slot * outDims.length + split] */
  readonly slots: CpuLoraSlot[];
  readonly outDim: number;
  constructor(readonly numSlots: number, readonly maxRank: number, readonly inDim: number, readonly outDims: readonly number[]) {
    this.outDim = outDims.reduce((a, b) => a + b, 0);
    this.slots = Array.from({ length: numSlots * outDims.length }, () => ({ rank: 0, scale: 0, a: new Float32Array(0), b: new Float32Array(0) }));
  }
}

/** A quantized weight on the CPU: its dequantized dense weight [outDim, inDim], f32 (exact: s * (q - z)). */
class CpuQuantizedTensor implements QuantizedTensor {
  constructor(readonly inDim: number, readonly outDim: number, readonly bits: QuantBits, readonly dense: Float32Array) {}
}

function kvOf(kv: KvCache): CpuKvCache {
  if (!(kv instanceof CpuKvCache)) throw new Error("KV cache does not belong to the CPU backend");
  return kv;
}

function stackOf(s: LoraStack): CpuLoraStack {
  if (!(s instanceof CpuLoraStack)) throw new Error("LoRA stack does not belong to the CPU backend");
  return s;
}

function rmsnormRow(out: Float32Array, x: Float32Array, w: Float32Array, o: number, H: number, eps: number): void {
  let ss = 0;
  for (let i = 0; i < H; i++) ss += x[o + i]! * x[o + i]!;
  // HF computes the variance in fp32 and multiplies by the weight after casting back;
  // in fp32 math both orders agree to rounding.
  const inv = 1 / Math.sqrt(ss / H + eps);
  for (let i = 0; i < H; i++) out[o + i] = Math.fround(x[o + i]! * inv) * w[i]!;
}

export class CpuBackend implements Backend {
  readonly name = "cpu";
  readonly activationDtype = "f32";

  upload(host: HostTensor, dtype?: DType): Tensor {
    const target = dtype ?? (host.dtype === "i32" ? "i32" : "f32");
    if (target === "i32") {
      if (host.dtype !== "i32") throw new Error(`cannot upload ${host.dtype} data as i32`);
      return new CpuTensor(host.shape, "i32", Int32Array.from(host.data as Int32Array));
    }
    // Floats are held as f32 whatever they were stored as: fp32 math over bf16/f16/f32 weights.
    const f = toF32(host.data, host.dtype);
    return new CpuTensor(host.shape, "f32", f === host.data ? Float32Array.from(f) : f);
  }

  empty(shape: Shape, dtype: DType): Tensor {
    const n = numel(shape);
    return new CpuTensor(shape, dtype === "i32" ? "i32" : "f32", dtype === "i32" ? new Int32Array(n) : new Float32Array(n));
  }

  rows(t: Tensor, n: number): Tensor {
    const c = cpu(t);
    const [rows, cols] = dims2(c);
    if (n > rows) throw new Error(`rows(${n}) of a tensor with ${rows} rows`);
    return new CpuTensor([n, ...c.shape.slice(1)], c.dtype, c.data.subarray(0, n * cols), true);
  }

  fillRandom(t: Tensor, seed: number, std: number): void {
    const d = cpu(t).f32;
    const a = std * Math.sqrt(3);
    for (let i = 0; i < d.length; i++) d[i] = a * (2 * uniform(seed, i) - 1);
  }

  read(t: Tensor): Float32Array | Int32Array {
    const d = cpu(t).data;
    return d instanceof Float32Array ? Float32Array.from(d) : Int32Array.from(d);
  }

  free(_t: Tensor): void {
    // Garbage-collected; nothing to release.
  }

  prepare(batch: StepBatch): PreparedStep {
    return { batch };
  }

  createKvCache(spec: KvCacheSpec): KvCache {
    return new CpuKvCache(spec);
  }

  freeKvCache(_kv: KvCache): void {}

  createLoraStack(numSlots: number, maxRank: number, inDim: number, outDims: number | readonly number[]): LoraStack {
    return new CpuLoraStack(numSlots, maxRank, inDim, loraOutDims(outDims));
  }

  writeLoraSlot(stack: LoraStack, slot: number, rank: number, scale: number, a: Float32Array, b: Float32Array, split = 0): void {
    const s = stackOf(stack);
    if (slot < 0 || slot >= s.numSlots) throw new Error(`LoRA slot ${slot} out of range (pool has ${s.numSlots})`);
    if (split < 0 || split >= s.outDims.length) throw new Error(`LoRA split ${split} out of range (the stack has ${s.outDims.length})`);
    if (rank > s.maxRank) throw new Error(`LoRA rank ${rank} > max rank ${s.maxRank} of the pool`);
    const N = s.outDims[split]!;
    if (a.length !== rank * s.inDim || b.length !== N * rank) {
      throw new Error(`LoRA slot ${slot}: A must be [${rank}, ${s.inDim}] and B [${N}, ${rank}]`);
    }
    s.slots[slot * s.outDims.length + split] = { rank, scale, a: Float32Array.from(a), b: Float32Array.from(b) };
  }

  freeLoraStack(_stack: LoraStack): void {}

  embedding(out: Tensor, table: Tensor, step: PreparedStep): void {
    const o = cpu(out).f32, tb = cpu(table).f32;
    const [V, H] = dims2(table);
    const ids = step.batch.tokenIds;
    for (let i = 0; i < step.batch.numTokens; i++) {
      const id = ids[i]!;
      if (id < 0 || id >= V) throw new Error(`token id ${id} outside the vocabulary (${V})`);
      o.set(tb.subarray(id * H, (id + 1) * H), i * H);
    }
  }

  rmsnorm(out: Tensor, x: Tensor, w: Tensor, eps: number): void {
    const [n, H] = dims2(x);
    const o = cpu(out).f32, xv = cpu(x).f32, wv = cpu(w).f32;
    for (let r = 0; r < n; r++) rmsnormRow(o, xv, wv, r * H, H, eps);
  }

  addRmsnorm(out: Tensor, residual: Tensor, x: Tensor, w: Tensor, eps: number): void {
    const [n, H] = dims2(x);
    const o = cpu(out).f32, res = cpu(residual).f32, xv = cpu(x).f32, wv = cpu(w).f32;
    for (let i = 0; i < n * H; i++) res[i] = res[i]! + xv[i]!;
    for (let r = 0; r < n; r++) rmsnormRow(o, res, wv, r * H, H, eps);
  }

  linear(out: Tensor, x: Tensor, w: Tensor, bias?: Tensor, accumulate = false): void {
    const [n, K] = dims2(x);
    const [N, Kw] = dims2(w);
    if (K !== Kw) throw new Error(`linear: x has ${K} columns but the weight has ${Kw}`);
    const o = cpu(out).f32;
    const before = accumulate ? o.slice(0, n * N) : null;
    matmulNT(o, cpu(x).f32, cpu(w).f32, n, K, N, bias ? cpu(bias).f32 : undefined);
    if (before) for (let i = 0; i < n * N; i++) o[i] = o[i]! + before[i]!;
  }

  uploadQuantized(q: QuantizedWeight): QuantizedTensor {
    return new CpuQuantizedTensor(q.inDim, q.outDim, q.spec.bits, dequantize(q));
  }

  /** The reference of the low-bit kernels: the dense matmul of the dequantized weight. */
  linearQuantized(out: Tensor, x: Tensor, w: QuantizedTensor, bias?: Tensor): void {
    if (!(w instanceof CpuQuantizedTensor)) throw new Error("quantized weight does not belong to the CPU backend");
    const [n, K] = dims2(x);
    if (K !== w.inDim) throw new Error(`linearQuantized: x has ${K} columns but the weight has ${w.inDim} inputs`);
    matmulNT(cpu(out).f32, cpu(x).f32, w.dense, n, K, w.outDim, bias ? cpu(bias).f32 : undefined);
  }

  freeQuantized(_w: QuantizedTensor): void {
    // Garbage-collected.
  }

  lora(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): void {
    const s = stackOf(stack);
    const [n, K] = dims2(x);
    const o = cpu(out).f32, xv = cpu(x).f32;
    const N = s.outDim, S = s.outDims.length;
    const tmp = new Float64Array(s.maxRank);
    const slots = step.batch.loraSlots;
    for (let i = 0; i < n; i++) {
      const slot = slots[i]!;
      if (slot < 0) continue;
      let col0 = 0;
      for (let sp = 0; sp < S; sp++) {
        const { rank, scale, a, b } = s.slots[slot * S + sp]!;
        const Nj = s.outDims[sp]!;
        for (let r = 0; r < rank; r++) {
          let acc = 0;
          for (let k = 0; k < K; k++) acc += a[r * K + k]! * xv[i * K + k]!;
          tmp[r] = Math.fround(acc);
        }
        for (let j = 0; j < Nj && rank > 0; j++) {
          let acc = 0;
          for (let r = 0; r < rank; r++) acc += b[j * rank + r]! * tmp[r]!;
          const at = i * N + col0 + j;
          o[at] = o[at]! + scale * acc;
        }
        col0 += Nj;
      }
    }
  }

  rope(q: Tensor, k: Tensor, v: Tensor, qkv: Tensor, invFreq: Tensor, headDim: number, step: PreparedStep): void {
    const inv = cpu(invFreq).f32;
    const half = headDim / 2;
    const pos = step.batch.positions;
    const cos = new Float64Array(half), sin = new Float64Array(half);
    const [n, qw] = dims2(q);
    const kw = dims2(k)[1], vw = dims2(v)[1];
    const [nf, fw] = dims2(qkv);
    if (fw !== qw + kw + vw || nf < n) throw new Error(`rope: qkv must be [${n}, ${qw + kw + vw}] (got [${nf}, ${fw}])`);
    const src = cpu(qkv).f32, qv = cpu(q).f32, kv = cpu(k).f32, vv = cpu(v).f32;
    // Copies one row's block of qkv into dst, rotating each head when `rotate`.
    const take = (dst: Float32Array, width: number, col0: number, row: number, rotate: boolean): void => {
      const s0 = row * fw + col0, d0 = row * width;
      if (!rotate) {
        dst.set(src.subarray(s0, s0 + width), d0);
        return;
      }
      for (let h = 0; h < width; h += headDim) {
        for (let i = 0; i < half; i++) {
          const x1 = src[s0 + h + i]!, x2 = src[s0 + h + i + half]!;
          dst[d0 + h + i] = x1 * cos[i]! - x2 * sin[i]!;
          dst[d0 + h + i + half] = x2 * cos[i]! + x1 * sin[i]!;
        }
      }
    };
    for (let r = 0; r < n; r++) {
      for (let i = 0; i < half; i++) {
        // HF computes the angle in fp32 before cos/sin.
        const angle = Math.fround(pos[r]! * inv[i]!);
        cos[i] = Math.fround(Math.cos(angle));
        sin[i] = Math.fround(Math.sin(angle));
      }
      take(qv, qw, 0, r, true);
      take(kv, kw, qw, r, true);
      take(vv, vw, qw + kw, r, false);
    }
  }

  attention(out: Tensor, q: Tensor, k: Tensor, v: Tensor, kvCache: KvCache, layer: number, scale: number, step: PreparedStep): void {
    const cache = kvOf(kvCache);
    const { numKvHeads, headDim, blockSize } = cache.spec;
    const numHeads = dims2(q)[1] / headDim;
    const paged = cache.layers[layer]!;
    writeKv(paged, cpu(k).f32, cpu(v).f32, numKvHeads * headDim, step.batch);
    pagedAttention(cpu(out).f32, cpu(q).f32, paged, numHeads, numKvHeads, headDim, blockSize, scale, step.batch);
  }

  siluMul(out: Tensor, gateUp: Tensor): void {
    const o = cpu(out).f32, gu = cpu(gateUp).f32;
    const [n, I] = dims2(out);
    if (dims2(gateUp)[1] !== 2 * I) throw new Error(`siluMul: gateUp must have ${2 * I} columns (got ${dims2(gateUp)[1]})`);
    for (let r = 0; r < n; r++) {
      for (let i = 0; i < I; i++) {
        const x = gu[r * 2 * I + i]!;
        o[r * I + i] = Math.fround(x / (1 + Math.exp(-x))) * gu[r * 2 * I + I + i]!;
      }
    }
  }

  /** The reference of the GPU's gram: every dot product in float64 over this call's rows,
   * added to out's f32 value (one rounding per call, as the GPU's f32 accumulator has). */
  gram(out: Tensor, x: Tensor, accumulate: boolean, alpha = 1): void {
    const [n, K] = dims2(x);
    const o = cpu(out).f32;
    if (o.length !== K * K) throw new Error(`gram: out must be [${K}, ${K}] for x of ${K} columns, got [${cpu(out).shape.join(", ")}]`);
    const xv = cpu(x).f32;
    // Transposed once so each dot product reads two contiguous rows.
    const xt = new Float64Array(K * n);
    for (let t = 0; t < n; t++) for (let k = 0; k < K; k++) xt[k * n + t] = xv[t * K + k]!;
    for (let i = 0; i < K; i++) {
      for (let j = i; j < K; j++) {
        let acc = 0;
        for (let t = 0, a = i * n, b = j * n; t < n; t++) acc += xt[a + t]! * xt[b + t]!;
        const v = Math.fround(accumulate ? o[i * K + j]! + alpha * acc : alpha * acc);
        o[i * K + j] = v;
        o[j * K + i] = v;
      }
    }
  }

  gatherRows(out: Tensor, x: Tensor, step: PreparedStep): void {
    const [, H] = dims2(x);
    const o = cpu(out).f32, xv = cpu(x).f32;
    const rows = step.batch.sampleRows;
    for (let r = 0; r < rows.length; r++) o.set(xv.subarray(rows[r]! * H, (rows[r]! + 1) * H), r * H);
  }

  /** The n steps one after another (the reference for the CUDA backend's graph of n steps). */
  decodeSteps(n: number, _key: string, forward: (step: PreparedStep) => Tensor, step: PreparedStep, blockSize: number): PendingSteps {
    if (!Number.isInteger(n) || n < 1) throw new Error(`decodeSteps: n must be a positive integer (got ${n})`);
    const results: SampleResult[] = [];
    let cur = step;
    for (let j = 0; j < n; j++) {
      if (j > 0) cur = this.prepare(nextDecodeBatch(cur.batch, results[j - 1]!.tokens, blockSize));
      results.push(this.sample(forward(cur), cur));
    }
    return { wait: () => results };
  }

  sample(logits: Tensor, step: PreparedStep): SampleResult {
    const [m, V] = dims2(logits);
    const lv = cpu(logits).f32;
    const sp = step.batch.sampling;
    const nTop = sp.numTopLogprobs;
    const tokens = new Int32Array(m);
    const logprobs = new Float32Array(m);
    const topIds = new Int32Array(m * nTop);
    const topLogprobs = new Float32Array(m * nTop);
    for (let r = 0; r < m; r++) {
      const row = lv.subarray(r * V, (r + 1) * V);
      const tok = sampleRow(row, sp.temperature[r]!, sp.topP[r]!, sp.topK[r]!, sp.seeds[r]!, sp.counters[r]!);
      const lsm = logSoftmax(row);
      tokens[r] = tok;
      logprobs[r] = lsm[tok]!;
      if (nTop > 0) {
        const best = topK(lsm, nTop);
        for (let i = 0; i < nTop; i++) {
          topIds[r * nTop + i] = best[i]!;
          topLogprobs[r * nTop + i] = lsm[best[i]!]!;
        }
      }
    }
    return { tokens, logprobs, topIds, topLogprobs };
  }
}
