// The kernels' side of the Launcher seam: one method per Backend op (DeviceOps,
// device_ops.ts), each checking shapes, choosing grid / block / shared memory, and
// launching the kernels of kernels/*.cu by name. No FFI here; the driver layer compiles
// KERNEL_FILES with NVRTC and implements Launcher.
//
// Dtypes (backend.ts: matmul inputs are stored in the activation dtype, bf16 here; matmul
// outputs, the residual stream and logits are f32). Each op has exactly one dtype form:
//   embedding   out f32            <- table bf16
//   rmsnorm     out bf16           <- x f32, w bf16
//   addRmsnorm  out bf16, residual f32 (in place) <- x f32, w bf16
//   lora        out f32 (+=)       <- x bf16 (A, B bf16; shrink scratch f32)
//   rope        q f32, k f32 (in place)
//   attention   out bf16           <- q, k, v f32 (K/V cache bf16)
//   siluMul     out bf16           <- gate, up f32
//   gatherRows  out bf16           <- x bf16
//   sample      logits f32
// (`linear` is cuBLASLt's: x, w bf16 -> out f32 or bf16, bias of out's dtype.)
//
// Graph safety: every launch parameter is a function of capacities (Operand.rowsCap,
// StepRun.padSeqs, stack and model dims), never of live counts; kernels read the live
// counts from device memory (Operand.liveRows, DeviceStep.counts =
// [numTokens, numSeqs, numSample, padTokens]) and skip rows / sequences past them.
//
// Batch invariance: a sequence's attention and LoRA results depend only on the sequence
// itself. Decode rows (a sequence with one query row) and prefill rows (more) take fixed
// kernel paths, and the flash-decoding split depends only on the context length.
//
// Optional inputs the driver layer may add (each has a correct fallback):
// - StepRun.hasPrefill / hasDecode (StepKinds): host facts about the step; a false one
//   skips the launches that would find nothing to do (decode-only graphs then carry no
//   prefill attention / SGMV nodes). Absent: both paths launch and sort rows on the device.
// - attention's `scratch` (attentionScratchBytes): f32 room for split decode partials and
//   their arrival counters. Absent or too small: every decode context runs in one pass per
//   warp (slower for long contexts). Keep it the same for the life of a deployment: it
//   decides the split.

import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { DeviceKv, DeviceLora, DeviceOps, Operand, SampleOutputs, Scratch, StepRun } from "./device_ops.js";
import type { DevicePtr, Dim3, KernelArg, Launcher } from "./launch.js";
import { uniform } from "../rng.js";
import { quantKernelNames } from "./quant_ops.js";

// ------------------------------------------------------------------ files and names

// gptq.cu is launched by gptq_ops.ts (the GPTQ solver, quant/gpu_gptq_cuda.ts), not by CudaOps.
const FILES = ["activation.cu", "attention.cu", "embedding.cu", "gptq.cu", "lora.cu", "norm.cu", "quant_gemm.cu", "rope.cu", "sample.cu", "step.cu", "utility.cu"] as const;

/** The kernels folder: beside this module in the source tree; from dist/, the source tree's. */
function kernelsFolder(): string {
  const here = fileURLToPath(new URL("./kernels/", import.meta.url));
  const fromDist = fileURLToPath(new URL("../../../src/backend/cuda/kernels/", import.meta.url));
  return existsSync(here) || !existsSync(fromDist) ? here : fromDist;
}

/** Absolute paths of the .cu files the driver layer compiles (kernels/common.cuh is their shared header). */
export const KERNEL_FILES: string[] = FILES.map((f) => kernelsFolder() + f);

/** Head dims with attention kernels (attn_*_d{D}); each must be a multiple of 16. */
export const SUPPORTED_HEAD_DIMS: readonly number[] = [32, 64, 80, 96, 128];

/**
 * Kernels that call pdl_wait() before anything else that could depend on the kernel
 * before them (kernels/common.cuh says the rules; a CPU test checks the sources): on
 * sm_90+ the backend launches them with programmatic dependent launch, so each may
 * start while its predecessor finishes (INLAID_PDL=0 turns it off).
 */
export const PDL_KERNELS: ReadonlySet<string> = new Set([
  "embedding_bf16_f32", "gather_rows_bf16", "rmsnorm_f32_bf16", "add_rmsnorm_f32_bf16", "rope_qkv_f32",
  "kv_cache_write_f32", "silu_mul_f32_bf16", "sample_rows",
  ...[32, 64, 80, 96, 128].flatMap((d) => [`attn_prefill_d${d}`, `attn_decode_d${d}`]),
  "lora_bgmv_fused", "lora_bgmv_shrink", "lora_bgmv_expand", "lora_bgmv_expand_slots", "lora_sgmv_expand",
  ...[16, 32, 64].map((r) => `lora_sgmv_shrink_r${r}`),
  // The fused low-bit GEMMs request their first units of weights before the wait.
  ...quantKernelNames().filter((n) => n.startsWith("quant_gemm_")),
]);

