// The contract every backend implements. The model (src/model/llama.ts) is written
// once against this interface; the CPU backend is its plainest implementation and
// the oracle the others are tested against.
//
// Contract:
// - Tensors are opaque handles owned by the backend that made them; whoever
//   allocates frees (`free`). Views made by `rows` share storage and are never freed.
// - Ops write into caller-provided outputs (so a GPU backend can preallocate and
//   replay graphs). Row counts come from the tensors' first dimension.
// - Ops run in issue order; `read` waits for everything issued before it.
// - All math is fp32 (accumulate in fp32 even over bf16/f16 storage).

import type { QuantBits, QuantizedWeight, QuantSpec } from "../quant/types.js";
import type { DType, Shape } from "./tensor.js";

export interface Tensor {
  readonly shape: Shape;
  readonly dtype: DType;
}

/** Host data handed to a backend, with the dtype it is stored in on the host. */
export interface HostTensor {
  readonly shape: Shape;
  readonly dtype: DType;
  /** f32: Float32Array; bf16/f16: Uint16Array of raw bits; i32: Int32Array. */
  readonly data: Float32Array | Uint16Array | Int32Array;
}

/**
 * What one engine step computes, in host memory, built by the engine and turned into
 * a backend-side `PreparedStep` once per step. Tokens of all sequences in the step
 * are flattened: sequence s owns token rows [queryStart[s], queryStart[s+1]).
 */
export interface StepBatch {
  readonly numTokens: number;
  readonly numSeqs: number;
  /** [numTokens] token ids. */
  readonly tokenIds: Int32Array;
  /** [numTokens] absolute positions (for RoPE and the causal mask). */
  readonly positions: Int32Array;
  /** [numTokens] flat KV-cache slot (block * blockSize + offset) each token writes. */
  readonly slotMapping: Int32Array;
  /** [numTokens] LoRA pool slot per token; -1 = no adapter. */
  readonly loraSlots: Int32Array;
  /** [numSeqs + 1] prefix sums of query lengths. */
  readonly queryStart: Int32Array;
  /** [numSeqs] tokens in the KV cache for the sequence once this step has written. */
  readonly contextLens: Int32Array;
  /** [numSeqs * maxBlocksPerSeq] block ids, row-major; unused entries are -1. */
  readonly blockTables: Int32Array;
  readonly maxBlocksPerSeq: number;
  /** [numSample] token rows whose logits are needed (each a sequence's last token). */
  readonly sampleRows: Int32Array;
  readonly sampling: SamplingBatch;
}

/** Per sampled row: how to pick its next token. Row r corresponds to sampleRows[r]. */
export interface SamplingBatch {
  /** 0 = greedy (argmax). */
  readonly temperature: Float32Array;
  /** 1 = off. */
  readonly topP: Float32Array;
  /** 0 = off. */
  readonly topK: Int32Array;
  /** Per-row 32-bit seed and the index of the token being drawn: the draw is a pure
   * function of (seed, counter), so a request's output never depends on its batch. */
  readonly seeds: Uint32Array;
  readonly counters: Uint32Array;
  /** How many top logprobs the step must return per row (max over rows; 0 = none). */
  readonly numTopLogprobs: number;
}

export interface SampleResult {
  /** [numSample] chosen token ids. */
  readonly tokens: Int32Array;
  /** [numSample] log-softmax of the raw logits at the chosen token. */
  readonly logprobs: Float32Array;
  /** [numSample * numTopLogprobs] ids and log-probs of the most likely tokens, best first. */
  readonly topIds: Int32Array;
  readonly topLogprobs: Float32Array;
}

/** Sampling issued on a device, its result not yet read back (Backend.sampleAsync). */
export interface PendingSample {
  wait(): SampleResult;
}

/** Several decode steps issued at once (Backend.decodeSteps), their results not yet read back. */
export interface PendingSteps {
  /** One result per step, in order. */
  wait(): readonly SampleResult[];
}

/** Backend-side copy of a step's metadata (device buffers on a GPU). */
export interface PreparedStep {
  readonly batch: StepBatch;
}

