// Random GPTQ problems for the solver tests (CPU plan checks, GPU vs CPU): a weight w
// [N, K] and a Hessian h = (2/n) X^T X [K, K] (f32, symmetric) whose inputs have spread-out
// scales (so act-order matters) and correlated neighbours (so GPTQ's error pushing matters).
// Options make some inputs dead (an all-zero column of X: H[k, k] = 0) or shift the
// diagonal down to make h indefinite (as an element-wise max of Hessians can be).

import { seededRandom } from "./quant_random.js";

export interface GptqProblem {
  readonly w: Float32Array;
  readonly h: Float32Array;
  readonly N: number;
  readonly K: number;
}

export interface ProblemOptions {
  /** Rows of X (default K + 16). */
  readonly rows?: number;
  /** Inputs whose activations are all zero. */
  readonly dead?: readonly number[];
  /** Subtract this fraction of mean(diag h) from the diagonal (indefinite h). */
  readonly shift?: number;
}

/** Approximately standard normal (sum of uniforms), seeded. */
function normal(r: () => number): number {
  return r() + r() + r() + r() - 2;
}

export function gptqProblem(K: number, N: number, seed: number, o: ProblemOptions = {}): GptqProblem {
  const r = seededRandom(seed);
  const n = o.rows ?? K + 16;
  const scale = Float64Array.from({ length: K }, () => Math.exp(2 * (r() - 0.5) * 2));
  for (const k of o.dead ?? []) scale[k] = 0;
  const x = new Float64Array(n * K);
  for (let t = 0; t < n; t++) {
    let prev = 0;
    for (let k = 0; k < K; k++) {
      const z = normal(r);
      prev = 0.6 * prev + z; // neighbours correlate
      x[t * K + k] = prev * scale[k]!;
    }
  }
  const h64 = new Float64Array(K * K);
  for (let i = 0; i < K; i++) {
    for (let j = i; j < K; j++) {
      let s = 0;
      for (let t = 0; t < n; t++) s += x[t * K + i]! * x[t * K + j]!;
      h64[i * K + j] = h64[j * K + i] = (2 / n) * s;
    }
  }
  if (o.shift) {
    let mean = 0;
    for (let k = 0; k < K; k++) mean += h64[k * K + k]!;
    mean /= K;
    for (let k = 0; k < K; k++) if (h64[k * K + k] !== 0) h64[k * K + k] = h64[k * K + k]! - o.shift * mean;
  }
  const w = Float32Array.from({ length: N * K }, () => 0.05 * normal(r));
  return { w, h: Float32Array.from(h64), N, K };
}