/**
 * PDL kernels that, captured right after a cuBLASLt GEMM, hang off its launch-order port
 * (launcher.ts, INLAID_GEMM_EARLY=0 turns it off): those whose pre-wait work is worth
 * overlapping with the GEMM. The all-slots expand loads its rows' slots and B (4 MiB at 32
 * rows x 32 adapters of rank 16 on the o projection) before its wait. H100, session 14:
 * bench/kernels.ts o at 32 rows x 32 adapters 5.95 -> 4.62 us of LoRA time over the GEMM.
 * End to end not settled (docs/performance-log.md, session 14): the bf16 Llama-2-7B decode
 * step with 8 adapters 7.679 -> 7.431 ms together with one expand output per thread, 7.507 ->
 * 7.615 ms alone in a command whose host time differed 72 us between the two runs. With every
 * PDL kernel after a GEMM hung there (rope, add + RMSNorm, silu-mul too), the step without
 * adapters measured slower (6.889 -> 7.108 ms), so the others keep their usual launch.
 */
export const EARLY_AFTER_LIBRARY: ReadonlySet<string> = new Set(["lora_bgmv_expand_slots"]);

/**
 * Outputs per thread of lora_bgmv_expand_slots (kernels/lora.cu kExpandPer): 1, or 2 / 4 with
 * INLAID_EXPAND_PER (cuda_backend.ts compiles the kernel to match). H100, session 14,
 * bench/kernels.ts, o at 32 rows x 32 adapters: the LoRA time over the GEMM 4.62 us at one
 * output per thread against 4.90 / 4.91 at four (both with the expand on the GEMM's
 * launch-order port), 5.95 / 5.96 against 5.84-6.26 without.
 */
export function expandPerThread(): 1 | 2 | 4 {
  const v = process.env.INLAID_EXPAND_PER;
  if (v === undefined || v === "" || v === "1") return 1;
  if (v === "2" || v === "4") return Number(v) as 2 | 4;
  throw new Error(`INLAID_EXPAND_PER=${v}: expected 1, 2 or 4`);
}

/** Most heads sharing one KV head in the prefill kernel (its 64-row tile holds at least one token). */
export const MAX_GQA_GROUP = 64;

/** Most sequence slots (StepRun.padSeqs) the attention kernels take. */
export const MAX_SEQS = 2048;

/**
 * Flash-decoding: most chunks per sequence, and the chunk length below which a context is
 * not split further (kernels/attention.cu decode_split; INLAID_DECODE_MIN_CHUNK overrides
 * it for experiments). Chosen with the previous decode kernel on an H100 (32 MHA sequences
 * of 192 keys: 256-key chunks 67 us, 128 88 us, 64 97 us); not yet re-measured with the
 * per-warp pipelined kernel, whose per-item cost is lower.
 */
export const DECODE_MAX_SPLITS = 16;
export const DECODE_MIN_CHUNK = Number(process.env.INLAID_DECODE_MIN_CHUNK ?? 256);

/**
 * Decode kernel geometry (kernels/attention.cu, "Decode"): 4 warps per CTA, each an
 * independent worker with a 3-stage ring of 16-key K and V tiles; an item covers up to 8
 * query heads of one KV head.
 */
const DECODE_WARPS = 4;
const DECODE_HEADS_PER_ITEM = 8;
/** Shared memory per SM the decode grid is sized for (H100: 228 KB; 1 KB of it is reserved per CTA). */
const DECODE_SMEM_PER_SM = 228 * 1024;
/** Most CTAs per SM the decode kernel's registers allow (its __launch_bounds__, kDecodeMinBlocks). */
const decodeMaxCtasPerSm = (headDim: number): number => (headDim <= 64 ? 4 : headDim <= 80 ? 3 : 2);

/** Dynamic shared memory of attn_decode_d{D}: the warps' rings, then 3 ints per sequence slot (+1). */
export function decodeSmemBytes(headDim: number, seqCap: number): number {
  const ring = DECODE_WARPS * 3 * 2 * 16 * (headDim + 8) * 2;
  return ring + 4 * (3 * seqCap + 1);
}

/** Query-head groups of the decode kernel: items per (sequence, chunk). */
const decodeGroups = (numHeads: number, numKvHeads: number): number =>
  numKvHeads * Math.ceil(numHeads / numKvHeads / DECODE_HEADS_PER_ITEM);

/** Every kernel name ops.ts may launch (a CPU test checks each is defined in the .cu sources). */
export function kernelNames(): string[] {
  const attn = SUPPORTED_HEAD_DIMS.flatMap((d) => [`attn_prefill_d${d}`, `attn_decode_d${d}`]);
  return [
    "embedding_bf16_f32", "gather_rows_bf16", "rmsnorm_f32_bf16", "add_rmsnorm_f32_bf16", "rope_qkv_f32", "silu_mul_f32_bf16",
    "kv_cache_write_f32", ...attn,
    "lora_bgmv_fused", "lora_bgmv_shrink", "lora_bgmv_expand", "lora_bgmv_expand_slots", "lora_sgmv_shrink_r16", "lora_sgmv_shrink_r32", "lora_sgmv_shrink_r64", "lora_sgmv_expand",
    "sample_rows", "advance_decode_step",
    "convert_f32_to_bf16", "convert_bf16_to_f32", "convert_f16_to_bf16", "convert_f16_to_f32", "fill_u32", "fill_u16",
    "fill_random_bf16", "fill_random_f32",
    ...quantKernelNames(), // launched by quant_ops.ts (CudaBackend.linearQuantized)
  ];
}

// ------------------------------------------------------------------ host mirrors of kernel math

