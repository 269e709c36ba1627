// Launches of kernels/quant_gemm.cu (the low-bit GEMM for GPTQ weights) through the
// Launcher seam, and the launch plans the backend sizes its scratch from. No FFI here.
//
// Paths of `linearQuantized` (CudaBackend picks by the launch's row count, a capacity):
//   rows <= fusedMaxRows (default 128, INLAID_QUANT_FUSED_MAX_ROWS): quant_gemm_b{B}_t{T}, the
//     fused kernel. T = 1, 2, 4 token tiles of 8 rows for up to 8, 16, 32 rows; more rows run
//     m-blocks of 32 (the same weights re-read, mostly from L2, by the m-blocks of a column,
//     which the grid launches next to each other).
//   more rows: per chunk of columns, quant_dequant_b{B} expands the weights to bf16 in a
//     scratch buffer and cuBLASLt multiplies (the GEMM is compute-bound there).
// Act-order weights first gather x's columns into the kernel's k order (quant_gather_cols).
//
// Split-K. The fused kernel's grid is (m-blocks, ceil(N/128), S): one warp per (32-output
// column, m-block, k split). S is chosen so that the CTAs fill about one wave of the
// device at the kernel's occupancy (ctasPerSm, from its __launch_bounds__): S =
// clamp(floor(SMs * ctasPerSm / (columnGroups * mBlocks)), 1, min(16, K/128)).
// CudaBackend.quantSplits (default INLAID_QGEMM_SPLITS) fixes S, for tuning with
// bench/quant_gemm.ts --sweep. With S > 1 the splits
// meet in `partials` (f32 [S, rows, N]) and `counters` (i32 [mBlocks, N/32], zero between
// launches); see the kernel's header. Every launch parameter depends on the weight's shape
// and the launch's row capacity only, so a captured graph replays any step of its bucket.

import type { DevicePtr, Dim3, KernelArg, Launcher } from "./launch.js";
import type { Operand } from "./device_ops.js";
import { COL_N, UNIT_K } from "./quant_layout.js";
import type { QuantBits } from "../../quant/types.js";

/** A quantized weight in device memory (the parts of a QuantLayout). */
export interface DeviceQuantWeight {
  readonly bits: QuantBits;
  readonly K: number;
  readonly N: number;
  readonly groupSize: number;
  readonly groups: number;
  readonly symZero: number;
  readonly words: DevicePtr;
  readonly scales: DevicePtr;
  /** 0n when symmetric. */
  readonly zeros: DevicePtr;
  /** i32 [K]; 0n without act-order. */
  readonly perm: DevicePtr;
}

export const QUANT_BITS_WITH_KERNELS: readonly QuantBits[] = [2, 3, 4, 8];
/** Warps per CTA of the fused and dequant kernels. */
const WARPS = 4;
/** Most k splits of the fused kernel. */
export const MAX_SPLITS = 16;
/** Elements of one bf16 chunk of the prefill path (32 MiB). */
export const DEQUANT_CHUNK_ELEMS = 16 << 20;

/** Ring slots per warp of the fused kernel (quant_gemm.cu QCfg::kRing). */
export function ringSlots(bits: QuantBits): number {
  return bits === 2 ? 8 : bits === 3 ? 5 : bits === 4 ? 4 : 2;
}

/** Dynamic shared memory of quant_gemm_b{B}_t{T}: 4 warps x ring x (B x 512 + 384) bytes. */
export function fusedSmemBytes(bits: QuantBits): number {
  return WARPS * ringSlots(bits) * (bits * 32 + 24) * 16;
}

/** Token tiles of 8 rows the fused kernel runs per m-block. */
export function tokenTiles(rows: number): 1 | 2 | 4 {
  return rows <= 8 ? 1 : rows <= 16 ? 2 : 4;
}

/** CTAs per SM the fused kernel's registers are cut for (its __launch_bounds__ minimum). */
export function ctasPerSm(bits: QuantBits, T: number): number {
  if (bits === 8) return T === 4 ? 2 : 3;
  return T === 4 ? 3 : 4;
}

export interface FusedPlan {
  readonly kernel: string;
  readonly T: 1 | 2 | 4;
  readonly mBlocks: number;
  readonly splits: number;
  readonly grid: Dim3;
  readonly smem: number;
  /** Bytes of f32 partials (0 when splits = 1) and i32 counters the launch needs. */
  readonly partialBytes: number;
  readonly counterBytes: number;
}

/** INLAID_QGEMM_SPLITS as a split count, or null (unset, empty or not a positive integer). */
export function splitsFromEnv(): number | null {
  const v = process.env.INLAID_QGEMM_SPLITS;
  if (v === undefined || v === "") return null;
  const n = Number(v);
  return Number.isInteger(n) && n >= 1 ? n : null;
}

