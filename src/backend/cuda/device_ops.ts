// The seam between CudaBackend (tensors, steps, graphs, memory) and the kernels: the
// backend resolves every Backend-level argument to device pointers and capacities
// (Operand, StepRun, DeviceKv, DeviceLora) and calls one DeviceOps method per op.
// `linear` is not here: it is cuBLASLt's (ffi/cublaslt.ts).
//
// Graph-safety rule for implementations: every launch parameter (grid, block, shared
// memory, scalar arguments) must be a function of the capacities given here, never of
// the live counts, which kernels read from device memory (`liveRows`, `StepRun.counts`).
// Then an eager run and a replayed CUDA graph launch identical kernels.

import type { DeviceDType } from "./tensor.js";

/** A tensor as a kernel sees it. */
export interface Operand {
  readonly ptr: bigint;
  readonly dtype: DeviceDType;
  /** Rows the launch covers (a bucket for step-sized views). */
  readonly rowsCap: number;
  /** Elements per row. */
  readonly cols: number;
  /** Device address of an i32 holding the live row count (<= rowsCap), or 0n when all rowsCap rows are live. */
  readonly liveRows: bigint;
}

/** The step's metadata in device memory (fixed addresses; see step_layout.ts). */
export interface DeviceStep {
  /** i32[4]: numTokens, numSeqs, numSample, padTokens. */
  readonly counts: bigint;
  readonly tokenIds: bigint;
  readonly positions: bigint;
  readonly slotMapping: bigint;
  readonly loraSlots: bigint;
  readonly queryStart: bigint;
  readonly contextLens: bigint;
  readonly sampleRows: bigint;
  readonly blockTables: bigint;
  readonly temperature: bigint;
  readonly topP: bigint;
  readonly topK: bigint;
  readonly seeds: bigint;
  readonly counters: bigint;
  /** Row stride of blockTables. */
  readonly blocksPerSeq: number;
  /** Capacities of the metadata buffer. */
  readonly capTokens: number;
  readonly capSeqs: number;
}

/** One op's view of the current step: the metadata plus this launch's capacities. */
export interface StepRun {
  readonly step: DeviceStep;
  /** Token rows to launch over (bucket of numTokens). */
  readonly padTokens: number;
  /** Sequences to launch over (bucket of numSeqs). */
  readonly padSeqs: number;
  /** Sampled rows to launch over (bucket of numSample). */
  readonly padSample: number;
  /** Longest context any sequence can have: blocksPerSeq * blockSize (a capacity). */
  readonly maxContext: number;
  /**
   * Host facts about the step: some sequence has more than one query row (prefill) /
   * exactly one (decode). An op may skip the launches of a path with no work (absent:
   * both paths run). CudaBackend always sets them and makes them part of the graph key,
   * so a replayed graph always saw the same values.
   */
  readonly hasPrefill?: boolean;
  readonly hasDecode?: boolean;
}

/** One layer of the paged KV cache: K and V, each [numBlocks, blockSize, numKvHeads, headDim] bf16. */
export interface DeviceKv {
  readonly k: bigint;
  readonly v: bigint;
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly numKvHeads: number;
  readonly headDim: number;
}

/**
 * A LoRA stack with S = outDims.length output splits: A [numSlots, S, maxRank, inDim]
 * bf16, B [numSlots, outDim, maxRank] bf16 (split j's rows at its column offset), ranks
 * i32 [numSlots, S], scales f32 [numSlots, S]; (slot s, split j) uses the first
 * ranks[s, j] rows of its A and columns of its B (the rest is zero). `scratch` holds f32
 * [capTokens, maxRank] for the shrink result (one split at a time).
 */
export interface DeviceLora {
  readonly a: bigint;
  readonly b: bigint;
  readonly ranks: bigint;
  readonly scales: bigint;
  readonly numSlots: number;
  readonly maxRank: number;
  readonly inDim: number;
  /** Sum of outDims. */
  readonly outDim: number;
  /** The output's column blocks (splits); A is [numSlots][splits][maxRank][inDim], B
   * [numSlots][outDim][maxRank], ranks and scales [numSlots][splits]. */
  readonly outDims: readonly number[];
  readonly scratch: bigint;
}

