// GPTQ (Frantar et al. 2022) on one linear, given its Hessian H = (2/n) X X^T:
// quantize the weight column by column (a column = one input k) and push each
// column's rounding error onto the columns not yet quantized, weighted by the upper
// Cholesky factor of H^-1, so the layer output W X moves as little as possible.
//
// The same steps as the reference code (gptq.py / AutoGPTQ's fasterquant), in order:
// - dead inputs (H[k, k] = 0: never active) get H[k, k] = 1 and a zero weight column;
// - act-order (desc_act) solves inputs by decreasing H[k, k], the most sensitive first;
// - damping: lambda = 1% of mean(diag H) added to the diagonal; when a Cholesky fails
//   (an aggregated H may be indefinite: DESIGN §3) lambda is raised, +1% of the mean
//   diagonal at a time up to 10%, then doubled, until it succeeds;
// - U = chol(H^-1) upper; columns in blocks of 128 with the error pushed inside the
//   block at once and onto later blocks in one lazy update per block;
// - groups: with group_size -1 each output row has one scale/zero, found on the whole
//   row up front. Otherwise a group's scale/zero are found when its first column is
//   reached, from the current (already error-corrected) values of its columns; with
//   act-order the groups are runs of group_size inputs in solving order, and g_idx maps
//   every input to its group (AutoGPTQ's default). With `staticGroups` the groups are
//   fixed up front on the original weight in input order (g_idx = k / group_size) and
//   act-order only changes the solving order (AutoGPTQ's static_groups).
// One deliberate difference: the reference finds a group's scale on W, which lacks the
// updates made inside the current 128-column block, so with group_size 64 every second
// group is scaled on stale values; here the values being quantized are used.
//
// Codes are rounded with the shared quantizer (fp16 scales, quantizer.ts), and the
// error pushed on is against the value a loader dequantizes, so what is written is what
// was solved for. All math is float64 in a fixed order: identical inputs give identical
// bits. The GPU port replaces choleskyInverseUpper and lazyBlockUpdate (linalg.ts) and
// keeps the column loop as one kernel per block.

import { choleskyInverseUpper, lazyBlockUpdate } from "./linalg.js";
import { dequantizeValue, groupIndex, groupParamsOf, maxCode, quantizeValue } from "./quantizer.js";
import { numGroups, type QuantizedWeight, type QuantSpec } from "./types.js";

export interface GptqOptions {
  /** Columns per lazy-update block (default 128). */
  readonly blockSize?: number;
  /** Initial damping as a fraction of mean(diag H) (default 0.01). */
  readonly percDamp?: number;
  /** Groups fixed up front in input order (see the header); default false. */
  readonly staticGroups?: boolean;
}

export interface GptqResult {
  readonly weight: QuantizedWeight;
  /** Damping that let the Cholesky succeed, as a fraction of mean(diag H). */
  readonly damp: number;
  /** Cholesky attempts (1 when the first damping worked). */
  readonly attempts: number;
  /** GPTQ's own objective: sum over columns of ||w - q||^2 / (2 U[k, k]^2). */
  readonly loss: number;
  /** Inputs whose H[k, k] was 0. */
  readonly deadColumns: number;
  /** Solving order (perm[i] = input solved i-th); the identity without act-order. */
  readonly perm: Int32Array;
}

/** Thrown when no damping makes H positive definite (NaN or infinite entries). */
export class GptqError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GptqError";
  }
}

const MAX_ATTEMPTS = 40;

/** Damping fractions tried in turn: 1x .. 10x percDamp in steps of 1x, then doubling. */
export function dampSchedule(percDamp: number): number[] {
  const out: number[] = [];
  for (let i = 1; i <= MAX_ATTEMPTS; i++) out.push(i <= 10 ? percDamp * i : percDamp * 10 * 2 ** (i - 10));
  return out;
}

