// The per-group uniform quantizer every method shares (RTN, GPTQ, MLGPTQ): how a group's
// scale and zero point are chosen, and how one value becomes a code.
//
// Two rules make a written checkpoint reproduce exactly what a solver computed:
// - Scales are fp16 (the GPTQ layout stores them so), and they are made fp16 here,
//   before any code is chosen. They are rounded *up* to the next fp16, so the grid
//   still spans the group's range and every value stays within scale/2 of a grid point.
// - Asymmetric zero points are kept in [1, 2^bits - 1]. The classic GPTQ layout
//   stores zero - 1, so a zero of 0 cannot be stored: AutoGPTQ's own packer corrupts
//   the neighbouring fields, and loaders disagree on what the wrapped value means
//   (vLLM and exllama read 2^bits, GPTQModel reads 0). A group that would get zero 0
//   (its minimum is within half a step of 0) gets zero 1 and a slightly larger scale.

import { f16ToF32, f32ToF16 } from "../backend/tensor.js";
import type { QuantBits } from "./types.js";

export interface GroupParams {
  /** An fp16 value (exactly representable), > 0. */
  readonly scale: number;
  /** An integer in [0, 2^bits - 1]; 2^(bits-1) when symmetric, >= 1 when asymmetric. */
  readonly zero: number;
}

/** Largest code: 2^bits - 1. */
export function maxCode(bits: QuantBits): number {
  return (1 << bits) - 1;
}

/** Largest finite fp16. */
export const F16_MAX = 65504;

const f32Box = new Float32Array(1);
const f16Box = new Uint16Array(1);
const f16Out = new Float32Array(1);

/** The fp16 value nearest to x (round to nearest even), as a number. */
export function toF16(x: number): number {
  f32Box[0] = x;
  f32ToF16(f32Box, f16Box);
  return f16ToF32(f16Box, f16Out)[0]!;
}

/** Smallest fp16 value >= x, for 0 < x <= F16_MAX. */
export function f16Ceil(x: number): number {
  if (!(x > 0) || x > F16_MAX) {
    throw new RangeError(`a quantization scale of ${x} is not a positive fp16 value (fp16 holds up to ${F16_MAX}); are the weights finite and sane?`);
  }
  f32Box[0] = x;
  f32ToF16(f32Box, f16Box);
  let v = f16ToF32(f16Box, f16Out)[0]!;
  // Positive fp16 bit patterns are ordered like their values: +1 is the next fp16 up.
  if (v < x) {
    f16Box[0] = f16Box[0]! + 1;
    v = f16ToF32(f16Box, f16Out)[0]!;
  }
  return v;
}

/** Round half to even, as torch.round does (GPTQ reference implementations use it). */
export function roundHalfEven(x: number): number {
  let r = Math.round(x);
  if (r - x === 0.5 && (r & 1) !== 0) r -= 1;
  return r;
}

/**
 * Scale and zero point for a group whose values lie in [min, max].
 * Asymmetric: the range is widened to include 0 (so 0 is exact) and split into
 * 2^bits - 1 steps. Symmetric: the range is [-amax, amax], zero is 2^(bits-1).
 */
export function groupParams(min: number, max: number, bits: QuantBits, sym: boolean): GroupParams {
  if (!Number.isFinite(min) || !Number.isFinite(max)) {
    throw new RangeError(`cannot quantize a group containing ${Number.isFinite(min) ? max : min}; the weights must be finite`);
  }
  const maxq = maxCode(bits);
  if (sym) {
    const zero = (maxq + 1) / 2;
    const amax = Math.max(Math.abs(min), Math.abs(max));
    // An all-zero group: any scale reproduces it; 1 keeps it a normal fp16.
    if (amax === 0) return { scale: 1, zero };
    return { scale: f16Ceil((2 * amax) / maxq), zero };
  }
  const lo = Math.min(min, 0);
  const hi = Math.max(max, 0);
  if (lo === hi) return { scale: 1, zero: 1 };
  let scale = f16Ceil((hi - lo) / maxq);
  let zero = roundHalfEven(-lo / scale);
  if (zero < 1) {
    // Grid [-scale, (maxq - 1) * scale]: covers hi, and lo in [-scale, 0].
    zero = 1;
    scale = f16Ceil(Math.max(hi / (maxq - 1), -lo));
  }
  return { scale, zero: Math.min(zero, maxq) };
}

/** groupParams over values[start], values[start + stride], ... (count of them). */
export function groupParamsOf(values: ArrayLike<number>, bits: QuantBits, sym: boolean, start = 0, count = values.length - start, stride = 1): GroupParams {
  let min = Infinity;
  let max = -Infinity;
  for (let i = 0, j = start; i < count; i++, j += stride) {
    const v = values[j]!;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (count === 0) return groupParams(0, 0, bits, sym);
  return groupParams(min, max, bits, sym);
}

/** The code of x: clamp(round(x / scale) + zero, 0, maxq). */
export function quantizeValue(x: number, scale: number, zero: number, maxq: number): number {
  const q = roundHalfEven(x / scale) + zero;
  return q < 0 ? 0 : q > maxq ? maxq : q;
}

/** What a loader computes for a code, rounded to f32 as `dequantize` stores it. */
export function dequantizeValue(code: number, scale: number, zero: number): number {
  return Math.fround(scale * (code - zero));
}

/**
 * g_idx for `inDim` inputs: consecutive groups of `groupSize` (-1: one group), or with
 * act-order, groups in solving order: perm[i] is the i-th input solved, and it falls in
 * group floor(i / groupSize) (AutoGPTQ/GPTQModel build g_idx the same way).
 */
export function groupIndex(inDim: number, groupSize: number, perm?: ArrayLike<number>): Int32Array {
  if (groupSize !== -1 && !(Number.isInteger(groupSize) && groupSize > 0)) {
    throw new RangeError(`group size must be a positive integer or -1, got ${groupSize}`);
  }
  const gs = groupSize === -1 ? inDim : groupSize;
  const g = new Int32Array(inDim);
  if (!perm) {
    for (let k = 0; k < inDim; k++) g[k] = Math.floor(k / gs);
    return g;
  }
  if (perm.length !== inDim) throw new RangeError(`perm has ${perm.length} entries, expected ${inDim}`);
  const seen = new Uint8Array(inDim);
  for (let i = 0; i < inDim; i++) {
    const k = perm[i]!;
    if (!(k >= 0 && k < inDim) || seen[k]) throw new RangeError(`perm is not a permutation of 0..${inDim - 1} (entry ${i} is ${k})`);
    seen[k] = 1;
    g[k] = Math.floor(i / gs);
  }
  return g;
}