export interface KvCacheSpec {
  readonly numLayers: number;
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly numKvHeads: number;
  readonly headDim: number;
}

/** Paged KV cache for all layers: per layer K and V of [numBlocks, blockSize, numKvHeads, headDim]. */
export interface KvCache {
  readonly spec: KvCacheSpec;
}

/**
 * LoRA weights of one fused linear (e.g. layer 3's q/k/v projections, whose outputs are
 * the column blocks of one matmul) for every pool slot. The output's columns are split
 * into `outDims` blocks (one per member projection; a plain linear has one); each
 * (slot, split) holds its own A [rank, inDim], B [outDims[j], rank] and scale, so the
 * members of one adapter may have different ranks (PEFT's rank_pattern) or be absent
 * (rank 0). scales = lora_alpha / r (or rsLoRA's).
 */
export interface LoraStack {
  readonly numSlots: number;
  readonly maxRank: number;
  readonly inDim: number;
  /** Sum of outDims. */
  readonly outDim: number;
  readonly outDims: readonly number[];
}

/**
 * A quantized linear weight held by a backend (`uploadQuantized`), in the backend's own
 * layout: W [outDim, inDim] = dequantize(q) of the QuantizedWeight it was made from.
 */
export interface QuantizedTensor {
  readonly inDim: number;
  readonly outDim: number;
  readonly bits: QuantBits;
}

export interface StepCapacities {
  readonly maxTokens: number;
  readonly maxSeqs: number;
  readonly maxBlocksPerSeq: number;
  readonly numHeads: number;
  readonly headDim: number;
  readonly vocabSize: number;
  readonly maxTopLogprobs: number;
}

export interface Backend {
  readonly name: string;
  /** Storage dtype for activations feeding matmuls (f32 on CPU, bf16 on GPUs).
   * The rule: matmul inputs are stored in activationDtype; matmul outputs, the residual
   * stream and logits are f32. So normed hidden states, the attention output and the
   * silu-mul output (and the KV cache) are activationDtype; q/k/v (through RoPE into
   * attention), gate/up, the o_proj / down_proj outputs (and the LoRA deltas added to
   * them, and linear biases) are f32. One rounding per matmul input, none anywhere else:
   * with bf16 everywhere the rounding errors of the outputs compound across layers. */
  readonly activationDtype: DType;

  // ---- memory
  /** Copy host data to the backend, converting to `dtype` (default: the backend's weight dtype). */
  upload(host: HostTensor, dtype?: DType): Tensor;
  empty(shape: Shape, dtype: DType): Tensor;
  /** View of the first `n` rows (dimension 0) of `t`; shares storage. */
  rows(t: Tensor, n: number): Tensor;
  /** Fills a float tensor with uniform noise of standard deviation `std` (random weights for
   * `--load-format dummy`), deterministic in `seed`; on the device, without host work. */
  fillRandom(t: Tensor, seed: number, std: number): void;
  /** Copy a tensor back to the host as f32 (or i32 for i32 tensors). */
  read(t: Tensor): Float32Array | Int32Array;
  free(t: Tensor): void;

  // ---- per-step state
  prepare(batch: StepBatch): PreparedStep;
  createKvCache(spec: KvCacheSpec): KvCache;
  freeKvCache(kv: KvCache): void;
  /** outDims: the output's column blocks (a number = one block). */
  createLoraStack(numSlots: number, maxRank: number, inDim: number, outDims: number | readonly number[]): LoraStack;
  /** Load one adapter's A [rank, inDim] and B [outDims[split], rank] (f32) into (`slot`, `split`).
   * rank 0 clears it. */
  writeLoraSlot(stack: LoraStack, slot: number, rank: number, scale: number, a: Float32Array, b: Float32Array, split?: number): void;
  freeLoraStack(stack: LoraStack): void;

