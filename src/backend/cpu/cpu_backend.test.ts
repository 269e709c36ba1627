// The CPU backend's ops against naive, independent formulations.

import { describe, expect, it } from "vitest";
import type { StepBatch } from "../backend.js";
import { uniform } from "../rng.js";
import { CpuBackend } from "./cpu_backend.js";
import { CpuTensor } from "./tensor.js";

function rand(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = uniform(seed, i) * 2 - 1;
  return a;
}

function t(shape: number[], data: Float32Array): CpuTensor {
  return new CpuTensor(shape, "f32", data);
}

function batch(partial: Partial<StepBatch> & { numTokens: number }): StepBatch {
  const n = partial.numTokens;
  return {
    numSeqs: 1,
    tokenIds: new Int32Array(n),
    positions: Int32Array.from({ length: n }, (_, i) => i),
    slotMapping: Int32Array.from({ length: n }, (_, i) => i),
    loraSlots: new Int32Array(n).fill(-1),
    queryStart: Int32Array.from([0, n]),
    contextLens: Int32Array.from([n]),
    blockTables: Int32Array.from([0]),
    maxBlocksPerSeq: 1,
    sampleRows: Int32Array.from([n - 1]),
    sampling: {
      temperature: new Float32Array(1), topP: new Float32Array([1]), topK: new Int32Array(1),
      seeds: new Uint32Array(1), counters: new Uint32Array(1), numTopLogprobs: 0,
    },
    ...partial,
  };
}

const be = new CpuBackend();

