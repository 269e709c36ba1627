// Launches of kernels/quant_gemm.cu (the low-bit GEMM for GPTQ weights) through the
// Launcher seam, and the launch plans the backend sizes its scratch from. No FFI here.
//
// Paths of `linearQuantized` (CudaBackend picks by the launch's row count, a capacity):
//   rows <= fusedMaxRows (default 128, INLAID_QUANT_FUSED_MAX_ROWS): quant_gemm_b{B}_t{T}_c{S}, the
//     fused kernel. T = 1, 2, 4 token tiles of 8 rows for up to 8, 16, 32 rows; more rows run
//     m-blocks of 32 (the same weights re-read, mostly from L2, by the m-blocks of a column,
//     which the grid launches next to each other). Up to 8 rows, with INLAID_QGEMM_KSPLIT, also
//     quant_gemm_k_b{B}_d{D}: the same math with K split across one CTA's warps (kSplitLaunch).
//   more rows: per chunk of columns, quant_dequant_b{B} expands the weights to bf16 in a
//     scratch buffer and cuBLASLt multiplies (the GEMM is compute-bound there).
// Act-order weights first gather x's columns into the kernel's k order (quant_gather_cols).
//
// The fused kernel's launch: grid (m-blocks, ceil(N / 32 / warps), splits), 32 x warps
// threads (warps = 4 or 8 columns of 32 outputs per CTA, sharing one x tile in shared
// memory), kernel quant_gemm_b{B}_t{T}_c{splits} (4-bit, T = 4, 4 warps:
// quant_gemm_b4_t4_w4_c{splits}, launch bounds for three CTAs per SM): with splits > 1 the k
// splits of a column tile are one thread-block cluster and meet in its distributed shared
// memory (no global scratch). Every launch parameter depends on the weight's shape and the launch's row
// capacity only, so a captured graph replays any step of its bucket. fusedPlan says how the
// warps and splits are chosen; CudaBackend.quantSplits (INLAID_QGEMM_SPLITS),
// INLAID_QGEMM_WARPS and INLAID_QGEMM_TILES (token tiles per m-block) fix them, for tuning
// with bench/quant_gemm.ts --sweep.

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
/** Warps per CTA of the dequant kernel. */
const DEQUANT_WARPS = 4;
/** Warps (32-output columns) per CTA the fused kernel may be launched with. */
export const FUSED_WARPS: readonly number[] = [8, 4];
/** K splits (cluster sizes) the fused kernel is instantiated for (quant_gemm.cu QGEMM_SPLIT). */
export const FUSED_SPLITS: readonly number[] = [1, 2, 4, 8];
/**
 * Share of the resident CTA slots a plan may fill. A cluster's CTAs must share a GPC, so
 * GPCs whose slots are not a multiple of the cluster size strand a few slots: a grid that
 * needs all of them runs a second wave (measured on the H100: 384 CTAs in clusters of 4 at
 * 3 per SM, 396 slots, ran slower than 192 CTAs).
 */
const RESIDENT_SHARE = 0.9;
/** Elements of one bf16 chunk of the prefill path (32 MiB). */
export const DEQUANT_CHUNK_ELEMS = 16 << 20;
/** Shared memory of one SM and what the driver reserves per CTA (sm_90). */
const SM_SMEM = 228 * 1024, CTA_RESERVED_SMEM = 1024;
/** The ring's budget per CTA (quant_gemm.cu kRingBudget): two 8-warp CTAs per SM. */
const RING_BUDGET = 112 * 1024;

/** Token tiles of 8 rows the fused kernel runs per m-block. */
export function tokenTiles(rows: number): 1 | 2 | 4 {
  return rows <= 8 ? 1 : rows <= 16 ? 2 : 4;
}

/**
 * 8-warp CTAs per SM the registers allow: quant_gemm.cu's __launch_bounds__(256, MINB), MINB 3
 * for one token tile (80 registers), 2 for two and four (128).
 */
function minCtas(T: number): number {
  return T === 1 ? 3 : 2;
}

/** Bytes of one ring stage of the fused kernel: per warp B x 512 of words + 384 of scales and zeros, then the x tile. */
function stageBytes(bits: QuantBits, T: number, warps: number): number {
  return warps * (bits * 512 + 384) + 2048 * T;
}

/** Ring stages of quant_gemm_b{B}_t{T} (quant_gemm.cu QCfg::kRing): 3, or 2 where three 8-warp stages pass the budget. */
export function ringSlots(bits: QuantBits, T: number): number {
  return Math.floor(RING_BUDGET / stageBytes(bits, T, 8)) >= 3 ? 3 : 2;
}

