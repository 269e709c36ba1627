// How per-task Hessians H_t become the one Hessian a shared base is solved with.
//
// Each aggregate keeps a small running state per site that tasks fold into one at a
// time, in task order. The state is what `mlgptq/` caches on disk, so adding tasks
// later folds the new H_t into the cached state - and since every fold runs in f32
// (what is stored) in the same order, incremental and full runs produce the same bits.
//
//   max       Ĥ = max_t H_t element-wise (DESIGN §3): for every channel pair, the task
//             most sensitive there. May be indefinite; the solver's damping copes.
//   mean      Ĥ = mean_t H_t: every task's activations (adapter on) weighted alike
//             (the default: best on the quality harness, see methods.ts).
//   max-psd   the max projected onto the PSD cone (negative eigenvalues set to 0) instead
//             of damped: keeps the max's structure without the large damping an
//             indefinite max needs (which pulls GPTQ towards round-to-nearest).
//   max-diag  Ĥ = S H_mean S, S = diag(sqrt(max_t H_t[k,k] / H_mean[k,k])): the max's
//             per-channel sensitivity with the mean's correlations; PSD by construction.
//   inv-max   the LoRA-Inlaid paper's variant as we read it: element-wise max over the
//             damped inverses (H_t + λ_t I)^-1, then inverted back (damped until PD).
//   pooled    Σ_t n_t H_t / Σ_t n_t: all calibration tokens in one Hessian, as if one
//             data set (GPTQ-mixed, whose H_t are captured without adapters).

import { spdInverse, symmetricEigen } from "./linalg.js";
import { dampSchedule } from "./gptq.js";

export const AGGREGATES = ["max", "mean", "max-psd", "max-diag", "inv-max"] as const;
export type Aggregate = (typeof AGGREGATES)[number];
export type AggregateKind = Aggregate | "pooled";

/** Named f32 arrays per site; `fold` updates them in place. */
export type AggState = Record<string, Float32Array>;

export interface Aggregator {
  readonly kind: AggregateKind;
  /** The state before any task, for a site with K inputs. */
  init(K: number): AggState;
  /** Folds one task's H [K, K] (per-token normalized, over `tokens` tokens) into `state`. */
  fold(state: AggState, h: Float32Array, K: number, tokens: number): void;
  /** The Hessian to solve with, from the state after `tokens.length` tasks (their token counts). */
  finish(state: AggState, K: number, tokens: readonly number[]): Float64Array;
}

/** a[i] / d in float64. A loop, not Float64Array.from(a, map): that builds a JS array
 * first, which runs out of heap at 7B's sizes (121M entries for down_proj's K = 11008). */
function scaled(a: Float32Array, d: number): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! / d;
  return out;
}

const maxAgg: Aggregator = {
  kind: "max",
  init: (K) => ({ max: new Float32Array(K * K).fill(-Infinity) }),
  fold(s, h) {
    const m = s["max"]!;
    for (let i = 0; i < m.length; i++) if (h[i]! > m[i]!) m[i] = h[i]!;
  },
  finish: (s) => new Float64Array(s["max"]!),
};

/** The nearest PSD matrix (Frobenius): eigenvalues below 0 set to 0. */
export function psdProjection(a: Float64Array, K: number): Float64Array {
  const { values, vectors } = symmetricEigen(a, K);
  const out = new Float64Array(K * K);
  for (let k = 0; k < K; k++) {
    const lam = values[k]!;
    if (!(lam > 0)) continue;
    const ok = k * K;
    for (let i = 0; i < K; i++) {
      const c = lam * vectors[ok + i]!;
      if (c === 0) continue;
      const oi = i * K;
      for (let j = 0; j < K; j++) out[oi + j] = out[oi + j]! + c * vectors[ok + j]!;
    }
  }
  return out;
}

const maxPsdAgg: Aggregator = {
  kind: "max-psd",
  init: maxAgg.init,
  fold: maxAgg.fold,
  finish: (s, K) => psdProjection(new Float64Array(s["max"]!), K),
};

const meanAgg: Aggregator = {
  kind: "mean",
  init: (K) => ({ sum: new Float32Array(K * K) }),
  fold(s, h) {
    const m = s["sum"]!;
    for (let i = 0; i < m.length; i++) m[i] = m[i]! + h[i]!;
  },
  finish(s, _K, tokens) {
    const T = tokens.length;
    return scaled(s["sum"]!, T);
  },
};

const maxDiagAgg: Aggregator = {
  kind: "max-diag",
  init: (K) => ({ sum: new Float32Array(K * K), diag_max: new Float32Array(K).fill(-Infinity) }),
  fold(s, h, K) {
    meanAgg.fold(s, h, K, 0);
    const d = s["diag_max"]!;
    for (let k = 0; k < K; k++) if (h[k * K + k]! > d[k]!) d[k] = h[k * K + k]!;
  },
  finish(s, K, tokens) {
    const mean = meanAgg.finish(s, K, tokens);
    const d = s["diag_max"]!;
    // A channel no task uses (mean diagonal 0) stays dead: scale 0.
    const sc = Float64Array.from({ length: K }, (_, k) => (mean[k * K + k]! > 0 ? Math.sqrt(d[k]! / mean[k * K + k]!) : 0));
    for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) mean[i * K + j] = mean[i * K + j]! * sc[i]! * sc[j]!;
    return mean;
  },
};

/** (H + λ I)^-1 with the GPTQ damping schedule (1% of the mean diagonal, raised until PD). */
function dampedInverse(h: ArrayLike<number>, K: number): Float64Array {
  let mean = 0;
  for (let k = 0; k < K; k++) mean += h[k * K + k]!;
  mean = mean / K || 1;
  for (const d of dampSchedule(0.01)) {
    const a = Float64Array.from(h);
    for (let k = 0; k < K; k++) a[k * K + k] = a[k * K + k]! + d * mean;
    const inv = spdInverse(a, K);
    if (inv) return inv;
  }
  throw new Error("a Hessian stays indefinite under any damping; it has non-finite entries");
}

const invMaxAgg: Aggregator = {
  kind: "inv-max",
  init: (K) => ({ inv_max: new Float32Array(K * K).fill(-Infinity) }),
  fold(s, h, K) {
    const inv = dampedInverse(h, K);
    const m = s["inv_max"]!;
    for (let i = 0; i < m.length; i++) if (inv[i]! > m[i]!) m[i] = inv[i]!;
  },
  // The max of inverses need not be PD either: it is damped like an H before inverting back.
  finish: (s, K) => dampedInverse(s["inv_max"]!, K),
};

const pooledAgg: Aggregator = {
  kind: "pooled",
  init: (K) => ({ sum: new Float32Array(K * K) }),
  fold(s, h, _K, tokens) {
    const m = s["sum"]!;
    for (let i = 0; i < m.length; i++) m[i] = m[i]! + tokens * h[i]!;
  },
  finish(s, _K, tokens) {
    const n = tokens.reduce((a, b) => a + b, 0);
    return scaled(s["sum"]!, n);
  },
};

export function aggregator(kind: AggregateKind): Aggregator {
  switch (kind) {
    case "max": return maxAgg;
    case "mean": return meanAgg;
    case "max-psd": return maxPsdAgg;
    case "max-diag": return maxDiagAgg;
    case "inv-max": return invMaxAgg;
    case "pooled": return pooledAgg;
    default: return kind satisfies never;
  }
}
