import { describe, expect, it } from "vitest";
import { mulberry32 } from "../backend/rng.js";
import { aggregator, type AggregateKind } from "./aggregate.js";
import { choleskyLower } from "./linalg.js";

const K = 12;

/** A random PSD matrix (2/n) X X^T from n samples, as f32. */
function psd(seed: number, n = 30): Float32Array {
  const rand = mulberry32(seed);
  const x = Array.from({ length: n * K }, () => rand() - 0.5 + (rand() < 0.1 ? 2 : 0));
  const h = new Float32Array(K * K);
  for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) {
    let s = 0;
    for (let t = 0; t < n; t++) s += x[t * K + i]! * x[t * K + j]!;
    h[i * K + j] = (2 / n) * s;
  }
  return h;
}

const hs = [psd(1), psd(2), psd(3)];
const tokens = [30, 60, 90];

function run(kind: AggregateKind, list = hs, toks = tokens, k = K): Float64Array {
  const agg = aggregator(kind);
  const st = agg.init(k);
  list.forEach((h, i) => agg.fold(st, h, k, toks[i]!));
  return agg.finish(st, k, toks);
}

describe("aggregates", () => {
  it("max is the element-wise maximum", () => {
    const m = run("max");
    for (let i = 0; i < K * K; i++) expect(m[i]).toBe(Math.max(hs[0]![i]!, hs[1]![i]!, hs[2]![i]!));
  });

  it("mean weighs tasks alike; pooled weighs them by tokens", () => {
    const mean = run("mean"), pooled = run("pooled");
    for (const i of [0, 5, K + 3, K * K - 1]) {
      expect(mean[i]).toBeCloseTo((hs[0]![i]! + hs[1]![i]! + hs[2]![i]!) / 3, 5);
      expect(pooled[i]).toBeCloseTo((30 * hs[0]![i]! + 60 * hs[1]![i]! + 90 * hs[2]![i]!) / 180, 5);
    }
  });

  it("max-diag has the max's diagonal and stays positive definite", () => {
    const m = run("max-diag");
    for (let k = 0; k < K; k++) expect(m[k * K + k]).toBeCloseTo(Math.max(hs[0]![k * K + k]!, hs[1]![k * K + k]!, hs[2]![k * K + k]!), 5);
    expect(choleskyLower(Float64Array.from(m), K)).toBe(true);
  });

  it("max-psd is the max with its negative eigenvalues removed", () => {
    // The indefinite max of a a^T and b b^T, a = (1, 1, 0), b = (0, 1, 1): eigenvalues 1 ± sqrt(2), 1.
    const m = run("max-psd", [Float32Array.from([1, 1, 0, 1, 1, 0, 0, 0, 0]), Float32Array.from([0, 0, 0, 0, 1, 1, 0, 1, 1])], [1, 1], 3);
    expect(m.length).toBe(9);
    const lam = 1 + Math.SQRT2, v = [1 / 2, Math.SQRT1_2, 1 / 2]; // the top eigenvector; eigenvalue 1 has (1, 0, -1)/sqrt(2)
    for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) {
      const want = lam * v[i]! * v[j]! + (i !== 1 && j !== 1 ? (i === j ? 0.5 : -0.5) : 0);
      expect(m[i * 3 + j]).toBeCloseTo(want, 12);
    }
  });

  it("inv-max gives a positive-definite Hessian", () => {
    expect(choleskyLower(run("inv-max"), K)).toBe(true);
  });

  for (const kind of ["max", "mean", "max-psd", "max-diag", "inv-max", "pooled"] as const) {
    it(`${kind}: folding tasks into a stored f32 state later gives the same bits as folding all at once`, () => {
      const agg = aggregator(kind);
      const all = agg.init(K);
      hs.forEach((h, i) => agg.fold(all, h, K, tokens[i]!));
      const first = agg.init(K);
      hs.slice(0, 2).forEach((h, i) => agg.fold(first, h, K, tokens[i]!));
      // What mlgptq/ stores and reads back: f32 copies of the state.
      const stored = Object.fromEntries(Object.entries(first).map(([k, v]) => [k, Float32Array.from(v)]));
      agg.fold(stored, hs[2]!, K, tokens[2]!);
      for (const k of Object.keys(all)) expect(Buffer.from(stored[k]!.buffer).equals(Buffer.from(all[k]!.buffer))).toBe(true);
      expect(agg.finish(stored, K, tokens)).toEqual(agg.finish(all, K, tokens));
    });
  }
});