/**
 * Dynamic shared memory of a fused launch: the ring (the split partials reuse it: NW x 32 x 8T
 * f32, and a LoRA shrink CTA's one more tile of sums, always smaller).
 */
export function fusedSmemBytes(bits: QuantBits, T: number, warps: number): number {
  return Math.max(ringSlots(bits, T) * stageBytes(bits, T, warps), (warps + 1) * 32 * 8 * T * 4);
}

/** Bytes of A one unit of a LoRA shrink CTA stages (32 rows x 128 k, bf16). */
const SHRINK_UNIT_BYTES = 32 * 128 * 2;

/**
 * Whether a launch can carry the LoRA shrink (quant_gemm_lora_*): a shrink CTA stages a unit of
 * A where the quantized CTAs stage their warps' codes, so those must take at least as many
 * bytes (not so for 2 and 3 bits at 4 warps).
 */
export function fusedCarriesShrink(bits: QuantBits, warps: number): boolean {
  return warps * (bits * 512 + 384) >= SHRINK_UNIT_BYTES;
}

/** The LoRA shrink a fused launch also makes: t f32 [rows, ldT] = x @ a^T for a bf16 [cols, K] (row-major). */
export interface FusedShrink {
  readonly a: DevicePtr;
  readonly t: DevicePtr;
  readonly cols: number;
  readonly ldT: number;
}

/**
 * Whether a launch runs quant_gemm_b4_t4_w4_* (quant_gemm.cu): 4-bit, four token tiles, 4 warps.
 * Those kernels have launch bounds for three 4-warp CTAs per SM (up to 168 registers) where the
 * 8-warp-bounds kernels cap four tiles at 128 registers (all used; _c2 and _c4 spill 8 bytes);
 * measured faster end to end (the 4-bit decode step 5.88 against 6.38 ms, H100, session 10).
 */
function b4t4FourWarps(bits: QuantBits, T: number, warps: number): boolean {
  return bits === 4 && T === 4 && warps === 4;
}

/**
 * CTAs of a fused launch resident on one SM: the registers' limit (minCtas 8-warp CTAs, twice
 * as many of 4 warps; three for quant_gemm_b4_t4_w4_*) or what shared memory holds, whichever
 * is fewer.
 */
export function ctasPerSm(bits: QuantBits, T: number, warps: number): number {
  const regs = b4t4FourWarps(bits, T, warps) ? 3 : (minCtas(T) * 8) / warps;
  return Math.min(regs, Math.floor(SM_SMEM / (fusedSmemBytes(bits, T, warps) + CTA_RESERVED_SMEM)));
}

export interface FusedPlan {
  readonly kernel: string;
  readonly T: 1 | 2 | 4;
  readonly mBlocks: number;
  /** Warps (32-output columns) per CTA. */
  readonly warps: number;
  /** K splits = CTAs per cluster along z. */
  readonly splits: number;
  readonly grid: Dim3;
  readonly block: Dim3;
  readonly smem: number;
  /** Global scratch a launch needs: none (the splits meet in the cluster); kept at 0 for CudaBackend's sizing. */
  readonly partialBytes: 0;
  readonly counterBytes: 0;
  /** quant_gemm_k_*: K split across the CTA's warps (kSplitLaunch); its register depth in units. */
  readonly kDepth?: number;
}

/** A positive integer from the environment, or null (unset, empty or not a positive integer). */
function positiveEnv(name: string): number | null {
  const v = process.env[name];
  if (v === undefined || v === "") return null;
  const n = Number(v);
  return Number.isInteger(n) && n >= 1 ? n : null;
}

/** INLAID_QGEMM_SPLITS as a split count, or null. */
export function splitsFromEnv(): number | null {
  return positiveEnv("INLAID_QGEMM_SPLITS");
}

/** The largest instantiated split count <= n (and <= the k units). */
function splitsAtMost(n: number, units: number): number {
  let best = 1;
  for (const s of FUSED_SPLITS) if (s <= n && s <= units) best = s;
  return best;
}