describe("CpuBackend", () => {
  it("linear matches a naive triple loop, with bias, for ragged shapes", () => {
    for (const [n, K, N] of [[1, 3, 1], [5, 7, 3], [9, 16, 11]] as const) {
      const x = rand(n * K, 1), w = rand(N * K, 2), bias = rand(N, 3);
      const out = new Float32Array(n * N);
      be.linear(t([n, N], out), t([n, K], x), t([N, K], w), t([N], bias));
      for (let i = 0; i < n; i++)
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += x[i * K + k]! * w[j * K + k]!;
          expect(out[i * N + j]).toBeCloseTo(s + bias[j]!, 5);
        }
    }
  });

  it("linear with accumulate adds x w^T + bias onto out's old values", () => {
    const n = 3, K = 5, N = 4;
    const x = rand(n * K, 6), w = rand(N * K, 7), bias = rand(N, 8), old = rand(n * N, 9);
    const plain = new Float32Array(n * N), acc = old.slice();
    be.linear(t([n, N], plain), t([n, K], x), t([N, K], w), t([N], bias));
    be.linear(t([n, N], acc), t([n, K], x), t([N, K], w), t([N], bias), true);
    for (let i = 0; i < n * N; i++) expect(acc[i]).toBeCloseTo(plain[i]! + old[i]!, 6);
  });

  it("a row's linear output does not depend on the other rows in the call", () => {
    const K = 33, N = 7;
    const x = rand(6 * K, 4), w = rand(N * K, 5);
    const all = new Float32Array(6 * N);
    be.linear(t([6, N], all), t([6, K], x), t([N, K], w));
    for (let i = 0; i < 6; i++) {
      const one = new Float32Array(N);
      be.linear(t([1, N], one), t([1, K], x.slice(i * K, (i + 1) * K)), t([N, K], w));
      expect(Array.from(one)).toEqual(Array.from(all.subarray(i * N, (i + 1) * N)));
    }
  });

  it("lora adds scale * B A x per row's slot, mixed ranks, rows without adapters untouched", () => {
    const K = 6, N = 5, n = 4;
    const stack = be.createLoraStack(3, 4, K, N);
    const a1 = rand(2 * K, 6), b1 = rand(N * 2, 7), a2 = rand(4 * K, 8), b2 = rand(N * 4, 9);
    be.writeLoraSlot(stack, 1, 2, 0.5, a1, b1);
    be.writeLoraSlot(stack, 2, 4, 2, a2, b2);
    const x = rand(n * K, 10);
    const base = rand(n * N, 11);
    const out = Float32Array.from(base);
    const slots = Int32Array.from([2, -1, 1, 2]);
    be.lora(t([n, N], out), t([n, K], x), stack, be.prepare(batch({ numTokens: n, loraSlots: slots })));
    const ref = (row: number, rank: number, scale: number, a: Float32Array, b: Float32Array) => {
      const mid = Array.from({ length: rank }, (_, r) => {
        let s = 0;
        for (let k = 0; k < K; k++) s += a[r * K + k]! * x[row * K + k]!;
        return s;
      });
      return Array.from({ length: N }, (_, j) => {
        let s = 0;
        for (let r = 0; r < rank; r++) s += b[j * rank + r]! * mid[r]!;
        return base[row * N + j]! + scale * s;
      });
    };
    const expected = [ref(0, 4, 2, a2, b2), Array.from(base.subarray(N, 2 * N)), ref(2, 2, 0.5, a1, b1), ref(3, 4, 2, a2, b2)];
    for (let i = 0; i < n; i++) for (let j = 0; j < N; j++) expect(out[i * N + j]).toBeCloseTo(expected[i]![j]!, 5);
  });

  it("lora with output splits (a fused q/k/v) equals one stack per member on its column block", () => {
    const K = 6, dims = [4, 2, 3], n = 3, N = 9;
    const fused = be.createLoraStack(2, 4, K, dims);
    const parts = dims.map((d) => be.createLoraStack(2, 4, K, d));
    // Slot 1: split 0 rank 3, split 1 absent (rank 0), split 2 rank 4 with its own scale.
    const spec = [[3, 0.5], [0, 0], [4, 2]] as const;
    spec.forEach(([r, sc], j) => {
      const a = rand(r * K, 20 + j), b = rand(dims[j]! * r, 30 + j);
      be.writeLoraSlot(fused, 1, r, sc, a, b, j);
      be.writeLoraSlot(parts[j]!, 1, r, sc, a, b);
    });
    const x = rand(n * K, 40), base = rand(n * N, 41);
    const step = be.prepare(batch({ numTokens: n, loraSlots: Int32Array.from([1, -1, 1]) }));
    const out = Float32Array.from(base);
    be.lora(t([n, N], out), t([n, K], x), fused, step);
    let col = 0;
    dims.forEach((d, j) => {
      const block = new Float32Array(n * d);
      for (let i = 0; i < n; i++) block.set(base.subarray(i * N + col, i * N + col + d), i * d);
      be.lora(t([n, d], block), t([n, K], x), parts[j]!, step);
      for (let i = 0; i < n; i++) for (let c = 0; c < d; c++) expect(out[i * N + col + c]).toBe(block[i * d + c]);
      col += d;
    });
    expect(Array.from(out.subarray(N, 2 * N))).toEqual(Array.from(base.subarray(N, 2 * N)));
    expect(() => be.writeLoraSlot(fused, 0, 1, 1, rand(K, 1), rand(4, 2), 3)).toThrow(/split 3 out of range/);
  });

  it("paged attention equals dense causal GQA attention, whatever the block layout", () => {
    const nH = 4, nKv = 2, D = 8, L = 11, bs = 4;
    const q = rand(L * nH * D, 12), k = rand(L * nKv * D, 13), v = rand(L * nKv * D, 14);
    // Scatter the sequence over non-contiguous blocks 5, 1, 3.
    const table = [5, 1, 3];
    const slotMapping = Int32Array.from({ length: L }, (_, p) => table[Math.floor(p / bs)]! * bs + (p % bs));
    const kv = be.createKvCache({ numLayers: 1, numBlocks: 6, blockSize: bs, numKvHeads: nKv, headDim: D });
    const out = new Float32Array(L * nH * D);
    const step = be.prepare(batch({ numTokens: L, slotMapping, blockTables: Int32Array.from(table), maxBlocksPerSeq: 3 }));
    be.attention(t([L, nH * D], out), t([L, nH * D], Float32Array.from(q)), t([L, nKv * D], k), t([L, nKv * D], v), kv, 0, 0.3, step);
    for (let p = 0; p < L; p++)
      for (let h = 0; h < nH; h++) {
        const g = Math.floor(h / (nH / nKv));
        const s = Array.from({ length: p + 1 }, (_, j) => {
          let d = 0;
          for (let e = 0; e < D; e++) d += q[(p * nH + h) * D + e]! * k[(j * nKv + g) * D + e]!;
          return d * 0.3;
        });
        const m = Math.max(...s);
        const w = s.map((x) => Math.exp(x - m));
        const z = w.reduce((a, b) => a + b, 0);
        for (let e = 0; e < D; e++) {
          let acc = 0;
          for (let j = 0; j <= p; j++) acc += (w[j]! / z) * v[(j * nKv + g) * D + e]!;
          expect(out[(p * nH + h) * D + e]).toBeCloseTo(acc, 5);
        }
      }
  });

  it("rope splits the fused qkv and rotates pairs (i, i + D/2) of q and k by position * invFreq, keeping norms", () => {
    const D = 8, n = 3;
    const inv = Float32Array.from({ length: D / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / D));
    const q0 = rand(n * D, 15), k0 = rand(n * D, 16), v0 = rand(n * D, 18);
    // q, k and v side by side in one [n, 3D] row each, as the fused projection writes them.
    const qkv = new Float32Array(n * 3 * D);
    for (let r = 0; r < n; r++) {
      qkv.set(q0.subarray(r * D, (r + 1) * D), r * 3 * D);
      qkv.set(k0.subarray(r * D, (r + 1) * D), r * 3 * D + D);
      qkv.set(v0.subarray(r * D, (r + 1) * D), r * 3 * D + 2 * D);
    }
    const q = new Float32Array(n * D), k = new Float32Array(n * D), v = new Float32Array(n * D);
    be.rope(t([n, D], q), t([n, D], k), t([n, D], v), t([n, 3 * D], qkv), t([D / 2], inv), D,
      be.prepare(batch({ numTokens: n, positions: Int32Array.from([0, 5, 17]) })));
    expect(Array.from(v)).toEqual(Array.from(v0));
    expect(Array.from(q.subarray(0, D))).toEqual(Array.from(q0.subarray(0, D)));
    const p = 17, i = 1, a = p * inv[i]!;
    expect(q[2 * D + i]).toBeCloseTo(q0[2 * D + i]! * Math.cos(a) - q0[2 * D + i + D / 2]! * Math.sin(a), 4);
    const norm = (x: Float32Array, o: number) => Math.hypot(x[o + i]!, x[o + i + D / 2]!);
    expect(norm(k, D)).toBeCloseTo(norm(k0, D), 5);
  });

  it("sampling: greedy is argmax; seeded draws repeat and respect top-k / top-p", () => {
    const V = 50;
    const logits = rand(V, 17).map((x) => x * 3);
    const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!);
    const mk = (temperature: number, topP: number, topK: number, seed: number, counter: number, nTop = 0) =>
      be.prepare(batch({
        numTokens: 1,
        sampling: {
          temperature: Float32Array.from([temperature]), topP: Float32Array.from([topP]), topK: Int32Array.from([topK]),
          seeds: Uint32Array.from([seed]), counters: Uint32Array.from([counter]), numTopLogprobs: nTop,
        },
      }));
    const L = t([1, V], logits);
    const g = be.sample(L, mk(0, 1, 0, 0, 0, 3));
    expect(g.tokens[0]).toBe(order[0]);
    expect(Array.from(g.topIds)).toEqual(order.slice(0, 3));
    const lse = Math.log(logits.reduce((s, x) => s + Math.exp(x), 0));
    expect(g.logprobs[0]).toBeCloseTo(logits[order[0]!]! - lse, 5);
    const seen = new Set<number>();
    for (let c = 0; c < 200; c++) {
      const a = be.sample(L, mk(1.5, 1, 3, 42, c)).tokens[0]!;
      expect(be.sample(L, mk(1.5, 1, 3, 42, c)).tokens[0]).toBe(a);
      seen.add(a);
    }
    expect(seen).toEqual(new Set(order.slice(0, 3)));
    // top_p tiny keeps only the best token.
    for (let c = 0; c < 20; c++) expect(be.sample(L, mk(1, 1e-6, 0, 7, c)).tokens[0]).toBe(order[0]);
  });

  it("sampled tokens follow softmax(logits / T) restricted to the keep set", async () => {
    const { sampleRow } = await import("./sample.js");
    const logits = Float32Array.from([2, 1, 0.5, 0, -1]);
    const draw = (T: number, p: number, k: number) => {
      const counts = new Array(5).fill(0);
      for (let c = 0; c < 8000; c++) counts[sampleRow(logits, T, p, k, 99, c)]++;
      return counts.map((x) => x / 8000);
    };
    const softmax = (xs: number[]) => {
      const e = xs.map(Math.exp);
      const z = e.reduce((a, b) => a + b, 0);
      return e.map((x) => x / z);
    };
    const full = softmax(Array.from(logits, (x) => x / 0.7));
    draw(0.7, 1, 0).forEach((f, i) => expect(Math.abs(f - full[i]!)).toBeLessThan(0.02));
    // top-k 2: only the two best, renormalized.
    const two = softmax([2, 1]);
    const f2 = draw(1, 1, 2);
    expect(f2[0]! + f2[1]!).toBe(1);
    expect(Math.abs(f2[0]! - two[0]!)).toBeLessThan(0.02);
    // top-p 0.8 of softmax([2,1,.5,0,-1]) = [.55,.20,.12,.08,.03]: keeps the three best (cum .87).
    const f3 = draw(1, 0.8, 0);
    expect(f3[3]).toBe(0);
    expect(f3[4]).toBe(0);
    expect(f3[2]!).toBeGreaterThan(0.05);
  });
});
