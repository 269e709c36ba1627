// The host half of the CUDA GPTQ solver: what GPTQ decides from the Hessian's diagonal
// alone, computed exactly as gptq.ts does (same comparisons, same summation order), so the
// GPU solve starts from the CPU's dead inputs, solving order, damping base and groups.
// O(K log K) on the host; the K x K work stays on the device.

import { GptqError } from "./gptq.js";
import { groupIndex } from "./quantizer.js";
import { numGroups, type QuantSpec } from "./types.js";

export interface GptqPlan {
  readonly K: number;
  /** 1 where H[k, k] = 0 (never active): its H[k, k] reads as 1 and its weights as 0. */
  readonly dead: Uint8Array;
  readonly deadColumns: number;
  /** perm[i] = input solved i-th (act-order: by decreasing H[k, k], ties in input order). */
  readonly perm: Int32Array;
  /** mean(diag H) with dead diagonals as 1, summed in solving order (gptq.ts dampedInverseFactor). */
  readonly meanDiag: number;
  /** Groups: "one" (one group per output row), "static" (fixed up front in input order) or "dynamic" (found at each group's first solved column). */
  readonly groups: "one" | "static" | "dynamic";
  readonly numGroups: number;
  /** Group of the i-th solved column. */
  readonly groupOf: Int32Array;
  /** g_idx of the result: group of input k. */
  readonly gIdx: Int32Array;
}

/** The diagonal-derived part of gptqQuantize / prepareHessian for h [K, K]. */
export function gptqPlan(h: ArrayLike<number>, K: number, spec: QuantSpec, staticGroupsOpt = false): GptqPlan {
  if (h.length !== K * K) throw new RangeError(`Hessian has ${h.length} values, expected ${K} x ${K} for ${K} inputs`);
  const diag = new Float64Array(K);
  const dead = new Uint8Array(K);
  let deadColumns = 0;
  for (let k = 0; k < K; k++) {
    const v = h[k * K + k]!;
    if (v === 0) {
      dead[k] = 1;
      deadColumns++;
      diag[k] = 1;
    } else {
      diag[k] = v;
    }
  }
  const perm = Int32Array.from({ length: K }, (_, k) => k);
  // gptq.ts actOrder: decreasing H[k, k], ties by input index.
  if (spec.descAct) perm.sort((a, b) => diag[b]! - diag[a]! || a - b);
  let mean = 0;
  for (let i = 0; i < K; i++) mean += diag[perm[i]!]!;
  mean /= K;
  if (!Number.isFinite(mean)) throw new GptqError(`the Hessian has non-finite entries (mean diagonal ${mean}); the calibration forward overflowed`);

  const gs = spec.groupSize;
  const groups = gs === -1 ? "one" : staticGroupsOpt ? "static" : "dynamic";
  const groupOf = new Int32Array(K);
  if (groups !== "one") for (let i = 0; i < K; i++) groupOf[i] = groups === "static" ? Math.floor(perm[i]! / gs) : Math.floor(i / gs);
  const gIdx = groups === "one" ? new Int32Array(K) : groups === "static" ? groupIndex(K, gs) : groupIndex(K, gs, perm);
  return { K, dead, deadColumns, perm, meanDiag: mean, groups, numGroups: numGroups(K, gs), groupOf, gIdx };
}
