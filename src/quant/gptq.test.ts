import { describe, expect, it } from "vitest";
import { mulberry32 } from "../backend/rng.js";
import { outputError } from "./error.js";
import { actOrder, dampSchedule, gptqQuantize } from "./gptq.js";
import { choleskyInverseUpper, choleskyLower, symmetricEigen } from "./linalg.js";
import { quantizeRtn } from "./rtn.js";
import { dequantize, numGroups, type QuantSpec } from "./types.js";

function gaussian(rand: () => number): number {
  return Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
}

/** Activations with correlated channels of uneven scale (like a real layer's inputs). */
function activations(n: number, K: number, seed: number): Float32Array {
  const rand = mulberry32(seed);
  const latent = 8;
  const mix = Array.from({ length: latent * K }, () => gaussian(rand));
  const chanScale = Array.from({ length: K }, () => 0.2 + 3 * rand() ** 3);
  const x = new Float32Array(n * K);
  for (let t = 0; t < n; t++) {
    const z = Array.from({ length: latent }, () => gaussian(rand));
    for (let k = 0; k < K; k++) {
      let v = 0.3 * gaussian(rand);
      for (let l = 0; l < latent; l++) v += z[l]! * mix[l * K + k]! * 0.4;
      x[t * K + k] = v * chanScale[k]!;
    }
  }
  return x;
}

function hessianOf(x: Float32Array, n: number, K: number): Float64Array {
  const h = new Float64Array(K * K);
  for (let t = 0; t < n; t++) for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) h[i * K + j] += x[t * K + i]! * x[t * K + j]!;
  for (let i = 0; i < h.length; i++) h[i] = (2 / n) * h[i]!;
  return h;
}

function weights(N: number, K: number, seed: number): Float32Array {
  const rand = mulberry32(seed);
  return Float32Array.from({ length: N * K }, () => 0.05 * gaussian(rand));
}

function identity(K: number): Float64Array {
  const h = new Float64Array(K * K);
  for (let k = 0; k < K; k++) h[k * K + k] = 1;
  return h;
}

const N = 24, K = 96, n = 384;
const X = activations(n, K, 1);
const H = hessianOf(X, n, K);
const W = weights(N, K, 2);

describe("linalg", () => {
  it("choleskyInverseUpper gives U with U^T U = H^-1", () => {
    const hd = Float64Array.from(H);
    for (let k = 0; k < K; k++) hd[k * K + k] += 0.01;
    const u = choleskyInverseUpper(hd, K)!;
    expect(u).not.toBeNull();
    for (let i = 0; i < K; i++) for (let j = 0; j < i; j++) expect(u[i * K + j]).toBe(0);
    // (U^T U) H = I
    let worst = 0;
    for (let i = 0; i < K; i++) {
      for (let j = 0; j < K; j++) {
        let s = 0;
        for (let m = 0; m < K; m++) {
          let hinv = 0;
          for (let r = 0; r <= Math.min(i, m); r++) hinv += u[r * K + i]! * u[r * K + m]!;
          s += hinv * hd[m * K + j]!;
        }
        worst = Math.max(worst, Math.abs(s - (i === j ? 1 : 0)));
      }
    }
    expect(worst).toBeLessThan(1e-8);
  });

  it("symmetricEigen: V diag(values) V^T rebuilds the matrix, with orthonormal V", () => {
    const n = 40;
    const a = new Float64Array(n * n);
    const rand = mulberry32(9);
    for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) a[i * n + j] = a[j * n + i] = rand() - 0.5;
    const { values, vectors } = symmetricEigen(a, n);
    let recon = 0, orth = 0;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0, o = 0;
        for (let k = 0; k < n; k++) {
          s += vectors[k * n + i]! * values[k]! * vectors[k * n + j]!;
          o += vectors[i * n + k]! * vectors[j * n + k]!;
        }
        recon = Math.max(recon, Math.abs(s - a[i * n + j]!));
        orth = Math.max(orth, Math.abs(o - (i === j ? 1 : 0)));
      }
    }
    expect(recon).toBeLessThan(1e-12);
    expect(orth).toBeLessThan(1e-12);
    expect(values.some((v) => v < 0) && values.some((v) => v > 0)).toBe(true);
  });

  it("choleskyLower refuses an indefinite matrix", () => {
    expect(choleskyLower(Float64Array.from([1, 2, 2, 1]), 2)).toBe(false);
    expect(choleskyLower(Float64Array.from([4, 2, 2, 3]), 2)).toBe(true);
  });
});