/**
 * The fused kernel's launch for `rows` rows (a capacity) of a K x N weight. `splits` (or
 * INLAID_QGEMM_SPLITS) fixes the k splits and INLAID_QGEMM_WARPS the warps per CTA (each
 * rounded to what exists). Otherwise, among the (warps, splits) whose CTAs are all resident
 * at once (with RESIDENT_SHARE's margin): the most CTAs (a warp streams a unit at a time, so
 * more of them in flight, each over fewer units, finish sooner), ties to 8 warps (each x
 * tile feeds 256 outputs). When no grid is resident (many m-blocks of a wide weight): 8
 * warps, no split (the fewest waves). Chosen from bench/quant_gemm.ts --sweep on an H100
 * (4-bit, every Llama-2-7B decode shape at 1, 8 and 32 rows, warps 4/8 x splits 1..8): the
 * rule's pick was the fastest launch with 1, 2, 4 or 8 splits, or within 1% of it. Splits
 * of 3 and 6 (no longer instantiated) won only once, by 6% (down_proj at 32 rows). That sweep
 * ran the previous loop (deeper ring, two 8-warp CTAs per SM). Re-swept with the 3-stage
 * ring (session 5) it was off by up to 6% (K 4096 N 11008 at 1 and 8 rows), so CudaBackend
 * now times fusedCandidates per shape and keeps the fastest; this rule is what it uses while
 * capturing a graph or with tuning off.
 */
export function fusedPlan(bits: QuantBits, K: number, N: number, rows: number, smCount: number, splits?: number | null): FusedPlan {
  const T = tilesFromEnv(rows) ?? tokenTiles(rows);
  const mBlocks = Math.ceil(rows / (8 * T));
  const NC = N / COL_N, units = Math.ceil(K / UNIT_K);
  const fixedWarps = positiveEnv("INLAID_QGEMM_WARPS");
  const fixedSplits = splits ?? splitsFromEnv();
  const warpChoices = fixedWarps !== null ? [fixedWarps >= 8 ? 8 : 4] : FUSED_WARPS;
  const splitChoices = fixedSplits !== null ? [splitsAtMost(fixedSplits, units)] : FUSED_SPLITS.filter((s) => s <= units);
  const options = warpChoices.flatMap((w) => splitChoices.map((s) => ({
    w, s, ctas: mBlocks * Math.ceil(NC / w) * s, resident: Math.floor(RESIDENT_SHARE * smCount * ctasPerSm(bits, T, w)),
  })));
  const fits = options.filter((o) => o.ctas <= o.resident || fixedSplits !== null);
  const chosen = fits.reduce<(typeof options)[number] | undefined>((best, o) => (best === undefined || o.ctas > best.ctas ? o : best), undefined)
    ?? options[0]!;
  return fusedLaunch(bits, N, rows, chosen.w, chosen.s, T);
}

/** INLAID_QGEMM_TILES as token tiles per m-block for `rows` rows (1, 2 or 4, at most tokenTiles(rows)), or null. */
export function tilesFromEnv(rows: number): 1 | 2 | 4 | null {
  const t = positiveEnv("INLAID_QGEMM_TILES");
  if (t === null) return null;
  return Math.min(t >= 4 ? 4 : t >= 2 ? 2 : 1, tokenTiles(rows)) as 1 | 2 | 4;
}

/**
 * The fused kernel's launch with `warps` warps per CTA, `splits` k splits and T token tiles
 * per m-block (all instantiated values; T defaults to tokenTiles(rows), fewer tiles run more
 * m-blocks over the same weights).
 */
export function fusedLaunch(bits: QuantBits, N: number, rows: number, warps: number, splits: number, T: 1 | 2 | 4 = tokenTiles(rows)): FusedPlan {
  const mBlocks = Math.ceil(rows / (8 * T));
  return {
    kernel: `quant_gemm_b${bits}_t${T}${b4t4FourWarps(bits, T, warps) ? "_w4" : ""}_c${splits}`,
    T,
    mBlocks,
    warps,
    splits,
    grid: [mBlocks, Math.ceil(N / COL_N / warps), splits],
    block: [32 * warps, 1, 1],
    smem: fusedSmemBytes(bits, T, warps),
    partialBytes: 0,
    counterBytes: 0,
  };
}

/**
 * Every (warps, splits) launch of the fused kernel for these rows: what CudaBackend times when
 * it tunes a shape. (Fewer token tiles per m-block, INLAID_QGEMM_TILES, were slower at 32 rows
 * on an H100 for every warps x splits launch: up_proj best 26.6 µs with m-blocks of 16 rows
 * and 39.3 µs with 8, against 21.3 µs in one m-block of 32.)
 */
export function fusedCandidates(bits: QuantBits, K: number, N: number, rows: number): FusedPlan[] {
  const units = Math.ceil(K / UNIT_K);
  return FUSED_WARPS.flatMap((w) => FUSED_SPLITS.filter((s) => s <= units).map((s) => fusedLaunch(bits, N, rows, w, s)));
}