/** The fused kernel's launch for `rows` rows (a capacity) of a K x N weight; `splits` fixes S (clamped). */
export function fusedPlan(bits: QuantBits, K: number, N: number, rows: number, smCount: number, splits?: number | null): FusedPlan {
  const T = tokenTiles(rows);
  const mBlocks = Math.ceil(rows / (8 * T));
  const NC = N / COL_N, colGroups = Math.ceil(NC / WARPS), units = Math.ceil(K / UNIT_K);
  const wanted = splits ?? Math.floor((smCount * ctasPerSm(bits, T)) / (colGroups * mBlocks));
  const S = Math.max(1, Math.min(wanted, MAX_SPLITS, units));
  return {
    kernel: `quant_gemm_b${bits}_t${T}`,
    T,
    mBlocks,
    splits: S,
    grid: [mBlocks, colGroups, S],
    smem: fusedSmemBytes(bits),
    partialBytes: S > 1 ? S * rows * N * 4 : 0,
    counterBytes: S > 1 ? mBlocks * NC * 4 : 0,
  };
}

/** Columns of 32 outputs per chunk of the prefill path. */
export function dequantChunkCols(K: number, N: number): number {
  return Math.max(1, Math.min(N / COL_N, Math.floor(DEQUANT_CHUNK_ELEMS / (COL_N * K))));
}

/** Every kernel name quant_gemm.cu defines that QuantOps launches. */
export function quantKernelNames(): string[] {
  const names: string[] = [];
  for (const b of QUANT_BITS_WITH_KERNELS) {
    for (const t of [1, 2, 4]) names.push(`quant_gemm_b${b}_t${t}`);
    names.push(`quant_dequant_b${b}`);
  }
  names.push("quant_gather_cols");
  return names;
}

const ptr = (p: DevicePtr): KernelArg => ({ ptr: p });
const i32 = (v: number): KernelArg => ({ i32: v });

export class QuantOps {
  readonly #l: Launcher;
  readonly #sm: number;

  constructor(launcher: Launcher, smCount: number) {
    this.#l = launcher;
    this.#sm = Math.max(1, smCount);
  }

  get smCount(): number {
    return this.#sm;
  }

  plan(w: DeviceQuantWeight, rows: number, splits?: number | null): FusedPlan {
    return fusedPlan(w.bits, w.K, w.N, rows, this.#sm, splits);
  }

  /**
   * out f32 [rows, N] = x bf16 [rows, K] @ W^T (+ bias f32 [N]); x already in the weight's
   * k order (gathered for act-order). `live`: device i32 of the live rows (0n: all).
   * partials / counters: at least the plan's bytes (unused when it has one split).
   */
  fused(out: DevicePtr, x: DevicePtr, live: DevicePtr, rows: number, w: DeviceQuantWeight, bias: DevicePtr, partials: DevicePtr,
        counters: DevicePtr, plan: FusedPlan = this.plan(w, rows)): void {
    if (rows === 0) return;
    this.#l.launch(plan.kernel, plan.grid, [32 * WARPS, 1, 1], plan.smem, [
      ptr(out), ptr(x), ptr(w.words), ptr(w.scales), ptr(w.zeros), ptr(bias), ptr(partials), ptr(counters), ptr(live),
      i32(rows), i32(w.K), i32(w.N), i32(w.groupSize), i32(w.groups), i32(plan.splits), i32(w.symZero),
    ]);
  }

  /** dst bf16 [ncols*32, K] = the weight's outputs [col0*32, (col0+ncols)*32), in its k order. */
  dequant(dst: DevicePtr, w: DeviceQuantWeight, col0: number, ncols: number): void {
    if (ncols <= 0) return;
    this.#l.launch(`quant_dequant_b${w.bits}`, [Math.ceil(w.K / UNIT_K), Math.ceil(ncols / WARPS), 1], [32 * WARPS, 1, 1], 0, [
      ptr(dst), ptr(w.words), ptr(w.scales), ptr(w.zeros), i32(w.K), i32(w.N), i32(w.groupSize), i32(w.groups), i32(w.symZero),
      i32(col0), i32(ncols),
    ]);
  }

  /** xp bf16 [rows, K] = x's columns in the weight's k order (xp[:, i] = x[:, perm[i]]). */
  gather(xp: DevicePtr, x: Operand, rows: number, w: DeviceQuantWeight): void {
    if (rows === 0 || w.perm === 0n) return;
    this.#l.launch("quant_gather_cols", [rows, Math.ceil(w.K / (8 * 256)), 1], [256, 1, 1], 0, [
      ptr(xp), ptr(x.ptr), ptr(w.perm), i32(rows), i32(w.K),
    ]);
  }
}