/** Device scratch an op may use, allocated once at capacity (never inside a graph). */
export interface Scratch {
  readonly ptr: bigint;
  readonly bytes: number;
}

/** Where `sample` writes, for numSample rows and numTop top logprobs each. */
export interface SampleOutputs {
  readonly tokens: bigint;
  readonly logprobs: bigint;
  readonly topIds: bigint;
  readonly topLogprobs: bigint;
  readonly numTop: number;
  /** Device scratch the sampler may use, and its size. */
  readonly scratch: bigint;
  readonly scratchBytes: number;
}

/** Semantics are the Backend's (backend.ts); operands are resolved device tensors. */
export interface DeviceOps {
  embedding(out: Operand, table: Operand, run: StepRun): void;
  rmsnorm(out: Operand, x: Operand, w: Operand, eps: number): void;
  addRmsnorm(out: Operand, residual: Operand, x: Operand, w: Operand, eps: number): void;
  /** write: out = the LoRA term on every launch row (0 without an adapter) instead of
   * out += it; only where loraWrites says so (else the caller zeroes out, then adds). */
  lora(out: Operand, x: Operand, stack: DeviceLora, run: StepRun, write?: boolean): void;
  /** Whether `lora` can write (not add) for this stack and step. */
  loraWrites(stack: DeviceLora, run: StepRun): boolean;
  /** Whether this step may run the LoRA term as a shrink GEMM over the A of slots
   * 0..slots-1 (into t f32 [rows, ldT], the caller's: row i's slot s, split j, rank r at
   * (s * splits + j) * maxRank + r) and loraExpandSlots. */
  loraSlotsPath(stack: DeviceLora, run: StepRun, slots: number): boolean;
  /** out[i] = base[i] + scale_s * B_s t[i, s] on rows with an adapter slot s (base may be
   * out: rows without one are then untouched; base may be wider than out, ld = its cols). */
  loraExpandSlots(out: Operand, base: Operand, t: bigint, ldT: number, stack: DeviceLora, run: StepRun): void;
  rope(q: Operand, k: Operand, v: Operand, qkv: Operand, invFreq: Operand, headDim: number, run: StepRun): void;
  attention(out: Operand, q: Operand, k: Operand, v: Operand, kv: DeviceKv, scale: number, run: StepRun, scratch: Scratch): void;
  /** Scratch `attention` needs at a capacity of `seqs` sequences (split-K partials). */
  attentionScratchBytes(seqs: number, numHeads: number, headDim: number): number;
  siluMul(out: Operand, gateUp: Operand): void;
  gatherRows(out: Operand, x: Operand, run: StepRun): void;
  sample(logits: Operand, run: StepRun, out: SampleOutputs): void;
  /** Device scratch `sample` needs for `rows` x `vocab` logits (allocated once, outside graphs). */
  sampleScratchBytes(rows: number, vocab: number): number;
  /** The step's metadata becomes the next decode step's, each sequence fed the token at
   * sampled[i] (i32; decode_steps.ts nextDecodeBatch). Decode-only steps. */
  advanceDecode(run: StepRun, sampled: bigint, blockSize: number): void;
  /**
   * Optional: t[i] = std * sqrt(3) * (2 * uniform(seed, i) - 1) over all elements
   * (rng.ts's hash), on the device. Without it the backend fills on the host and uploads.
   */
  fillRandom?(t: Operand, numel: number, seed: number, std: number): void;
}

/** Stand-in used when the kernels are not available: every op says why. */
export function unavailableOps(reason: string): DeviceOps {
  const fail = (op: string) => (): never => {
    throw new Error(`CUDA op '${op}' is unavailable: ${reason}`);
  };
  return {
    embedding: fail("embedding"),
    rmsnorm: fail("rmsnorm"),
    addRmsnorm: fail("addRmsnorm"),
    lora: fail("lora"),
    loraWrites: () => false,
    loraSlotsPath: () => false,
    loraExpandSlots: fail("loraExpandSlots"),
    rope: fail("rope"),
    attention: fail("attention"),
    attentionScratchBytes: () => 0,
    siluMul: fail("siluMul"),
    gatherRows: fail("gatherRows"),
    sample: fail("sample"),
    sampleScratchBytes: () => 0,
    advanceDecode: fail("advanceDecode"),
  };
}