/**
 * Upper Cholesky factor of (H + lambda I)^-1 with the smallest damping of the schedule
 * that works, trying them in order (a failing Cholesky stops at the first bad pivot, so
 * the failures are cheap next to the one success). `h` is not modified.
 */
export function dampedInverseFactor(h: Float64Array, K: number, percDamp = 0.01): { u: Float64Array; damp: number; attempts: number } {
  let mean = 0;
  for (let k = 0; k < K; k++) mean += h[k * K + k]!;
  mean /= K;
  if (!Number.isFinite(mean)) throw new GptqError(`the Hessian has non-finite entries (mean diagonal ${mean}); the calibration forward overflowed`);
  const schedule = dampSchedule(percDamp);
  const hd = new Float64Array(h.length);
  for (let a = 0; a < schedule.length; a++) {
    hd.set(h);
    const lambda = schedule[a]! * mean;
    for (let k = 0; k < K; k++) hd[k * K + k] = hd[k * K + k]! + lambda;
    const u = choleskyInverseUpper(hd, K);
    if (u) return { u, damp: schedule[a]!, attempts: a + 1 };
  }
  throw new GptqError(`the Hessian stays indefinite with damping up to ${schedule[schedule.length - 1]} x mean(diag); it is not a usable Hessian`);
}

/** Inputs by decreasing H[k, k]; ties keep input order (deterministic, unlike torch.argsort). */
export function actOrder(h: ArrayLike<number>, K: number): Int32Array {
  const idx = Array.from({ length: K }, (_, k) => k);
  idx.sort((a, b) => h[b * K + b]! - h[a * K + a]! || a - b);
  return Int32Array.from(idx);
}

/**
 * Everything GPTQ derives from the Hessian alone, shared by the linears that read the
 * same input (q/k/v, gate/up): dead inputs, solving order, and the damped factor
 * U = chol((P H P^T + lambda I)^-1) upper in solving order.
 */
export interface PreparedHessian {
  readonly K: number;
  /** 1 where H[k, k] = 0 (input k never active). */
  readonly dead: Uint8Array;
  readonly deadColumns: number;
  /** perm[i] = input solved i-th. */
  readonly perm: Int32Array;
  readonly actOrder: boolean;
  /** [K, K] upper, in solving order. */
  readonly u: Float64Array;
  readonly damp: number;
  readonly attempts: number;
}

export function prepareHessian(h: ArrayLike<number>, K: number, actOrderOn: boolean, percDamp = 0.01): PreparedHessian {
  if (h.length !== K * K) throw new RangeError(`Hessian has ${h.length} values, expected ${K} x ${K} for ${K} inputs`);
  const H = Float64Array.from(h);
  const dead = new Uint8Array(K);
  let deadColumns = 0;
  for (let k = 0; k < K; k++) {
    if (H[k * K + k] === 0) {
      dead[k] = 1;
      deadColumns++;
      H[k * K + k] = 1;
    }
  }
  const perm = actOrderOn ? actOrder(H, K) : Int32Array.from({ length: K }, (_, k) => k);
  let P = H;
  if (actOrderOn) {
    P = new Float64Array(K * K);
    for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) P[i * K + j] = H[perm[i]! * K + perm[j]!]!;
  }
  const { u, damp, attempts } = dampedInverseFactor(P, K, percDamp);
  return { K, dead, deadColumns, perm, actOrder: actOrderOn, u, damp, attempts };
}

/**
 * Quantizes a dense weight w [outDim N, inDim K] (HF orientation, row-major) with GPTQ
 * under the Hessian h [K, K] (f32 or f64, symmetric), or a PreparedHessian of it.
 */