/**
 * A fused launch as the tuner's choice is reported: "w{warps}s{splits}", then "t{T}" where T is
 * not tokenTiles(rows); the K-split kernel's "k{warps}d{depth}".
 */
export function fusedLaunchName(p: FusedPlan, rows: number): string {
  if (p.kDepth !== undefined) return `k${p.warps}d${p.kDepth}`;
  return `w${p.warps}s${p.splits}${p.T === tokenTiles(rows) ? "" : `t${p.T}`}`;
}

/** Warps per CTA the K-split kernel (quant_gemm_k_*) may be launched with (its launch bounds: 512 threads). */
export const KSPLIT_WARPS: readonly number[] = [4, 8, 16];
/** Register depths (units of words per warp) it is instantiated for, by bit width (quant_gemm.cu QGEMMK). */
export const KSPLIT_DEPTHS: Readonly<Record<QuantBits, readonly number[]>> = { 2: [2, 4], 3: [2, 4], 4: [2, 4], 8: [2] };
/** Most dynamic shared memory a K-split launch may take (x of its rows, all of K): two CTAs per SM. */
const KSPLIT_MAX_SMEM = 96 * 1024;

/**
 * INLAID_QGEMM_KSPLIT: whether the tuner also times the K-split kernel's launches where it
 * applies ("tune", the default), times only them there ("only"), or leaves them out ("0").
 * On an H100 the tuner picked it at one row for every Llama-2-7B decode shape (up 14.70 ->
 * 13.08 us, o 9.21 -> 7.18, down 17.58 -> 13.29; docs/performance-log.md, session 13).
 */
export function kSplitMode(): "off" | "tune" | "only" {
  const v = process.env.INLAID_QGEMM_KSPLIT;
  if (v === undefined || v === "" || v === "tune") return "tune";
  if (v === "only") return v;
  if (v === "0" || v === "off") return "off";
  throw new Error(`INLAID_QGEMM_KSPLIT=${v}: expected tune, only or 0`);
}

/** Dynamic shared memory of a K-split launch: x's rows over the padded K (pitch 2 Kpad + 64 bytes), then the warps' sums. */
export function kSplitSmem(K: number, rows: number, warps: number): number {
  return rows * (Math.ceil(K / UNIT_K) * 256 + 64) + warps * 32 * 8 * 4;
}

/**
 * Whether quant_gemm_k_* can run a launch: up to 8 rows (one token tile), every unit of 128 k in
 * one group (a group size that is a multiple of 128, or one group) so a unit's scale and zeros
 * ride with its words, and x's rows within KSPLIT_MAX_SMEM at the fewest warps.
 */
export function kSplitApplies(w: { readonly K: number; readonly groupSize: number; readonly groups: number }, rows: number): boolean {
  return rows >= 1 && rows <= 8 && (w.groups === 1 || w.groupSize % UNIT_K === 0) && kSplitSmem(w.K, rows, KSPLIT_WARPS[0]!) <= KSPLIT_MAX_SMEM;
}

/** quant_gemm_k_b{B}_d{depth}'s launch (kernels/quant_gemm.cu quant_gemm_k): grid (1, N / 32, 1), one column of 32 outputs per CTA. */
export function kSplitLaunch(bits: QuantBits, K: number, N: number, rows: number, warps: number, depth: number): FusedPlan {
  if (!KSPLIT_WARPS.includes(warps) || !KSPLIT_DEPTHS[bits].includes(depth)) {
    throw new Error(`quant_gemm_k: no ${bits}-bit kernel of depth ${depth} at ${warps} warps (warps ${KSPLIT_WARPS.join("/")}, depths ${KSPLIT_DEPTHS[bits].join("/")})`);
  }
  if (rows < 1 || rows > 8) throw new Error(`quant_gemm_k: ${rows} rows (one token tile: 1 to 8)`);
  return {
    kernel: `quant_gemm_k_b${bits}_d${depth}`,
    T: 1,
    mBlocks: 1,
    warps,
    splits: 1,
    grid: [1, N / COL_N, 1],
    block: [32 * warps, 1, 1],
    smem: kSplitSmem(K, rows, warps),
    partialBytes: 0,
    counterBytes: 0,
    kDepth: depth,
  };
}

/** quant_gemm_k_*'s launches the tuner times (kSplitApplies first): every warps x depth within the shared-memory cap. */
export function kSplitCandidates(bits: QuantBits, K: number, N: number, rows: number): FusedPlan[] {
  return KSPLIT_WARPS.filter((w) => kSplitSmem(K, rows, w) <= KSPLIT_MAX_SMEM)
    .flatMap((w) => KSPLIT_DEPTHS[bits].map((d) => kSplitLaunch(bits, K, N, rows, w, d)));
}