/** How the decode kernel splits a context of `ctx` keys (kernels/attention.cu decode_split). */
export function decodeSplit(ctx: number, maxSplits = DECODE_MAX_SPLITS, minChunk = DECODE_MIN_CHUNK): { chunks: number; chunkLen: number } {
  let n = Math.ceil(ctx / minChunk);
  n = Math.max(1, Math.min(maxSplits, n));
  const per = Math.ceil(Math.ceil(ctx / n) / 64) * 64;
  return { chunks: Math.max(1, Math.ceil(ctx / per)), chunkLen: per };
}

/**
 * Bytes of the split-decode scratch for `seqs` sequence slots (StepRun.padSeqs at most):
 * f32 partial outputs [seqs, MAX_SPLITS, nH, D], their (max, sum) [seqs, MAX_SPLITS, nH, 2],
 * then i32 arrival counters [seqs, nH] (one per (sequence, head group); groups <= nH).
 */
export function attentionScratchBytes(seqs: number, numHeads: number, headDim: number): number {
  return seqs * (DECODE_MAX_SPLITS * numHeads * (headDim + 2) + numHeads) * 4;
}

/** Byte offset of the arrival counters in the split-decode scratch (see attentionScratchBytes). */
export function decodeCounterOffset(seqs: number, numHeads: number, headDim: number): number {
  return seqs * DECODE_MAX_SPLITS * numHeads * (headDim + 2) * 4;
}

/** The value fill_random_* writes at element i (before the bf16 rounding): the CPU backend's fillRandom. */
export function dummyWeightValue(seed: number, i: number, std: number): number {
  return Math.fround(std * Math.sqrt(3) * (2 * uniform(seed, i) - 1));
}

// ------------------------------------------------------------------ errors and helpers

/** A shape or dtype the kernels do not handle; `limit` names what was exceeded. */
export class CudaOpsError extends Error {
  constructor(readonly op: string, readonly limit: string, message: string) {
    super(`${op}: ${message}`);
    this.name = "CudaOpsError";
  }
}

/** Host facts about a step the driver layer may add to StepRun (see the header). */
export interface StepKinds {
  /** Some sequence has more than one query row this step. */
  readonly hasPrefill?: boolean;
  /** Some sequence has exactly one query row this step. */
  readonly hasDecode?: boolean;
}

export interface DeviceInfo {
  /** Streaming multiprocessors (132 on an H100 SXM): sizes the persistent decode grid. */
  readonly smCount: number;
  /** Thread-block clusters (sm_90+): decode LoRA runs as one clustered kernel (kernels/lora.cu). */
  readonly clusters?: boolean;
}

/** Most rank the clustered decode LoRA kernel takes (kernels/lora.cu kFusedMaxRank). */
export const FUSED_LORA_MAX_RANK = 64;
/** Most output splits (members of a fused linear) a LoRA stack may have (kernels/lora.cu kMaxSplits). */
export const MAX_LORA_SPLITS = 4;
/**
 * Most shrink columns (numSlots x splits x maxRank) for which decode-only steps compute the
 * shrink for every slot in one GEMM (loraSlotsPath): past it the GEMM's extra bytes of A
 * outgrow what the per-row kernel reads.
 */
export const LORA_SLOTS_MAX_COLS = 1024;

const ptr = (p: DevicePtr): KernelArg => ({ ptr: p });
const i32 = (v: number): KernelArg => ({ i32: v });
const u32 = (v: number): KernelArg => ({ u32: v >>> 0 });
const f32 = (v: number): KernelArg => ({ f32: v });
const cdiv = (a: number, b: number): number => Math.ceil(a / b);
/** Each split's first output column in a LoRA stack's output. */
const splitStarts = (stack: DeviceLora): number[] => stack.outDims.map((_, j) => stack.outDims.slice(0, j).reduce((a, b) => a + b, 0));
/** The o1, o2, o3 of the LoRA kernels (kernels/lora.cu): splits 1..3's first columns, N past the last split. */
function splitBounds(stack: DeviceLora): [number, number, number] {
  const starts = splitStarts(stack);
  const at = (j: number): number => (j < starts.length ? starts[j]! : stack.outDim);
  return [at(1), at(2), at(3)];
}
/** splitBounds as kernel arguments. */
const splitBoundArgs = (stack: DeviceLora): KernelArg[] => splitBounds(stack).map(i32);
/** Threads for `work` items: a multiple of 32 in [32, max]. */
const threadsFor = (work: number, max: number): number => Math.min(max, Math.max(32, Math.ceil(work / 32) * 32));

function need(cond: boolean, op: string, limit: string, message: string): asserts cond {
  if (!cond) throw new CudaOpsError(op, limit, message);
}

function dtype(op: string, name: string, t: Operand, want: Operand["dtype"]): void {
  need(t.dtype === want, op, "dtype", `${name} must be ${want} (got ${t.dtype})`);
}

function vec8(op: string, what: string, n: number): void {
  need(n % 8 === 0, op, "multiple of 8", `${what} = ${n} must be a multiple of 8 (16-byte vectors)`);
}

// ------------------------------------------------------------------ the ops

export class CudaOps implements DeviceOps {
  readonly #l: Launcher;
  readonly #sm: number;
  readonly #clusters: boolean;
  /** Read once, as cuda_backend.ts does when it compiles lora.cu, so the grid matches the kernel. */
  readonly #expandPer = expandPerThread();

  constructor(launcher: Launcher, device: DeviceInfo = { smCount: 132 }) {
    this.#l = launcher;
    this.#sm = Math.max(1, device.smCount);
    this.#clusters = device.clusters === true;
  }