  // ---- ops (semantics in comments; out may not alias inputs unless stated)
  /** out[i] = table[tokenIds[i]]. out: [n, H], table: [V, H]. */
  embedding(out: Tensor, table: Tensor, step: PreparedStep): void;
  /** out[i] = x[i] / rms(x[i]) * w. */
  rmsnorm(out: Tensor, x: Tensor, w: Tensor, eps: number): void;
  /** residual += x (in place), then out = rmsnorm(residual) * w. */
  addRmsnorm(out: Tensor, residual: Tensor, x: Tensor, w: Tensor, eps: number): void;
  /** out = x @ w^T (+ bias); with `accumulate`, out += x @ w^T (+ bias) (onto a LoRA term
   * that loraFirst wrote). x: [n, K], w: [N, K], out: [n, N]. */
  linear(out: Tensor, x: Tensor, w: Tensor, bias?: Tensor, accumulate?: boolean): void;
  /** Semantics: for each row i with s = loraSlots[i] >= 0 and each split j (columns
   * [o_j, o_j + outDims[j]) of out):
   *   out[i, o_j:o_j+N_j] += scale[s,j] * B[s,j] @ (A[s,j] @ x[i]). */
  lora(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): void;
  /**
   * Optional: the LoRA term issued BEFORE the base matmul, which then accumulates onto it
   * (linear with `accumulate`): out[i] = the sum `lora` adds (0 on rows without an
   * adapter and past the live rows). Returns false when it wrote nothing (no row of the
   * step has an adapter, or the backend does this step's term after the matmul): the caller
   * then runs the matmul and `lora` as usual. Why: on a GPU the
   * LoRA launch then depends on the kernel that made x (a norm, attention, silu-mul), whose
   * tail it can overlap, instead of on the GEMM.
   */
  loraFirst?(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): boolean;
  /**
   * Optional, with linearLora: lets the backend keep the stack's A beside `weight` (the
   * dense base weight [outDim, inDim] of the linear the stack decorates; it keeps its
   * identity and contents) so that one matmul can make the base output and the shrink.
   * Called once, when the model is built; returns false when it declines.
   */
  attachLoraStack?(stack: LoraStack, weight: Tensor): boolean;
  /**
   * Optional: out = x @ weight^T + the LoRA term (`linear` then `lora`) in the backend's
   * own way, for a stack attached to `weight`. Returns false, having done nothing, when
   * it does not take this step; the caller then runs the usual path.
   */
  linearLora?(out: Tensor, x: Tensor, weight: Tensor, stack: LoraStack, step: PreparedStep): boolean;
  /** Splits the fused q/k/v projection output qkv [n, (nH + 2 nKv) * D] into q [n, nH*D],
   * k and v [n, nKv*D] (its column blocks, in that order), applying the rotary embedding
   * (rotate-half convention) to q and k. invFreq: [D/2] f32; positions from the step. */
  rope(q: Tensor, k: Tensor, v: Tensor, qkv: Tensor, invFreq: Tensor, headDim: number, step: PreparedStep): void;
  /** Writes k, v rows into layer `layer` of the cache at step.slotMapping, then
   * out = causal softmax(q k^T * scale) v over each sequence's context, with GQA
   * (query head h reads KV head h / (nH / nKv)). q/out: [n, nH*D], k/v: [n, nKv*D]. */
  attention(out: Tensor, q: Tensor, k: Tensor, v: Tensor, kv: KvCache, layer: number, scale: number, step: PreparedStep): void;
  /** out = silu(gate) * up, where gateUp [n, 2I] is the fused gate/up output: gate its
   * first I columns, up the last I; out [n, I]. */
  siluMul(out: Tensor, gateUp: Tensor): void;
  /** out [K, K] (f32) = alpha * x^T x, plus out's old value when `accumulate`; x [n, K] in
   * activationDtype, all n rows of its shape. The Gram matrix of calibration activations
   * (quantization Hessians: quant/stream_capture.ts); accumulate sums token chunks in place,
   * alpha (default 1) weighs them (2/n for a per-token-normalized Hessian). */
  gram(out: Tensor, x: Tensor, accumulate: boolean, alpha?: number): void;
  /** out[r] = x[step.sampleRows[r]]. */
  gatherRows(out: Tensor, x: Tensor, step: PreparedStep): void;
  /** Picks one token per row of logits [numSample, V] as step.sampling says. */
  sample(logits: Tensor, step: PreparedStep): SampleResult;
  /**
   * Optional: `sample` split in two. Issues the sampling and returns at once; `wait()`
   * blocks until the tokens are on the host and returns them. The engine does host work
   * (the previous step's output handling) between the two, while the device computes.
   * Nothing else may be issued to the backend before `wait()`.
   */
  sampleAsync?(logits: Tensor, step: PreparedStep): PendingSample;

