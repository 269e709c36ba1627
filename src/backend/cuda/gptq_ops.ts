// Launches of kernels/gptq.cu (GPTQ's per-linear solve in f64) through the Launcher
// seam. No FFI and no memory management here: quant/gpu_gptq_cuda.ts owns the buffers,
// cuSOLVER and cuBLAS, and calls these in order. Each method states its semantics; the
// kernel file's header has the layouts.

import type { DevicePtr, Launcher } from "./launch.js";

/** Columns per gptq_block CTA (its lanes) and most columns per block (its shared tile). */
export const GPTQ_LANES = 32;
export const GPTQ_MAX_BLOCK = 128;

/** Every kernel GptqOps launches (a CPU test checks each is defined in gptq.cu with these argument kinds). */
export function gptqKernelNames(): string[] {
  return ["gptq_damped_hessian", "gptq_factor_ok", "gptq_reverse_upper", "gptq_load_weight", "gptq_group_params", "gptq_block"];
}

/** The two 32-bit halves of an f64, as the kernels reassemble them (__hiloint2double). */
export function f64Halves(x: number): { hi: number; lo: number } {
  const v = new DataView(new ArrayBuffer(8));
  v.setFloat64(0, x, true);
  return { hi: v.getUint32(4, true), lo: v.getUint32(0, true) };
}

export interface GptqBlockArgs {
  /** f64 [K, N], solving order. */
  readonly W: DevicePtr;
  /** f64 [K, K] upper factor of H^-1. */
  readonly U: DevicePtr;
  /** f64 [blockSize, N]: the block's scaled errors (out). */
  readonly E: DevicePtr;
  /** u8 [K, N] by original input (out). */
  readonly codes: DevicePtr;
  /** f32 / u8 [G, N]: read (fixed groups) or written (dynamic groups). */
  readonly scales: DevicePtr;
  readonly zeros: DevicePtr;
  /** i32 [K]: perm[i] = input solved i-th. */
  readonly perm: DevicePtr;
  /** i32 [K]: group of the i-th solved column (read when groups are fixed up front). */
  readonly groupOf: DevicePtr;
  /** f64 [ceil(N / 32)]: this block's loss per CTA (out). */
  readonly loss: DevicePtr;
  /** i32: set to 1 (non-finite group) or 2 (scale beyond fp16) by a failing group. */
  readonly status: DevicePtr;
  readonly K: number;
  readonly N: number;
  /** Dynamic group size, or 0 when the groups (and their scales/zeros) are fixed up front. */
  readonly dynamicGroupSize: number;
  readonly bits: number;
  readonly sym: boolean;
}

export class GptqOps {
  constructor(readonly launcher: Launcher) {}

  /** a f64 [K, K] = reversed solving-order Hessian + lambda I, dead diagonals read as 1 (column-major for cuSOLVER). */
  dampedHessian(a: DevicePtr, h: DevicePtr, perm: DevicePtr, K: number, lambda: number): void {
    const { hi, lo } = f64Halves(lambda);
    const t = Math.ceil(K / 32);
    this.launcher.launch("gptq_damped_hessian", [t, t, 1], [256, 1, 1], 0,
      [{ ptr: a }, { ptr: h }, { ptr: perm }, { i32: K }, { u32: hi }, { u32: lo }]);
  }

  /** *bad = 1 unless every diagonal entry of the f64 [K, K] factor l is finite and positive (bad is not cleared). */
  factorOk(bad: DevicePtr, l: DevicePtr, K: number): void {
    this.launcher.launch("gptq_factor_ok", [1, 1, 1], [1024, 1, 1], 0, [{ ptr: bad }, { ptr: l }, { i32: K }]);
  }

  /** In place: cuSOLVER's column-major lower L^-1 -> row-major U = J L^-1 J (upper), zeros below. */
  reverseUpper(m: DevicePtr, K: number): void {
    this.launcher.launch("gptq_reverse_upper", [Math.ceil(K / 256), K, 1], [256, 1, 1], 0, [{ ptr: m }, { i32: K }]);
  }

  /** W f64 [K, N] = the f32 [N, K] weight transposed into solving order, dead inputs zeroed. */
  loadWeight(W: DevicePtr, w: DevicePtr, perm: DevicePtr, dead: DevicePtr, N: number, K: number): void {
    this.launcher.launch("gptq_load_weight", [Math.ceil(K / 32), Math.ceil(N / 32), 1], [256, 1, 1], 0,
      [{ ptr: W }, { ptr: w }, { ptr: perm }, { ptr: dead }, { i32: N }, { i32: K }]);
  }

  /** scales/zeros [G, N] of groups of `gs` inputs in input order (gs = K: one group) on the f32 [N, K] weight. */
  groupParams(scales: DevicePtr, zeros: DevicePtr, status: DevicePtr, w: DevicePtr, dead: DevicePtr, N: number, K: number, gs: number, bits: number, sym: boolean): void {
    const G = Math.ceil(K / gs);
    this.launcher.launch("gptq_group_params", [N, G, 1], [32, 1, 1], 0,
      [{ ptr: scales }, { ptr: zeros }, { ptr: status }, { ptr: w }, { ptr: dead }, { i32: N }, { i32: K }, { i32: gs }, { i32: bits }, { i32: sym ? 1 : 0 }]);
  }

  /** GPTQ's column loop over solved columns [i1, i2) (at most GPTQ_MAX_BLOCK of them). */
  block(a: GptqBlockArgs, i1: number, i2: number): void {
    if (i2 - i1 > GPTQ_MAX_BLOCK || i2 <= i1) throw new RangeError(`a GPTQ block has 1..${GPTQ_MAX_BLOCK} columns, got ${i2 - i1}`);
    this.launcher.launch("gptq_block", [Math.ceil(a.N / GPTQ_LANES), 1, 1], [256, 1, 1], 0, [
      { ptr: a.W }, { ptr: a.U }, { ptr: a.E }, { ptr: a.codes }, { ptr: a.scales }, { ptr: a.zeros }, { ptr: a.perm }, { ptr: a.groupOf },
      { ptr: a.loss }, { ptr: a.status },
      { i32: i1 }, { i32: i2 }, { i32: a.K }, { i32: a.N }, { i32: a.dynamicGroupSize }, { i32: a.bits }, { i32: a.sym ? 1 : 0 },
    ]);
  }
}