/** Columns of 32 outputs per chunk of the prefill path. */
export function dequantChunkCols(K: number, N: number): number {
  return Math.max(1, Math.min(N / COL_N, Math.floor(DEQUANT_CHUNK_ELEMS / (COL_N * K))));
}

/** Every kernel name quant_gemm.cu defines that QuantOps launches. */
export function quantKernelNames(): string[] {
  const names: string[] = [];
  for (const b of QUANT_BITS_WITH_KERNELS) {
    for (const t of [1, 2, 4]) for (const c of FUSED_SPLITS) names.push(`quant_gemm_b${b}_t${t}_c${c}`, `quant_gemm_lora_b${b}_t${t}_c${c}`);
    names.push(`quant_dequant_b${b}`);
  }
  for (const c of FUSED_SPLITS) names.push(`quant_gemm_b4_t4_w4_c${c}`, `quant_gemm_lora_b4_t4_w4_c${c}`);
  for (const b of QUANT_BITS_WITH_KERNELS) for (const d of KSPLIT_DEPTHS[b]) names.push(`quant_gemm_k_b${b}_d${d}`);
  names.push("quant_gather_cols");
  return names;
}

const ptr = (p: DevicePtr): KernelArg => ({ ptr: p });
const i32 = (v: number): KernelArg => ({ i32: v });
/** The arguments every quant_gemm*_b* kernel starts with (quant_gemm.cu's kernel macros). */
const gemmArgs = (out: DevicePtr, x: DevicePtr, live: DevicePtr, rows: number, w: DeviceQuantWeight, bias: DevicePtr): KernelArg[] => [
  ptr(out), ptr(x), ptr(w.words), ptr(w.scales), ptr(w.zeros), ptr(bias), ptr(live),
  i32(rows), i32(w.K), i32(w.N), i32(w.groupSize), i32(w.groups), i32(w.symZero),
];

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
   * `_partials` / `_counters`: unused (the splits meet in the cluster; the plan asks for 0 bytes).
   * With `shrink` (no act-order: x and A share the original k order; fusedCarriesShrink), the
   * launch also writes the LoRA shrink: quant_gemm_lora_*, ceil(cols / 32) more CTAs along y.
   */
  fused(out: DevicePtr, x: DevicePtr, live: DevicePtr, rows: number, w: DeviceQuantWeight, bias: DevicePtr, _partials: DevicePtr,
        _counters: DevicePtr, plan: FusedPlan = this.plan(w, rows), shrink?: FusedShrink): void {
    if (rows === 0) return;
    const args = gemmArgs(out, x, live, rows, w, bias);
    if (plan.kDepth !== undefined && shrink && shrink.cols > 0) throw new Error("fused LoRA shrink: quant_gemm_k_* does not carry it (launch a quant_gemm_* plan)");
    if (!shrink || shrink.cols === 0) {
      this.#l.launch(plan.kernel, plan.grid, plan.block, plan.smem, args);
      return;
    }
    if (w.perm !== 0n) throw new Error("fused LoRA shrink: act-order weights read x in another k order than A");
    if (!fusedCarriesShrink(w.bits, plan.warps)) throw new Error(`fused LoRA shrink: ${plan.warps} warps of ${w.bits}-bit codes stage fewer bytes than a unit of A`);
    if (shrink.ldT < shrink.cols) throw new Error(`fused LoRA shrink: ldT ${shrink.ldT} < ${shrink.cols} columns`);
    const [gx, gy, gz] = plan.grid;
    this.#l.launch(plan.kernel.replace("quant_gemm_", "quant_gemm_lora_"), [gx, gy + Math.ceil(shrink.cols / COL_N), gz], plan.block, plan.smem, [
      ...args, ptr(shrink.a), ptr(shrink.t), i32(shrink.cols), i32(shrink.ldT),
    ]);
  }

  /** dst bf16 [ncols*32, K] = the weight's outputs [col0*32, (col0+ncols)*32), in its k order. */
  dequant(dst: DevicePtr, w: DeviceQuantWeight, col0: number, ncols: number): void {
    if (ncols <= 0) return;
    this.#l.launch(`quant_dequant_b${w.bits}`, [Math.ceil(w.K / UNIT_K), Math.ceil(ncols / DEQUANT_WARPS), 1], [32 * DEQUANT_WARPS, 1, 1], 0, [
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