export function gptqQuantize(w: Float32Array, N: number, K: number, h: ArrayLike<number> | PreparedHessian, spec: QuantSpec, opts: GptqOptions = {}): GptqResult {
  if (w.length !== N * K) throw new RangeError(`weight has ${w.length} values, expected ${N} x ${K}`);
  const prep = "u" in h ? h : prepareHessian(h, K, spec.descAct, opts.percDamp);
  if (prep.K !== K || prep.actOrder !== spec.descAct) throw new RangeError(`prepared Hessian is for ${prep.K} inputs, act-order ${prep.actOrder}; the weight has ${K}, desc_act ${spec.descAct}`);
  const B = opts.blockSize ?? 128;
  const gs = spec.groupSize;
  const staticGroups = (opts.staticGroups ?? false) && gs !== -1;
  const maxq = maxCode(spec.bits);
  const { u, perm, damp, attempts } = prep;

  // wt[k, n] = w[n, k]: a GPTQ column is a contiguous row here. Dead inputs get zero weights.
  const wt = new Float64Array(K * N);
  for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) wt[k * N + n] = prep.dead[k] ? 0 : w[n * K + k]!;

  const G = numGroups(K, gs);
  const scales = new Float32Array(G * N);
  const zeros = new Uint8Array(G * N);
  const setGroup = (g: number, from: number, to: number, src: Float64Array): void => {
    for (let n = 0; n < N; n++) {
      const p = groupParamsOf(src, spec.bits, spec.sym, from * N + n, to - from, N);
      scales[g * N + n] = p.scale;
      zeros[g * N + n] = p.zero;
    }
  };
  if (gs === -1) setGroup(0, 0, K, wt);
  else if (staticGroups) for (let g = 0; g < G; g++) setGroup(g, g * gs, Math.min((g + 1) * gs, K), wt);

  // Group of the i-th solved column.
  const groupOfPos = new Int32Array(K);
  for (let i = 0; i < K; i++) groupOfPos[i] = gs === -1 ? 0 : staticGroups ? Math.floor(perm[i]! / gs) : Math.floor(i / gs);
  let W = wt;
  if (spec.descAct) {
    W = new Float64Array(K * N);
    for (let i = 0; i < K; i++) W.set(wt.subarray(perm[i]! * N, (perm[i]! + 1) * N), i * N);
  }

  const codes = new Uint8Array(K * N);
  const err = new Float64Array(B * N);
  let loss = 0;
  for (let i1 = 0; i1 < K; i1 += B) {
    const i2 = Math.min(i1 + B, K);
    for (let i = i1; i < i2; i++) {
      // A dynamic group starts here: scale it on its current (error-corrected) columns.
      if (gs !== -1 && !staticGroups && i % gs === 0) setGroup(groupOfPos[i]!, i, Math.min(i + gs, K), W);
      const g = groupOfPos[i]! * N;
      const d = u[i * K + i]!;
      const row = i * N;
      const e = (i - i1) * N;
      const out = perm[i]! * N;
      for (let n = 0; n < N; n++) {
        const x = W[row + n]!;
        const s = scales[g + n]!, z = zeros[g + n]!;
        const c = quantizeValue(x, s, z, maxq);
        codes[out + n] = c;
        const diff = x - dequantizeValue(c, s, z);
        loss += (diff * diff) / (d * d);
        err[e + n] = diff / d;
      }
      // Inside the block, at once: later columns absorb this column's error.
      for (let j = i + 1; j < i2; j++) {
        const cj = u[i * K + j]!;
        if (cj === 0) continue;
        const oj = j * N;
        for (let n = 0; n < N; n++) W[oj + n] = W[oj + n]! - cj * err[e + n]!;
      }
    }
    lazyBlockUpdate(W, err, u, K, N, i1, i2);
  }

  const gIdx = gs === -1 ? new Int32Array(K) : staticGroups ? groupIndex(K, gs) : groupIndex(K, gs, perm);
  return {
    weight: { spec, inDim: K, outDim: N, codes, scales, zeros, gIdx },
    damp,
    attempts,
    loss: loss / 2,
    deadColumns: prep.deadColumns,
    perm,
  };
}
