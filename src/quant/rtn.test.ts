import { describe, expect, it } from "vitest";
import { mulberry32 } from "../backend/rng.js";
import { f16ToF32, f32ToF16 } from "../backend/tensor.js";
import { packGptq, unpackGptq } from "./gptq_pack.js";
import { dequantizeValue, f16Ceil, groupIndex, groupParams, roundHalfEven, toF16 } from "./quantizer.js";
import { quantizeRtn } from "./rtn.js";
import { dequantize, QUANT_BITS, type QuantSpec } from "./types.js";

const isF16 = (x: number) => f16ToF32(f32ToF16(Float32Array.of(x)))[0] === x;

/** Weights with the awkward cases mixed in: an all-zero row, an all-positive row, a row near 0 from below. */
function testWeights(N: number, K: number, seed: number): Float32Array {
  const rnd = mulberry32(seed);
  const w = Float32Array.from({ length: N * K }, () => (rnd() - 0.5) * 0.2 * (1 + 4 * rnd() * rnd()));
  for (let k = 0; k < K; k++) {
    w[0 * K + k] = 0;
    w[1 * K + k] = 0.01 + rnd() * 0.05;
    w[2 * K + k] = -0.001 * rnd() + 0.05 * rnd();
  }
  return w;
}

describe("quantizer helpers", () => {
  it("roundHalfEven rounds ties to even, like torch.round", () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001].map(roundHalfEven)).toEqual([0, 2, 2, -0, -2, -2, 2, 3]);
  });

  it("f16Ceil is the smallest fp16 >= x", () => {
    const rnd = mulberry32(1);
    for (let i = 0; i < 2000; i++) {
      const x = Math.exp((rnd() - 0.5) * 20);
      const c = f16Ceil(x);
      expect(isF16(c)).toBe(true);
      expect(c).toBeGreaterThanOrEqual(x);
      const below = f16ToF32(Uint16Array.of(f32ToF16(Float32Array.of(c))[0]! - 1))[0]!;
      expect(below).toBeLessThan(x);
    }
    expect(f16Ceil(1)).toBe(1);
    expect(() => f16Ceil(70000)).toThrow(/not a positive fp16 value/);
    expect(() => f16Ceil(0)).toThrow(/not a positive fp16 value/);
  });

  it("groupParams: asymmetric zeros in [1, maxq], symmetric zero 2^(bits-1), fp16 scales", () => {
    for (const bits of QUANT_BITS) {
      const maxq = (1 << bits) - 1;
      for (const [lo, hi] of [[-1, 1], [0, 1], [0.2, 3], [-3, -0.5], [-0.01, 1], [0, 0], [-1e-3, 1e-3]] as const) {
        const a = groupParams(lo, hi, bits, false);
        expect(a.zero).toBeGreaterThanOrEqual(1);
        expect(a.zero).toBeLessThanOrEqual(maxq);
        expect(isF16(a.scale)).toBe(true);
        const s = groupParams(lo, hi, bits, true);
        expect(s.zero).toBe(1 << (bits - 1));
        expect(isF16(s.scale)).toBe(true);
        // The grid spans the range (within half a step at either end) and holds 0 exactly.
        for (const p of [a, s]) {
          expect(dequantizeValue(0, p.scale, p.zero)).toBeLessThanOrEqual(Math.min(lo, 0) + p.scale / 2);
          expect(dequantizeValue(maxq, p.scale, p.zero)).toBeGreaterThanOrEqual(Math.max(hi, 0) - p.scale / 2);
          expect(dequantizeValue(p.zero, p.scale, p.zero)).toBe(0);
        }
      }
    }
    expect(() => groupParams(NaN, 1, 4, false)).toThrow(/must be finite/);
  });

  it("groupIndex: consecutive groups, one group for -1, solving order for act-order", () => {
    expect([...groupIndex(5, 2)]).toEqual([0, 0, 1, 1, 2]);
    expect([...groupIndex(5, -1)]).toEqual([0, 0, 0, 0, 0]);
    // perm[i] is the i-th input placed: inputs 4 and 0 form group 0, 2 and 1 group 1, 3 group 2.
    expect([...groupIndex(5, 2, [4, 0, 2, 1, 3])]).toEqual([0, 1, 1, 2, 0]);
    expect(() => groupIndex(3, 2, [0, 0, 1])).toThrow(/not a permutation/);
    expect(() => groupIndex(3, 0)).toThrow(/positive integer or -1/);
  });
});