  /** Optional, with linearQuantized and freeQuantized: low-bit weights (GPTQ, quant/types.ts).
   * Throws an error named "QuantLayoutError" for a shape or grouping the backend's kernels
   * do not take (the caller then serves that linear dense). */
  uploadQuantized?(q: QuantizedWeight): QuantizedTensor;
  /** out [n, outDim] (f32) = x [n, inDim] (activationDtype) @ dequantize(w)^T (+ bias, f32). */
  linearQuantized?(out: Tensor, x: Tensor, w: QuantizedTensor, bias?: Tensor): void;
  /**
   * Optional: out = linearQuantized(x, w, bias) + the term `lora` adds, in the backend's own
   * way (e.g. the shrink made by the low-bit GEMM's own launch). Returns false, having done
   * nothing, when it does not take this step; the caller then runs the usual path.
   */
  linearQuantizedLora?(out: Tensor, x: Tensor, w: QuantizedTensor, stack: LoraStack, step: PreparedStep, bias?: Tensor): boolean;
  freeQuantized?(w: QuantizedTensor): void;
  /** Optional: random low-bit weights (`--load-format dummy` of a quantized config): uniform codes,
   * symmetric zeros, one scale giving a standard deviation of about `std`; deterministic in `seed`. */
  randomQuantized?(spec: QuantSpec, inDim: number, outDim: number, seed: number, std: number): QuantizedTensor;

  /** Optional: allocate every per-step buffer at these capacities now (so memory is
   * known before the KV cache is sized, and no step allocates). */
  reserve?(r: StepCapacities): void;
  /** Optional: device memory, for sizing the KV cache. */
  memoryInfo?(): { free: number; total: number };

  /**
   * Optional: run `forward` so that later calls with the same `key` replay it (a CUDA
   * graph). The caller promises that the same key means the same op sequence over the
   * same tensors, with only the prepared step's contents changing.
   */
  replay?(key: string, forward: () => Tensor): Tensor;
  /**
   * Optional: `replay` then `sampleAsync` of its logits, replayed as one (the sampling and
   * the copy of the tokens to the host inside the graph). Same promise as `replay`.
   */
  replaySample?(key: string, forward: () => Tensor, step: PreparedStep): PendingSample;
  /**
   * Optional: `prepare(batch)` then `replaySample` of `forward(step)`, as one call so that a
   * backend may fold the step's upload into the replayed graph too. Same promise as `replay`.
   */
  prepareReplaySample?(batch: StepBatch, key: string, forward: (step: PreparedStep) => Tensor): { step: PreparedStep; pending: PendingSample };
  /**
   * Optional: `n` decode steps from one call (multi-step scheduling): the step prepared in
   * `step` (decode-only: one token per sequence, every sequence sampled), then n - 1 more,
   * each feeding every sequence the token it just sampled (nextDecodeBatch, decode_steps.ts:
   * positions, context lengths and sampling counters + 1, KV slots from the block tables,
   * which must already hold blocks for the n tokens). The backend does this without the
   * host between the steps (on a GPU: one graph of n steps); the host's work per step is
   * then shared by n. Same promise for `key` as `replay`.
   */
  decodeSteps?(n: number, key: string, forward: (step: PreparedStep) => Tensor, step: PreparedStep, blockSize: number): PendingSteps;
  /** Nodes of each captured graph, by key (diagnostics). */
  graphNodes?(): Record<string, number>;
  /** Who launches replayed graphs: the host, or the device (a one-node host graph's kernel). */
  readonly graphLaunch?: "host" | "device" | "tail";
}