describe("gptqQuantize", () => {
  const specs: QuantSpec[] = [
    { bits: 4, groupSize: -1, sym: false, descAct: false },
    { bits: 3, groupSize: 32, sym: false, descAct: false },
    { bits: 4, groupSize: 32, sym: true, descAct: true },
    { bits: 2, groupSize: 16, sym: false, descAct: true },
  ];

  for (const spec of specs) {
    const tag = `${spec.bits}-bit, group ${spec.groupSize}, ${spec.sym ? "sym" : "asym"}${spec.descAct ? ", act-order" : ""}`;

    it(`beats RTN on the output error ||(W - Ŵ) X|| (${tag})`, () => {
      const perm = spec.descAct ? actOrder(H, K) : undefined;
      const rtn = quantizeRtn(W, N, K, spec, perm ? { perm } : {});
      const g = gptqQuantize(W, N, K, H, spec);
      const eRtn = outputError(W, rtn, H), eGptq = outputError(W, g.weight, H);
      expect(eGptq).toBeLessThan(0.8 * eRtn);
    });

    it(`equals RTN bit for bit when H is the identity (${tag})`, () => {
      const g = gptqQuantize(W, N, K, identity(K), spec);
      const rtn = quantizeRtn(W, N, K, spec, spec.descAct ? { perm: g.perm } : {});
      expect(Array.from(g.perm)).toEqual(Array.from({ length: K }, (_, k) => k));
      expect(g.weight.codes).toEqual(rtn.codes);
      expect(g.weight.scales).toEqual(rtn.scales);
      expect(g.weight.zeros).toEqual(rtn.zeros);
      expect(g.weight.gIdx).toEqual(rtn.gIdx);
    });
  }

  it("act-order: perm sorts the diagonal, and g_idx maps each input to the group of its solving position", () => {
    const spec: QuantSpec = { bits: 4, groupSize: 20, sym: false, descAct: true };
    const g = gptqQuantize(W, N, K, H, spec);
    const { perm } = g;
    expect(new Set(perm).size).toBe(K);
    for (let i = 1; i < K; i++) expect(H[perm[i - 1]! * K + perm[i - 1]!]).toBeGreaterThanOrEqual(H[perm[i]! * K + perm[i]!]!);
    expect(Array.from(perm)).not.toEqual(Array.from({ length: K }, (_, k) => k));
    const G = numGroups(K, 20);
    const sizes = new Array<number>(G).fill(0);
    for (let k = 0; k < K; k++) {
      const gi = g.weight.gIdx[k]!;
      expect(gi).toBeGreaterThanOrEqual(0);
      expect(gi).toBeLessThan(G);
      sizes[gi]++;
    }
    expect(sizes).toEqual([20, 20, 20, 20, 16]);
    for (let i = 0; i < K; i++) expect(g.weight.gIdx[perm[i]!]).toBe(Math.floor(i / 20));
    // Every code sits on its own group's grid: dequantizing reproduces a value within range.
    const deq = dequantize(g.weight);
    for (let i = 0; i < deq.length; i++) expect(Number.isFinite(deq[i]!)).toBe(true);
  });

  it("static groups keep g_idx = k / group_size under act-order and still beat RTN", () => {
    const spec: QuantSpec = { bits: 3, groupSize: 32, sym: false, descAct: true };
    const g = gptqQuantize(W, N, K, H, spec, { staticGroups: true });
    for (let k = 0; k < K; k++) expect(g.weight.gIdx[k]).toBe(Math.floor(k / 32));
    const rtn = quantizeRtn(W, N, K, { ...spec, descAct: false });
    expect(outputError(W, g.weight, H)).toBeLessThan(outputError(W, rtn, H));
  });

  it("raises damping until the Cholesky of an indefinite element-wise max succeeds", () => {
    // max(a a^T, b b^T) element-wise, a = (1, 1, 0), b = (0, 1, 1): [[1,1,0],[1,1,1],[0,1,1]],
    // whose determinant is -1; each term is PSD, the max is not.
    const h = Float64Array.from([1, 1, 0, 1, 1, 1, 0, 1, 1]);
    expect(choleskyLower(Float64Array.from(h).map((v, i) => (i % 4 === 0 ? v * 1.01 : v)), 3)).toBe(false);
    const w = Float32Array.from([0.3, -0.2, 0.1, 0.05, 0.4, -0.35]);
    const g = gptqQuantize(w, 2, 3, h, { bits: 4, groupSize: -1, sym: false, descAct: false });
    // The smallest eigenvalue is 1 - sqrt(2) ≈ -0.414 (mean diagonal 1): 1%..10% fail, 20% and 40% too.
    expect(g.damp).toBeCloseTo(0.8, 10);
    // It is the smallest damping of the schedule that works (mean diagonal 1).
    const schedule = dampSchedule(0.01);
    const i = schedule.indexOf(g.damp);
    expect(i).toBeGreaterThan(10);
    const pd = (d: number): boolean => choleskyLower(h.map((v, j) => (j % 4 === 0 ? v + d : v)), 3);
    expect(pd(schedule[i - 1]!)).toBe(false);
    expect(pd(schedule[i]!)).toBe(true);
    expect(g.attempts).toBe(i + 1);
  });

  it("dead inputs (zero Hessian diagonal) quantize to exactly zero", () => {
    const h = Float64Array.from(H);
    for (const k of [3, 40]) for (let j = 0; j < K; j++) h[k * K + j] = h[j * K + k] = 0;
    const g = gptqQuantize(W, N, K, h, { bits: 4, groupSize: 32, sym: false, descAct: true });
    expect(g.deadColumns).toBe(2);
    const deq = dequantize(g.weight);
    for (let nn = 0; nn < N; nn++) {
      expect(deq[nn * K + 3]).toBe(0);
      expect(deq[nn * K + 40]).toBe(0);
    }
  });

  it("is deterministic: the same inputs give the same bytes", () => {
    const spec: QuantSpec = { bits: 3, groupSize: 16, sym: false, descAct: true };
    const a = gptqQuantize(W, N, K, Float32Array.from(H), spec);
    const b = gptqQuantize(W, N, K, Float32Array.from(H), spec);
    expect(b.weight.codes).toEqual(a.weight.codes);
    expect(b.weight.scales).toEqual(a.weight.scales);
    expect(b.loss).toBe(a.loss);
  });

  it("blocks smaller than the group (lazy updates across group boundaries) change nothing but rounding order", () => {
    const spec: QuantSpec = { bits: 4, groupSize: 32, sym: false, descAct: false };
    const big = gptqQuantize(W, N, K, H, spec, { blockSize: 128 });
    const small = gptqQuantize(W, N, K, H, spec, { blockSize: 8 });
    // Same algorithm, different summation order: almost every code agrees.
    let same = 0;
    for (let i = 0; i < big.weight.codes.length; i++) if (big.weight.codes[i] === small.weight.codes[i]) same++;
    expect(same / big.weight.codes.length).toBeGreaterThan(0.99);
  });
});