  #launch(name: string, grid: Dim3, block: Dim3, smem: number, args: KernelArg[]): void {
    if (grid[0] === 0 || grid[1] === 0 || grid[2] === 0) return;
    this.#l.launch(name, grid, block, smem, args);
  }

  /** out f32 [cap, H] = table bf16 [V, H] rows by the step's token ids; padded rows become zeros. */
  embedding(out: Operand, table: Operand, run: StepRun): void {
    const op = "embedding";
    dtype(op, "out", out, "f32");
    dtype(op, "table", table, "bf16");
    need(out.cols === table.cols, op, "shape", `out has ${out.cols} columns, the table ${table.cols}`);
    vec8(op, "hidden size", out.cols);
    // One CTA per row; each thread moves 8 elements (16 bytes in, 32 out) per step.
    this.#launch("embedding_bf16_f32", [out.rowsCap, 1, 1], [threadsFor(out.cols / 8, 256), 1, 1], 0, [
      ptr(out.ptr), ptr(table.ptr), ptr(run.step.tokenIds), ptr(out.liveRows), i32(out.rowsCap), i32(out.cols), i32(table.rowsCap),
    ]);
  }

  /** out bf16 = rmsnorm(x f32) * w. */
  rmsnorm(out: Operand, x: Operand, w: Operand, eps: number): void {
    const op = "rmsnorm";
    this.#normChecks(op, out, x, w);
    dtype(op, "x", x, "f32");
    const rows = Math.min(out.rowsCap, x.rowsCap);
    // One CTA per row, one 16-byte chunk of 8 elements per thread (H = 4096: 512 threads),
    // so the row is read once from memory and once more from L1 for the scaling pass.
    this.#launch("rmsnorm_f32_bf16", [rows, 1, 1], [threadsFor(x.cols / 8, 1024), 1, 1], 0, [
      ptr(out.ptr), ptr(x.ptr), ptr(w.ptr), ptr(x.liveRows), i32(rows), i32(x.cols), f32(eps),
    ]);
  }

  /** residual f32 += x f32; out bf16 = rmsnorm(residual) * w. */
  addRmsnorm(out: Operand, residual: Operand, x: Operand, w: Operand, eps: number): void {
    const op = "addRmsnorm";
    this.#normChecks(op, out, residual, w);
    dtype(op, "residual", residual, "f32");
    dtype(op, "x", x, "f32");
    need(x.cols === residual.cols, op, "shape", `x has ${x.cols} columns, the residual ${residual.cols}`);
    const rows = Math.min(out.rowsCap, residual.rowsCap, x.rowsCap);
    // As rmsnorm: one CTA per row, one 8-element chunk per thread.
    this.#launch("add_rmsnorm_f32_bf16", [rows, 1, 1], [threadsFor(x.cols / 8, 1024), 1, 1], 0, [
      ptr(out.ptr), ptr(residual.ptr), ptr(x.ptr), ptr(w.ptr), ptr(residual.liveRows), i32(rows), i32(x.cols), f32(eps),
    ]);
  }

  #normChecks(op: string, out: Operand, x: Operand, w: Operand): void {
    dtype(op, "out", out, "bf16");
    dtype(op, "w", w, "bf16");
    need(out.cols === x.cols && w.rowsCap * w.cols === x.cols, op, "shape",
      `out (${out.cols}), input (${x.cols}) and weight (${w.rowsCap * w.cols}) widths differ`);
    vec8(op, "hidden size", x.cols);
  }

  /** Rotary embedding in place on q [cap, nH*D] and k [cap, nKv*D] (f32), rotate-half. */
  rope(q: Operand, k: Operand, v: Operand, qkv: Operand, invFreq: Operand, headDim: number, run: StepRun): void {
    const op = "rope";
    for (const [name, t] of [["q", q], ["k", k], ["v", v], ["qkv", qkv], ["invFreq", invFreq]] as const) dtype(op, name, t, "f32");
    need(headDim % 2 === 0 && headDim / 2 <= 256, op, "head dim", `head dim ${headDim} must be even and at most 512`);
    need(q.cols % headDim === 0 && k.cols % headDim === 0, op, "shape", `q (${q.cols}) and k (${k.cols}) widths must be multiples of the head dim ${headDim}`);
    need(v.cols === k.cols && qkv.cols === q.cols + 2 * k.cols, op, "shape",
      `qkv must be q, k and v side by side: ${q.cols} + 2 x ${k.cols} columns (got v ${v.cols}, qkv ${qkv.cols})`);
    need(invFreq.rowsCap * invFreq.cols === headDim / 2, op, "shape", `invFreq has ${invFreq.rowsCap * invFreq.cols} entries, expected ${headDim / 2}`);
    const nH = q.cols / headDim, nKv = k.cols / headDim;
    const rows = Math.min(q.rowsCap, k.rowsCap, v.rowsCap, qkv.rowsCap);
    // One CTA per token row: the D/2 angles are computed once (f64 sin/cos, as the CPU) into
    // shared memory and reused by all heads; a thread moves 8 pairs (4 float4).
    const items = (nH + 2 * nKv) * ((headDim / 2) % 8 === 0 ? headDim / 16 : headDim / 2);
    this.#launch("rope_qkv_f32", [rows, 1, 1], [threadsFor(items, 256), 1, 1], 0, [
      ptr(q.ptr), ptr(k.ptr), ptr(v.ptr), ptr(qkv.ptr), ptr(invFreq.ptr), ptr(run.step.positions), ptr(q.liveRows),
      i32(rows), i32(nH), i32(nKv), i32(headDim),
    ]);
  }

  /**
   * Writes k, v (f32) into the layer's bf16 cache at the step's slots, then causal GQA
   * attention of q (f32) over each sequence's paged context into out (bf16). `scratch`
   * (optional) enables split decoding.
   */
  attention(out: Operand, q: Operand, k: Operand, v: Operand, kv: DeviceKv, scale: number, run: StepRun, scratch?: Scratch): void {
    const op = "attention";
    dtype(op, "out", out, "bf16");
    for (const [n, t] of [["q", q], ["k", k], ["v", v]] as const) dtype(op, n, t, "f32");
    const D = kv.headDim, nKv = kv.numKvHeads;
    need(SUPPORTED_HEAD_DIMS.includes(D), op, "head dim", `head dim ${D} has no kernel (supported: ${SUPPORTED_HEAD_DIMS.join(", ")})`);
    need(k.cols === nKv * D && v.cols === nKv * D, op, "shape", `k / v must have ${nKv * D} columns (got ${k.cols}, ${v.cols})`);
    need(q.cols % D === 0 && out.cols === q.cols, op, "shape", `q (${q.cols}) and out (${out.cols}) must be the same multiple of the head dim ${D}`);
    const nH = q.cols / D;
    need(nH % nKv === 0, op, "GQA", `${nH} query heads do not divide into ${nKv} KV heads`);
    const G = nH / nKv;
    need(G <= MAX_GQA_GROUP, op, "GQA group", `${G} query heads per KV head > ${MAX_GQA_GROUP}`);
    // kv_cache_write_f32 loads row t of k and v for every t < rows (before it reads the live count).
    const rows = Math.min(q.rowsCap, k.rowsCap, v.rowsCap, out.rowsCap);
    const st = run.step;
    const seqCap = run.padSeqs;
    const kinds = run as StepRun & StepKinds;
    // The per-CTA sequence prefix shares the 48 KB of default shared memory with the tiles.
    need(seqCap <= MAX_SEQS, op, "sequences", `${seqCap} sequence slots > ${MAX_SEQS}`);

    const decode = kinds.hasDecode !== false && seqCap > 0;
    const split = decode && scratch !== undefined && scratch.ptr !== 0n && scratch.bytes >= attentionScratchBytes(seqCap, nH, D);
    const groups = decodeGroups(nH, nKv);
    // K/V rows into the cache: one CTA per token row, 8 elements (f32 in, bf16 out) per
    // thread. Bounded by the step's numTokens (counts[0]), not k's own live count: slots
    // past the step are stale. It also zeroes the split-decode arrival counters (one per
    // (sequence slot, head group)) that attn_decode counts on next.
    const counters = split ? scratch!.ptr + BigInt(decodeCounterOffset(seqCap, nH, D)) : 0n;
    this.#launch("kv_cache_write_f32", [rows, 1, 1], [threadsFor((nKv * D) / 8, 1024), 1, 1], 0, [
      ptr(kv.k), ptr(kv.v), ptr(k.ptr), ptr(v.ptr), ptr(st.slotMapping), ptr(st.counts), i32(rows), i32(nKv * D),
      ptr(counters), i32(split ? seqCap * groups : 0),
    ]);
    if (seqCap === 0) return;
    // Both kernels find their work from the live counts with a per-CTA prefix over the
    // sequences, held in dynamic shared memory: 4 * (seqCap + 1) bytes for prefill.
    const prefixBytes = 4 * (seqCap + 1);
    const common = [ptr(st.queryStart), ptr(st.positions), ptr(st.blockTables), ptr(st.counts), i32(seqCap), i32(st.blocksPerSeq), i32(kv.blockSize), i32(nH), i32(nKv), f32(scale)];

    if (kinds.hasPrefill !== false) {
      // 64-row tiles of (token, head-of-group) pairs, 4 warps: a sequence of q tokens needs
      // ceil(q / TQ) tiles with TQ = floor(64 / G) tokens each, so ceil(rows / TQ) + seqCap
      // bounds the tiles of any step within these capacities (extra CTAs exit at once).
      const TQ = Math.floor(64 / G);
      this.#launch(`attn_prefill_d${D}`, [cdiv(rows, TQ) + seqCap, nKv, 1], [128, 1, 1], prefixBytes, [
        ptr(out.ptr), ptr(q.ptr), ptr(kv.k), ptr(kv.v), ...common,
      ]);
    }
    if (decode) {
      const maxSplits = split ? DECODE_MAX_SPLITS : 1;
      // Persistent grid, one wave: every warp is a worker over items (sequence, chunk, group
      // of up to 8 heads), so the grid is as many CTAs as fit the SMs at once (shared memory:
      // the warps' rings plus the per-sequence tables; registers: the kernel's launch
      // bounds). A CTA that did not fit would run its items late, after a whole wave. Split
      // sequences are merged in the same launch by the warp finishing their last chunk.
      const smem = decodeSmemBytes(D, seqCap);
      const perSm = Math.max(1, Math.min(decodeMaxCtasPerSm(D), Math.floor(DECODE_SMEM_PER_SM / (smem + 128 + 1024))));
      const maxItems = seqCap * groups * maxSplits;
      const grid = Math.max(1, Math.min(this.#sm * perSm, cdiv(maxItems, DECODE_WARPS)));
      this.#launch(`attn_decode_d${D}`, [grid, 1, 1], [32 * DECODE_WARPS, 1, 1], smem, [
        ptr(out.ptr), ptr(split ? scratch!.ptr : 0n), ptr(q.ptr), ptr(kv.k), ptr(kv.v), ...common, i32(maxSplits), i32(DECODE_MIN_CHUNK),
      ]);
    }
  }

  /** Split-decode scratch for `seqs` sequence slots; a smaller (or no) scratch makes decode single-pass. */
  attentionScratchBytes(seqs: number, numHeads: number, headDim: number): number {
    return attentionScratchBytes(seqs, numHeads, headDim);
  }

  /** out bf16 [cap, I] = silu(gate) * up, gate and up f32 [cap, I]. */
  siluMul(out: Operand, gateUp: Operand): void {
    const op = "siluMul";
    dtype(op, "out", out, "bf16");
    dtype(op, "gateUp", gateUp, "f32");
    need(gateUp.cols === 2 * out.cols, op, "shape", `gateUp must have twice out's ${out.cols} columns (got ${gateUp.cols})`);
    const rows = Math.min(out.rowsCap, gateUp.rowsCap);
    // grid (row, column chunk of 256 threads x 8 elements): 8 elements per thread.
    this.#launch("silu_mul_f32_bf16", [rows, cdiv(out.cols, 8 * 256), 1], [256, 1, 1], 0, [
      ptr(out.ptr), ptr(gateUp.ptr), ptr(out.liveRows), i32(rows), i32(out.cols),
    ]);
  }

  /** out[r] = x[sampleRows[r]] for r < numSample (bf16 rows). */
  gatherRows(out: Operand, x: Operand, run: StepRun): void {
    const op = "gatherRows";
    dtype(op, "out", out, "bf16");
    dtype(op, "x", x, "bf16");
    need(out.cols === x.cols, op, "shape", `out has ${out.cols} columns, x ${x.cols}`);
    vec8(op, "width", x.cols);
    // One CTA per sampled row, 16-byte copies; the live count is the step's numSample.
    this.#launch("gather_rows_bf16", [out.rowsCap, 1, 1], [threadsFor(x.cols / 8, 256), 1, 1], 0, [
      ptr(out.ptr), ptr(x.ptr), ptr(run.step.sampleRows), ptr(run.step.counts + 8n), i32(out.rowsCap), i32(x.cols),
    ]);
  }

  /** Whether the step's decode rows take the fused clustered kernel (lora_bgmv_fused). */
  #fusedDecode(stack: DeviceLora, run: StepRun): boolean {
    return (run as StepRun & StepKinds).hasDecode !== false && this.#clusters && stack.maxRank <= FUSED_LORA_MAX_RANK;
  }

  /** The fused decode kernel writes every row itself (lora_bgmv_fused's `write`): decode-only steps. */
  loraWrites(stack: DeviceLora, run: StepRun): boolean {
    return (run as StepRun & StepKinds).hasPrefill === false && this.#fusedDecode(stack, run);
  }

  /**
   * Whether this step's LoRA may run as a shrink GEMM over the A of slots 0..slots-1 (the
   * caller's, into t f32 [rows, ldT]) and loraExpandSlots: decode-only steps whose shrink
   * columns (slots x splits x maxRank) stay within LORA_SLOTS_MAX_COLS, ranks in 8-wide vectors.
   */
  loraSlotsPath(stack: DeviceLora, run: StepRun, slots: number): boolean {
    return (run as StepRun & StepKinds).hasPrefill === false && stack.maxRank % 8 === 0 && slots <= stack.numSlots &&
      stack.outDims.length <= MAX_LORA_SPLITS && slots * stack.outDims.length * stack.maxRank <= LORA_SLOTS_MAX_COLS;
  }

  /** out[i] = base[i] + scale_s * B_s t[i, s] for decode rows with a slot s; t from the all-slots shrink (kernels/lora.cu lora_bgmv_expand_slots). */
  loraExpandSlots(out: Operand, base: Operand, t: DevicePtr, ldT: number, stack: DeviceLora, run: StepRun): void {
    const op = "loraExpandSlots";
    need((run as StepRun & StepKinds).hasPrefill === false && stack.maxRank % 8 === 0, op, "step",
      "only decode-only steps with ranks in 8-wide vectors take the all-slots path (loraSlotsPath)");
    dtype(op, "out", out, "f32");
    dtype(op, "base", base, "f32");
    const N = stack.outDim, R = stack.maxRank, S = stack.outDims.length;
    need(out.cols === N && base.cols >= N, op, "shape", `out must have ${N} columns and base at least that (got ${out.cols}, ${base.cols})`);
    for (const d of stack.outDims) vec8(op, "out split", d);
    vec8(op, "base row", base.cols);
    const rows = Math.min(out.rowsCap, base.rowsCap);
    // ldT covers at least the slots the step's rows use (the caller's GEMM made those).
    need(ldT >= S * R && ldT % 4 === 0, op, "t", `t's row stride ${ldT} must hold a slot's ranks and keep 16-byte rows`);
    // 128 x #expandPer outputs of a row per 128-thread CTA (kernels/lora.cu kExpandPer).
    this.#launch("lora_bgmv_expand_slots", [cdiv(N, 128 * this.#expandPer), rows, 1], [128, 1, 1], 0, [
      ptr(out.ptr), ptr(base.ptr), ptr(t), ptr(stack.b), ptr(stack.ranks), ptr(stack.scales), ptr(run.step.loraSlots),
      ptr(run.step.counts), i32(rows), i32(N), i32(base.cols), i32(ldT), i32(R), i32(S), ...splitBoundArgs(stack),
    ]);
  }

  /** out[i] (f32) += scale_s * B_s (A_s x[i]) (x bf16) for rows with an adapter slot s >= 0 (see kernels/lora.cu). */
  lora(out: Operand, x: Operand, stack: DeviceLora, run: StepRun, write = false): void {
    const op = "lora";
    need(!write || this.loraWrites(stack, run), op, "write", "only the fused decode-only kernel writes; zero out and add instead");
    dtype(op, "out", out, "f32");
    dtype(op, "x", x, "bf16");
    const K = stack.inDim, N = stack.outDim, R = stack.maxRank, S = stack.outDims.length;
    need(x.cols === K && out.cols === N, op, "shape", `x must have ${K} columns and out ${N} (got ${x.cols}, ${out.cols})`);
    vec8(op, "in dim", K);
    for (const d of stack.outDims) vec8(op, "out split", d);
    need(R >= 1, op, "max rank", "the stack has no rank");
    need(S >= 1 && S <= MAX_LORA_SPLITS, op, "splits", `${S} output splits; at most ${MAX_LORA_SPLITS}`);
    const rows = Math.min(x.rowsCap, out.rowsCap);
    const st = run.step;
    const seqCap = run.padSeqs;
    const kinds = run as StepRun & StepKinds;
    const hasPrefill = kinds.hasPrefill !== false, hasDecode = kinds.hasDecode !== false;
    const rowArgs: KernelArg[] = [ptr(st.loraSlots), ptr(st.queryStart), ptr(st.counts), i32(seqCap), i32(rows)];
    const starts = splitStarts(stack);

    if (this.#fusedDecode(stack, run)) {
      // BGMV, one launch for every split: a cluster of 8 CTAs per row splits K for the
      // shrink and N for the expand.
      this.#launch("lora_bgmv_fused", [rows * 8, 1, 1], [128, 1, 1], 0, [
        ptr(out.ptr), ptr(x.ptr), ptr(stack.a), ptr(stack.b), ptr(stack.ranks), ptr(stack.scales), ...rowArgs,
        i32(K), i32(N), i32(R), i32(hasPrefill ? 0 : 1), i32(S), ...splitBoundArgs(stack), i32(write ? 1 : 0),
      ]);
    } else if (hasDecode) {
      const mode = hasPrefill ? 0 : 1;
      // One shrink + expand per split, on the split's A / B / ranks / scales / output columns.
      for (let j = 0; j < S; j++) {
        const sp = this.#split(stack, j, starts[j]!);
        // BGMV shrink: a CTA per (row, 4 ranks), 256 threads sharing the K reduction; grid.y
        // covers the pool's max rank, CTAs past a slot's rank exit.
        this.#launch("lora_bgmv_shrink", [rows, cdiv(R, 4), 1], [256, 1, 1], 0, [
          ptr(stack.scratch), ptr(x.ptr), ptr(sp.a), ptr(sp.ranks), ...rowArgs, i32(K), i32(R), i32(mode), i32(S),
        ]);
        // BGMV expand: 128 threads x 8 outputs per CTA; the row's rank vector in shared memory.
        this.#launch("lora_bgmv_expand", [rows, cdiv(sp.n, 1024), 1], [128, 1, 1], 4 * R, [
          ptr(sp.out(out)), ptr(stack.scratch), ptr(sp.b), ptr(sp.ranks), ptr(sp.scales), ...rowArgs, i32(sp.n), i32(R), i32(mode),
          i32(S), i32(N),
        ]);
      }
    }
    if (hasPrefill) {
      const mode = hasDecode ? 0 : 1;
      // SGMV shrink: 64-row tiles x RW ranks (RW = the pool's max rank rounded to 16, at most 64).
      const RW = R <= 16 ? 16 : R <= 32 ? 32 : 64;
      for (let j = 0; j < S; j++) {
        const sp = this.#split(stack, j, starts[j]!);
        this.#launch(`lora_sgmv_shrink_r${RW}`, [cdiv(rows, 64), cdiv(R, RW), 1], [128, 1, 1], 0, [
          ptr(stack.scratch), ptr(x.ptr), ptr(sp.a), ptr(sp.ranks), ...rowArgs, i32(K), i32(R), i32(mode), i32(S),
        ]);
        // SGMV expand: 64-row x 128-column output tiles.
        this.#launch("lora_sgmv_expand", [cdiv(rows, 64), cdiv(sp.n, 128), 1], [128, 1, 1], 0, [
          ptr(sp.out(out)), ptr(stack.scratch), ptr(sp.b), ptr(sp.ranks), ptr(sp.scales), ...rowArgs, i32(sp.n), i32(R), i32(mode),
          i32(S), i32(N),
        ]);
      }
    }
  }

  /** Split j of a stack as the per-split kernels see it: its A, B, ranks, scales and output columns. */
  #split(stack: DeviceLora, j: number, start: number) {
    const R = stack.maxRank;
    return {
      n: stack.outDims[j]!,
      a: stack.a + BigInt(j * R * stack.inDim * 2),
      b: stack.b + BigInt(start * R * 2),
      ranks: stack.ranks + BigInt(4 * j),
      scales: stack.scales + BigInt(4 * j),
      out: (o: Operand): bigint => o.ptr + BigInt(4 * start),
    };
  }

  /** Picks a token per sampled row of logits f32 [cap, V] (kernels/sample.cu). */
  sample(logits: Operand, run: StepRun, out: SampleOutputs): void {
    const op = "sample";
    dtype(op, "logits", logits, "f32");
    need(out.numTop >= 0 && Number.isInteger(out.numTop), op, "top logprobs", `numTop must be a non-negative integer (got ${out.numTop})`);
    const st = run.step;
    // One 1024-thread CTA per row: every pass over the vocabulary is spread over the
    // whole CTA, and block-wide reductions replace sorting (see the kernel's header).
    this.#launch("sample_rows", [logits.rowsCap, 1, 1], [1024, 1, 1], 0, [
      ptr(out.tokens), ptr(out.logprobs), ptr(out.topIds), ptr(out.topLogprobs), ptr(logits.ptr),
      ptr(st.temperature), ptr(st.topP), ptr(st.topK), ptr(st.seeds), ptr(st.counters), ptr(st.counts + 8n),
      i32(logits.rowsCap), i32(logits.cols), i32(out.numTop),
    ]);
  }

  sampleScratchBytes(_rows: number, _vocab: number): number {
    return 0; // the sampler works in shared memory
  }

  /** The next decode step's metadata from this one's and the sampled tokens (kernels/step.cu). */
  advanceDecode(run: StepRun, sampled: DevicePtr, blockSize: number): void {
    const op = "advanceDecode";
    need(Number.isInteger(blockSize) && blockSize >= 1, op, "block size", `block size must be a positive integer (got ${blockSize})`);
    need(run.hasPrefill !== true, op, "decode-only", "the step has prefill rows; only decode-only steps advance on the device");
    const st = run.step;
    // Decode steps keep their token rows in the compact regions (step_layout.ts) when the
    // layout has them; StepRun.step already points there.
    this.#launch("advance_decode_step", [cdiv(run.padSeqs, 256), 1, 1], [threadsFor(run.padSeqs, 256), 1, 1], 0, [
      ptr(st.tokenIds), ptr(st.positions), ptr(st.slotMapping), ptr(st.contextLens), ptr(st.counters),
      ptr(st.blockTables), ptr(st.counts), ptr(sampled), i32(run.padSeqs), i32(st.blocksPerSeq), i32(blockSize),
    ]);
  }

  /** t[i] = f32(std * sqrt(3) * (2 * uniform(seed, i) - 1)) (then bf16 for bf16 tensors), as the CPU's fillRandom. */
  fillRandom(t: Operand, numel: number, seed: number, std: number): void {
    const op = "fillRandom";
    need(t.dtype === "bf16" || t.dtype === "f32", op, "dtype", `the tensor must be bf16 or f32 (got ${t.dtype})`);
    need(numel < 2 ** 32, op, "elements", `${numel} elements exceed the u32 element index of the fill kernel`);
    const a = new Float64Array([std * Math.sqrt(3)]);
    const [lo, hi] = new Uint32Array(a.buffer);
    this.#launch(t.dtype === "bf16" ? "fill_random_bf16" : "fill_random_f32", this.#gridFor(numel), [256, 1, 1], 0, [
      ptr(t.ptr), u32(numel), u32(seed), u32(hi!), u32(lo!),
    ]);
  }

  // ---- buffer utilities (grid-stride kernels; any grid covers any n)

  convertF32ToBf16(out: DevicePtr, src: DevicePtr, n: number): void {
    this.#launch("convert_f32_to_bf16", this.#gridFor(n), [256, 1, 1], 0, [ptr(out), ptr(src), u32(n)]);
  }

  convertBf16ToF32(out: DevicePtr, src: DevicePtr, n: number): void {
    this.#launch("convert_bf16_to_f32", this.#gridFor(n), [256, 1, 1], 0, [ptr(out), ptr(src), u32(n)]);
  }

  convertF16ToBf16(out: DevicePtr, src: DevicePtr, n: number): void {
    this.#launch("convert_f16_to_bf16", this.#gridFor(n), [256, 1, 1], 0, [ptr(out), ptr(src), u32(n)]);
  }

  convertF16ToF32(out: DevicePtr, src: DevicePtr, n: number): void {
    this.#launch("convert_f16_to_f32", this.#gridFor(n), [256, 1, 1], 0, [ptr(out), ptr(src), u32(n)]);
  }

  /** Sets n 32-bit words to `value` (0: zero fill of 4n bytes). */
  fillU32(p: DevicePtr, n: number, value: number): void {
    this.#launch("fill_u32", this.#gridFor(n), [256, 1, 1], 0, [ptr(p), u32(n), u32(value)]);
  }

  /** Sets n 16-bit words to `value` (e.g. a bf16 constant's bits). */
  fillU16(p: DevicePtr, n: number, value: number): void {
    this.#launch("fill_u16", this.#gridFor(n), [256, 1, 1], 0, [ptr(p), u32(n), u32(value & 0xffff)]);
  }

  /** Grid-stride kernels: enough 256-thread CTAs to fill the GPU (32 per SM), never more than the work. */
  #gridFor(n: number): Dim3 {
    need(n < 2 ** 32, "utility", "elements", `${n} elements exceed the u32 count of the utility kernels`);
    return [Math.max(0, Math.min(cdiv(n, 256), this.#sm * 32)), 1, 1];
  }
}