describe("RTN", () => {
  const N = 32, K = 96;
  for (const bits of QUANT_BITS) {
    for (const groupSize of [-1, 32]) {
      for (const sym of [false, true]) {
        it(`${bits}-bit group ${groupSize} sym=${sym}: every weight within scale/2 of its dequantized value`, () => {
          const spec: QuantSpec = { bits, groupSize, sym, descAct: false };
          const w = testWeights(N, K, bits + groupSize);
          const q = quantizeRtn(w, N, K, spec);
          const deq = dequantize(q);
          let worst = 0;
          for (let n = 0; n < N; n++) {
            for (let k = 0; k < K; k++) {
              const s = q.scales[q.gIdx[k]! * N + n]!;
              const err = Math.abs(w[n * K + k]! - deq[n * K + k]!);
              // f32 rounding of the dequantized value adds at most half an f32 ulp.
              expect(err).toBeLessThanOrEqual(s / 2 + Math.abs(deq[n * K + k]!) * 2 ** -24);
              worst = Math.max(worst, err / s);
            }
          }
          // Round to nearest really uses the grid: the worst error is a real fraction of a step.
          expect(worst).toBeGreaterThan(0.3);
          for (const s of q.scales) expect(isF16(s)).toBe(true);
          // The all-zero row stays exactly zero.
          for (let k = 0; k < K; k++) expect(deq[k]).toBe(0);
          // What the checkpoint stores is what RTN computed, bit for bit.
          const back = unpackGptq(packGptq(q, "gptq"), spec, "gptq");
          expect(dequantize(back)).toEqual(deq);
        });
      }
    }
  }

  it("error shrinks with more bits", () => {
    const w = testWeights(N, K, 9);
    const rms = QUANT_BITS.map((bits) => {
      const d = dequantize(quantizeRtn(w, N, K, { bits, groupSize: 32, sym: false, descAct: false }));
      let e = 0;
      for (let i = 0; i < w.length; i++) e += (w[i]! - d[i]!) ** 2;
      return Math.sqrt(e / w.length);
    });
    for (let i = 1; i < rms.length; i++) expect(rms[i]!).toBeLessThan(rms[i - 1]! / 1.8);
  });

  it("act-order: groups follow the given input order, and the error bound still holds", () => {
    const w = testWeights(N, K, 11);
    const perm = Array.from({ length: K }, (_, k) => (k * 37) % K);
    const spec: QuantSpec = { bits: 4, groupSize: 32, sym: false, descAct: true };
    const q = quantizeRtn(w, N, K, spec, { perm });
    expect(q.gIdx).toEqual(groupIndex(K, 32, perm));
    const deq = dequantize(q);
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) expect(Math.abs(w[n * K + k]! - deq[n * K + k]!)).toBeLessThanOrEqual(q.scales[q.gIdx[k]! * N + n]! / 2 + 1e-9);
    }
    expect(() => quantizeRtn(w, N, K, spec)).toThrow(/RTN has no activation statistics/);
  });

  it("scales are rounded up to fp16 before codes are chosen", () => {
    // One group [-0.5, 1] at 4 bits: the exact scale 1.5/15 = 0.1 is not an fp16; codes use the fp16 one.
    const q = quantizeRtn(Float32Array.of(-0.5, 0, 0.3, 1), 1, 4, { bits: 4, groupSize: -1, sym: false, descAct: false });
    const s = f16Ceil(0.1);
    expect(s).toBeGreaterThan(0.1);
    expect(toF16(s)).toBe(s);
    expect(q.scales[0]).toBe(s);
    expect(q.zeros[0]).toBe(5);
    expect([...q.codes]).toEqual([0.5, 0, 0.3, 1].map((x, i) => Math.min(15, roundHalfEven((i === 0 ? -x : x) / s) + 5)));
  });

  it("a group whose minimum rounds to zero point 0 gets zero 1 and a scale of max / (maxq - 1)", () => {
    const q = quantizeRtn(Float32Array.of(0, 1 / 3, 2 / 3, 1), 1, 4, { bits: 4, groupSize: -1, sym: false, descAct: false });
    expect(q.zeros[0]).toBe(1);
    expect(q.scales[0]).toBe(f16Ceil(1 / 14));
    expect(q.codes[0]).toBe(1);
    expect(q.codes[3]).toBe(15);
  });
});
