// The serving engine: continuous batching over a paged KV cache, with any mix of
// adapters in every step. Requests join and leave between steps; each step runs one
// forward over all running sequences (prefills and decodes together) and samples
// one token per sequence.

import { randomInt } from "node:crypto";
import { basename, resolve } from "node:path";
import type { Backend, KvCache, PendingSample, PendingSteps, PreparedStep, SampleResult, SamplingBatch, StepBatch, Tensor } from "../backend/backend.js";
import { createBackend, type DeviceName } from "../backend/select.js";
import { bytesPerElement } from "../backend/tensor.js";
import { AdapterPool } from "../lora/adapter_pool.js";
import { AdapterRegistry } from "../lora/registry.js";
import { loadModelConfig, type ModelConfig } from "../model/config.js";
import { IncrementalDetokenizer } from "../model/detokenizer.js";
import { LlamaModel } from "../model/llama.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { QuantizedSource, openQuantizedSource, readQuantSpec } from "../quant/checkpoint.js";
import { QuantizedLinears } from "../quant/load_quantized.js";
import { TextTokenizer } from "../model/tokenizer.js";
import { DUMMY, loadLlamaWeights } from "../model/weights.js";
import { createPolicy } from "../scheduler/index.js";
import type { SchedulingPolicy } from "../scheduler/policy.js";
import { BlockManager } from "./block_manager.js";
import { Channel } from "./channel.js";
import { Sequence } from "./sequence.js";
import { StopMatcher } from "./stop.js";
import {
  RequestError,
  type AdapterInfo,
  type EngineStats,
  type FinishReason,
  type GenerateOutput,
  type GenerateRequest,
  type ServingEngine,
  type TokenLogprob,
} from "./types.js";

/**
 * A step whose forward and sampling are issued, its tokens not yet taken (Engine.#launchStep).
 * At most one is in flight, so the engine keeps one and rewrites it every step: the host
 * time per step counts, and so do the GC pauses that per-step garbage brings.
 */
interface LaunchedStep {
  running: Sequence[];
  nTop: number;
  decodeOnly: boolean;
  logits: Tensor | null;
  prepared: PreparedStep | null;
  pending: PendingSample | null;
  /** Decode steps issued by one call (Backend.decodeSteps) when `steps` > 1, else null. */
  pendingSteps: PendingSteps | null;
  /** How many decode steps this launch runs (1 unless multi-step). */
  steps: number;
  /** performance.now() at: start, after scheduling, after the batch, after prepare, after the
   * forward (a graph replay, for decode steps), after issuing the sampling (tA..tC and tE only
   * with INLAID_PROFILE_STEPS=1, else 0). */
  t0: number;
  tA: number;
  tB: number;
  tC: number;
  tE: number;
  tD: number;
  /** When the output handling of the previous step started and ended. */
  t1: number;
  tF: number;
}

/**
 * Sampled tokens whose text is not streamed yet (Engine.flushOutputs), as parallel
 * arrays reused from step to step (two of them, swapped at each flush).
 */
class OutputQueue {
  readonly seqs: (Sequence | null)[] = [];
  tokens = new Int32Array(64);
  readonly logprobs: TokenLogprob[][] = [];
  readonly reasons: (FinishReason | null)[] = [];
  length = 0;

  push(seq: Sequence, token: number, logprobs: TokenLogprob[], reason: FinishReason | null): void {
    const n = this.length;
    if (n === this.tokens.length) {
      const grown = new Int32Array(2 * n);
      grown.set(this.tokens);
      this.tokens = grown;
    }
    this.seqs[n] = seq;
    this.tokens[n] = token;
    this.logprobs[n] = logprobs;
    this.reasons[n] = reason;
    this.length = n + 1;
  }

  /** Empties the queue, dropping its references to sequences and logprobs. */
  clear(): void {
    for (let i = 0; i < this.length; i++) {
      this.seqs[i] = null;
      this.logprobs[i] = NO_LOGPROBS;
    }
    this.length = 0;
  }
}

const NO_LOGPROBS: TokenLogprob[] = [];
const NOT_ADMITTED: ReadonlySet<Sequence> = new Set();

/** A StepBatch the engine fills in place (its views are made once per decode batch size). */
type StepViews = Omit<StepBatch, "sampling"> & { readonly sampling: { -readonly [K in keyof SamplingBatch]: SamplingBatch[K] } };

/** What a step needs to know about a sequence. */
type BatchedSeq = Pick<Sequence, "computed" | "totalTokens" | "blocks" | "slot" | "seed" | "tokenAt"> & {
  readonly outputIds: { readonly length: number };
  readonly params: Pick<Sequence["params"], "temperature" | "topP" | "topK" | "logprobs">;
};

export interface EngineOptions {
  /** HF model folder (config.json, *.safetensors, tokenizer.json). */
  readonly modelDir: string;
  /** name -> PEFT adapter folder, loaded at start. */
  readonly adapters?: Readonly<Record<string, string>>;
  readonly device?: DeviceName;
  /** Name clients use for the base model (default: the model folder's name). */
  readonly modelId?: string;
  /** Most sequences in the running batch (default 256). */
  readonly maxBatch?: number;
  /** Most requests queued before new ones get 429 (default 4096). */
  readonly maxWaiting?: number;
  /** Context window (default: the config's max_position_embeddings). */
  readonly maxModelLen?: number;
  /** Most prompt tokens prefilled in one step (default max(maxModelLen, 1024)). */
  readonly maxBatchedTokens?: number;
  readonly blockSize?: number;
  /** Memory for the KV cache (default: enough for maxBatch full contexts, at most 1 GiB). */
  readonly kvCacheBytes?: number;
  /** Fraction of device memory the engine may use in all (GPU; default 0.9). */
  readonly gpuMemoryUtilization?: number;
  /** Adapter pool slots (default 16). */
  readonly maxLoras?: number;
  readonly maxLoraRank?: number;
  readonly policy?: string;
  /** "safetensors" (default) reads the checkpoint; "dummy" makes random weights from config.json alone. */
  readonly loadFormat?: "safetensors" | "dummy";
  /** Serve a GPTQ checkpoint's linears with the backend's low-bit kernels (default: on CUDA,
   * unless INLAID_QUANT_KERNELS=0); off, they are dequantized at load (as on the CPU). */
  readonly quantKernels?: boolean;
  /** Decode steps run per scheduling round when the batch allows it (multi-step scheduling,
   * vLLM's --num-scheduler-steps; default INLAID_SCHEDULER_STEPS or 1): the host's work per
   * step is shared by that many steps, and tokens stream in bursts of that many. */
  readonly schedulerSteps?: number;
  /** Progress while loading. */
  readonly onProgress?: (message: string) => void;
}

/** The default of EngineOptions.schedulerSteps: INLAID_SCHEDULER_STEPS, else 1. */
export function defaultSchedulerSteps(): number {
  const v = process.env.INLAID_SCHEDULER_STEPS;
  if (v === undefined || v === "") return 1;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new Error(`INLAID_SCHEDULER_STEPS=${v}: expected an integer from 1 to 64`);
  return n;
}

export class Engine implements ServingEngine {
  readonly modelId: string;
  readonly maxModelLen: number;
  readonly maxBatch: number;
  readonly maxWaiting: number;
  readonly maxBatchedTokens: number;
  /** Decode steps per scheduling round, when the batch allows (EngineOptions.schedulerSteps). */
  readonly schedulerSteps: number;

  readonly #backend: Backend;
  readonly #model: LlamaModel;
  readonly #kv: KvCache;
  readonly #blocks: BlockManager;
  readonly #registry: AdapterRegistry;
  readonly #pool: AdapterPool;
  readonly #policy: SchedulingPolicy;
  readonly #eos: Set<number>;
  readonly #maxBlocksPerSeq: number;

  readonly #stepArrays: {
    tokenIds: Int32Array; positions: Int32Array; slotMapping: Int32Array; loraSlots: Int32Array;
    queryStart: Int32Array; contextLens: Int32Array; blockTables: Int32Array; sampleRows: Int32Array;
    temperature: Float32Array; topP: Float32Array; topK: Int32Array; seeds: Uint32Array; counters: Uint32Array;
  };

  #waiting: Sequence[] = [];
  #running: Sequence[] = [];
  #nextSeqId = 0;
  #steps = 0;
  #decodeSteps = 0;
  #decodeHostMs = 0;
  /** INLAID_PROFILE_STEPS=1: where decode steps spend host time, per step (printed at close
   * as medians and 90th percentiles in microseconds: totals would be dominated by the few
   * steps that capture a graph). */
  readonly #phases: Record<"schedule" | "buildBatch" | "prepare" | "forward" | "sampleIssue" | "outputs" | "eventLoop" | "wait" | "tokens" | "idle" | "host", number[]> | null =
    process.env.INLAID_PROFILE_STEPS === "1"
      ? { schedule: [], buildBatch: [], prepare: [], forward: [], sampleIssue: [], outputs: [], eventLoop: [], wait: [], tokens: [], idle: [], host: [] }
      : null;
  /** Outputs of the last step not yet streamed (see #launchStep), and the queue flushOutputs drains. */
  #outputs = new OutputQueue();
  #flushing = new OutputQueue();
  readonly #launched: LaunchedStep = {
    running: [], nTop: 0, decodeOnly: false, logits: null, prepared: null, pending: null, pendingSteps: null, steps: 1,
    t0: 0, tA: 0, tB: 0, tC: 0, tE: 0, tD: 0, t1: 0, tF: 0,
  };
  /** The forward of the step being launched, made once (a closure per step is garbage per step). */
  readonly #forwardStep = (step: PreparedStep): Tensor => this.#model.forward(step, this.#kv);
  readonly #forward = (): Tensor => this.#forwardStep(this.#launched.prepared!);
  /** Resolves a promise on the next event-loop turn; made once for the same reason. */
  readonly #yieldExecutor = (resolve: () => void): void => {
    setImmediate(resolve);
  };
  /** Some sequence was aborted since the last #reapAborted. */
  #abortsPending = false;
  /**
   * Per row of the step arrays: the sequence the last #buildBatch put there, and how many
   * of its block ids and which top-logprobs count that row holds. A running sequence keeps
   * its sampling parameters, and its blocks only grow, until it is freed; so while no
   * sequence has been freed since the last build, a row that holds the same sequence as
   * then only needs its new block ids written. Any free (#rowsStale) forgets every row.
   */
  readonly #rowSeq: (BatchedSeq | null)[] = [];
  #rowsStale = false;
  readonly #rowBlocks: Int32Array;
  readonly #rowTop: Int32Array;
  #rowsBuilt = 0;
  /** Decode-only batches (one token per sequence) by sequence count: views made once. */
  readonly #decodeBatches: (StepViews | undefined)[] = [];
  /** When the last decode step's tokens reached the host (0: the last step was not a decode step). */
  #lastTokensAt = 0;
  #decodeIdleMs = 0;
  #decodeIdleSteps = 0;
  /** A step is issued and its tokens not yet taken (the loop is awaiting between the two). */
  #inFlight = false;
  #closed = false;
  #wake: (() => void) | null = null;
  readonly #loop: Promise<void>;

  constructor(
    readonly config: ModelConfig,
    readonly tokenizer: TextTokenizer,
    backend: Backend,
    model: LlamaModel,
    registry: AdapterRegistry,
    pool: AdapterPool,
    opts: Required<Pick<EngineOptions, "maxBatch" | "maxWaiting" | "maxModelLen" | "maxBatchedTokens" | "blockSize">> & {
      schedulerSteps?: number;
      numBlocks: number;
      modelId: string;
      policy: SchedulingPolicy;
    },
  ) {
    this.#backend = backend;
    this.#model = model;
    this.#registry = registry;
    this.#pool = pool;
    this.#policy = opts.policy;
    this.modelId = opts.modelId;
    this.maxModelLen = opts.maxModelLen;
    this.maxBatch = opts.maxBatch;
    this.maxWaiting = opts.maxWaiting;
    this.maxBatchedTokens = opts.maxBatchedTokens;
    const steps = opts.schedulerSteps ?? defaultSchedulerSteps();
    if (!Number.isInteger(steps) || steps < 1 || steps > 64) throw new Error(`scheduler steps must be an integer from 1 to 64 (got ${steps})`);
    this.schedulerSteps = steps;
    this.#blocks = new BlockManager(opts.numBlocks, opts.blockSize);
    this.#maxBlocksPerSeq = Math.ceil(opts.maxModelLen / opts.blockSize);
    const T = model.limits.maxTokens, S = model.limits.maxSeqs;
    this.#stepArrays = {
      tokenIds: new Int32Array(T), positions: new Int32Array(T), slotMapping: new Int32Array(T), loraSlots: new Int32Array(T),
      queryStart: new Int32Array(S + 1), contextLens: new Int32Array(S), blockTables: new Int32Array(S * this.#maxBlocksPerSeq),
      sampleRows: new Int32Array(S), temperature: new Float32Array(S), topP: new Float32Array(S), topK: new Int32Array(S),
      seeds: new Uint32Array(S), counters: new Uint32Array(S),
    };
    this.#rowBlocks = new Int32Array(S);
    this.#rowTop = new Int32Array(S);
    this.#kv = backend.createKvCache({
      numLayers: config.numLayers,
      numBlocks: opts.numBlocks,
      blockSize: opts.blockSize,
      numKvHeads: config.numKvHeads,
      headDim: config.headDim,
    });
    this.#eos = new Set([...tokenizer.eosTokenIds, ...config.eosTokenIds]);
    this.#loop = this.#run();
  }

  get backendName(): string {
    return this.#backend.name;
  }

  /** Who launches the backend's replayed graphs (null: a backend without graphs). */
  get graphLaunch(): string | null {
    return this.#backend.replay ? this.#backend.graphLaunch ?? "host" : null;
  }

  // ------------------------------------------------------------------ requests

  generate(req: GenerateRequest, signal?: AbortSignal): AsyncIterable<GenerateOutput> {
    if (this.#closed) throw new RequestError("the engine is shutting down", 503, "engine_closed");
    const p = req.params;
    const adapterName = req.adapter ?? "";
    const lora = req.adapter === null ? null : this.#registry.get(req.adapter) ?? null;
    if (req.adapter !== null && !lora) {
      throw new RequestError(`The model \`${req.adapter}\` does not exist.`, 404, "model_not_found", "model");
    }
    const n = req.promptIds.length;
    if (n === 0) throw new RequestError("the prompt is empty", 400, "invalid_prompt", "prompt");
    for (const id of req.promptIds) {
      if (!Number.isInteger(id) || id < 0 || id >= this.config.vocabSize) {
        throw new RequestError(`prompt token id ${id} is outside the vocabulary [0, ${this.config.vocabSize})`, 400, "invalid_prompt", "prompt");
      }
    }
    if (n >= this.maxModelLen) {
      throw new RequestError(
        `This model's maximum context length is ${this.maxModelLen} tokens, but the prompt has ${n} tokens; shorten the prompt.`,
        413, "context_length_exceeded", "prompt");
    }
    if (!Number.isInteger(p.maxTokens) || p.maxTokens < 1) {
      throw new RequestError(`max_tokens must be a positive integer (got ${p.maxTokens})`, 400, "invalid_value", "max_tokens");
    }
    if (n + p.maxTokens > this.maxModelLen) {
      throw new RequestError(
        `This model's maximum context length is ${this.maxModelLen} tokens; the prompt has ${n} tokens and max_tokens is ${p.maxTokens}. ` +
          `Lower max_tokens to at most ${this.maxModelLen - n}.`,
        400, "context_length_exceeded", "max_tokens");
    }
    if (!(p.temperature >= 0) || !(p.topP > 0 && p.topP <= 1) || !(Number.isInteger(p.topK) && p.topK >= 0)) {
      throw new RequestError("temperature must be >= 0, top_p in (0, 1], top_k a non-negative integer", 400, "invalid_value", null);
    }
    if (this.#waiting.length >= this.maxWaiting) {
      throw new RequestError(`the server is overloaded (${this.#waiting.length} requests waiting); retry later`, 429, "overloaded");
    }
    const seed = p.seed !== undefined ? p.seed >>> 0 : randomInt(0, 2 ** 32);
    let seq: Sequence | null = null;
    const channel = new Channel<GenerateOutput>(() => this.#abort(seq!));
    seq = new Sequence(
      this.#nextSeqId++, req.id, adapterName, lora, [...req.promptIds], p, seed, performance.now(), channel,
      new IncrementalDetokenizer(this.tokenizer, req.promptIds), new StopMatcher(p.stop),
    );
    if (signal) {
      if (signal.aborted) this.#abort(seq);
      else signal.addEventListener("abort", () => this.#abort(seq!), { once: true });
    }
    this.#waiting.push(seq);
    this.#wakeUp();
    return channel;
  }

  #abort(seq: Sequence): void {
    if (seq.status === "finished") return;
    seq.aborted = true;
    this.#abortsPending = true;
    this.#wakeUp();
  }

  // ------------------------------------------------------------------ adapters

  listAdapters(): AdapterInfo[] {
    return this.#registry.list().map((r) => ({ name: r.name, path: r.path, rank: r.adapter.maxRank }));
  }

  async loadAdapter(name: string, path: string): Promise<AdapterInfo> {
    if (name === this.modelId) throw new RequestError(`'${name}' is the base model's name`, 400, "invalid_value", "lora_name");
    if (this.#registry.get(name)) {
      throw new RequestError(`The lora adapter '${name}' has already been loaded; unload it first to replace it.`, 400, "adapter_exists", "lora_name");
    }
    const r = this.#registry.load(name, path);
    return { name: r.name, path: r.path, rank: r.adapter.maxRank };
  }

  async unloadAdapter(name: string): Promise<void> {
    const reg = this.#registry.remove(name);
    if (!reg) throw new RequestError(`The model \`${name}\` does not exist.`, 404, "model_not_found", "lora_name");
    // Running and queued requests keep their adapter id; its slot is freed once unpinned.
    this.#pool.evict(reg.id);
  }

  stats(): EngineStats {
    const count = (seqs: Sequence[]): Map<string, number> => {
      const m = new Map<string, number>();
      for (const s of seqs) m.set(s.adapter, (m.get(s.adapter) ?? 0) + 1);
      return m;
    };
    return {
      running: count(this.#running),
      waiting: count(this.#waiting),
      kvBlocksUsed: this.#blocks.usedBlocks,
      kvBlocksTotal: this.#blocks.numBlocks,
      steps: this.#steps,
      decodeSteps: this.#decodeSteps,
      decodeHostUs: this.#decodeHostMs * 1000,
      decodeIdleUs: this.#decodeIdleMs * 1000,
      decodeIdleSteps: this.#decodeIdleSteps,
    };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of [...this.#running, ...this.#waiting]) s.aborted = true;
    this.#abortsPending = true;
    this.#wakeUp();
    await this.#loop;
    const summary = this.hostPhases();
    if (summary) {
      process.stderr.write(`inlaid: decode step host phases (${this.#decodeSteps} steps, us): ${JSON.stringify(summary)}\n`);
      const nodes = this.#backend.graphNodes?.();
      if (nodes) process.stderr.write(`inlaid: graph nodes: ${JSON.stringify(nodes)}\n`);
    }
    this.#backend.freeKvCache(this.#kv);
    this.#pool.dispose();
  }

  /** With INLAID_PROFILE_STEPS=1: p50, p90, p99, max and mean microseconds of each
   * decode-step phase (`host`: the step's whole host time, as hostUsPerDecodeStep counts
   * it) since the start or the last reset (else null). */
  hostPhases(reset = false): Record<string, { p50: number; p90: number; p99: number; max: number; mean: number }> | null {
    if (!this.#phases) return null;
    const pct = (xs: number[], q: number): number => [...xs].sort((a, b) => a - b)[Math.floor(q * (xs.length - 1))] ?? 0;
    const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
    const r1 = (v: number): number => +v.toFixed(1);
    const summary = Object.fromEntries(Object.entries(this.#phases).map(([k, xs]) =>
      [k, { p50: r1(pct(xs, 0.5)), p90: r1(pct(xs, 0.9)), p99: r1(pct(xs, 0.99)), max: r1(pct(xs, 1)), mean: r1(mean(xs)) }]));
    if (reset) for (const xs of Object.values(this.#phases)) xs.length = 0;
    return summary;
  }

  /**
   * Logits at the last position of `promptIds` with `adapter` (null = base), computed
   * between engine steps with borrowed KV blocks. For tests and quality harnesses.
   */
  lastLogits(promptIds: readonly number[], adapter: string | null): Float32Array {
    const lora = adapter === null ? null : this.#registry.get(adapter) ?? null;
    if (adapter !== null && !lora) throw new RequestError(`The model \`${adapter}\` does not exist.`, 404, "model_not_found", "model");
    if (promptIds.length === 0 || promptIds.length > this.maxModelLen) throw new Error(`prompt of ${promptIds.length} tokens`);
    if (this.#inFlight) throw new Error("lastLogits while an engine step is in flight; call it while the engine is idle");
    const blocks: number[] = [];
    if (!this.#blocks.grow(blocks, promptIds.length)) throw new Error("no free KV blocks for lastLogits; call it while the engine is idle");
    const slot = lora ? this.#pool.acquire(lora.id, lora.adapter) : -1;
    try {
      if (lora && slot < 0) throw new Error("no free adapter slot for lastLogits");
      const view = { computed: 0, totalTokens: promptIds.length, blocks, slot, seed: 0, outputIds: [],
        params: { temperature: 0, topP: 1, topK: 0, logprobs: -1 }, tokenAt: (i: number) => promptIds[i]! };
      const batch = this.#buildBatch([view]);
      const logits = this.#model.forward(this.#backend.prepare(batch), this.#kv);
      return this.#backend.read(logits) as Float32Array;
    } finally {
      if (slot >= 0) this.#pool.release(slot);
      this.#blocks.release(blocks);
    }
  }

  // ------------------------------------------------------------------ the loop

  #wakeUp(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  async #run(): Promise<void> {
    for (;;) {
      this.#reapAborted();
      if (this.#closed && this.#running.length === 0 && this.#waiting.length === 0) return;
      if (this.#running.length === 0 && this.#waiting.length === 0) {
        await new Promise<void>((r) => (this.#wake = r));
        continue;
      }
      try {
        const launched = this.#launchStep();
        if (launched) {
          // While the device computes: stream the previous step's outputs, and let the
          // streams' consumers and other I/O (new requests, disconnects, socket writes) run.
          launched.t1 = performance.now();
          this.flushOutputs();
          launched.tF = performance.now();
          await new Promise<void>(this.#yieldExecutor);
          this.#finishStep(launched);
        } else await new Promise<void>(this.#yieldExecutor);
      } catch (err) {
        // A failed step must not take the server down: fail the sequences in it and go on.
        const msg = err instanceof Error ? err.message : String(err);
        process.emitWarning(`inlaid: engine step failed: ${msg}`);
        this.flushOutputs();
        for (const s of this.#running) {
          this.#free(s);
          s.emit("", [], [], "error");
        }
        this.#running = [];
        await new Promise<void>(this.#yieldExecutor);
      }
    }
  }

  #reapAborted(): void {
    if (!this.#abortsPending) return;
    this.#abortsPending = false;
    const done = (s: Sequence): boolean => {
      if (!s.aborted) return false;
      this.#free(s);
      s.emit("", [], [], "abort");
      return true;
    };
    this.#running = this.#running.filter((s) => !done(s));
    this.#waiting = this.#waiting.filter((s) => !done(s));
  }

  #free(s: Sequence): void {
    this.#blocks.release(s.blocks);
    this.#rowsStale = true;
    s.computed = 0;
    if (s.slot >= 0) {
      this.#pool.release(s.slot);
      s.slot = -1;
    }
  }

  /**
   * Starts one step: admits waiting sequences, makes room for decodes, builds the batch
   * and issues its forward and sampling. Returns null when nothing runs.
   *
   * The previous step's output handling (detokenizing, streaming) runs while the device
   * computes this step, between #launchStep and #finishStep (see #run). Only what decides
   * the next batch is done when the tokens arrive: appending the token, and finishing on
   * EOS, length, or (for requests with stop strings, whose text must be matched first)
   * a stop string. So a token reaches its stream about one launch after it is sampled.
   */
  #launchStep(): LaunchedStep | null {
    const profile = this.#phases !== null;
    const t0 = performance.now();
    const admitted = this.#admit();
    this.#reserveDecodeBlocks(admitted);
    if (this.#running.length === 0) {
      this.flushOutputs();
      return null;
    }
    const l = this.#launched;
    l.t0 = t0;
    const steps = admitted.size === 0 ? this.#multiSteps() : 1;
    l.tA = profile ? performance.now() : 0;
    const running = this.#running;
    const batch = this.#buildBatch(running);
    l.tB = profile ? performance.now() : 0;
    // Decode-only steps (one token per sequence) have the same op sequence every time:
    // a backend with graphs replays them (keyed further by its own batch buckets).
    const decodeOnly = batch.numTokens === batch.numSeqs;
    const b = this.#backend;
    l.steps = 1;
    l.pendingSteps = null;
    if (steps > 1 && decodeOnly && b.decodeSteps) {
      const prepared = b.prepare(batch);
      l.tC = profile ? performance.now() : 0;
      l.prepared = prepared;
      l.logits = null;
      l.pending = null;
      l.steps = steps;
      l.pendingSteps = b.decodeSteps(steps, "decode", this.#forwardStep, prepared, this.#blocks.blockSize);
      l.tE = profile ? performance.now() : 0;
    } else if (decodeOnly && b.prepareReplaySample) {
      // Preparing and replaying in one call (the backend may upload inside its graph): the
      // profile's `prepare` phase then holds the launch, `forward` nothing.
      const r = b.prepareReplaySample(batch, "decode", this.#forwardStep);
      l.prepared = r.step;
      l.logits = null;
      l.pending = r.pending;
      l.tC = l.tE = profile ? performance.now() : 0;
    } else {
      const prepared = b.prepare(batch);
      l.tC = profile ? performance.now() : 0;
      l.prepared = prepared;
      if (decodeOnly && b.replaySample) {
        l.logits = null;
        l.pending = b.replaySample("decode", this.#forward, prepared);
        l.tE = profile ? performance.now() : 0;
      } else {
        const logits = decodeOnly && b.replay ? b.replay("decode", this.#forward) : this.#forward();
        l.logits = logits;
        l.tE = profile ? performance.now() : 0;
        l.pending = b.sampleAsync?.(logits, prepared) ?? null;
      }
    }
    l.running = running;
    l.nTop = batch.sampling.numTopLogprobs;
    l.decodeOnly = decodeOnly;
    const tD = performance.now();
    l.tD = tD;
    l.t1 = tD;
    l.tF = tD;
    this.#inFlight = true;
    return l;
  }

  /** Waits for a launched step's tokens and takes them (see #launchStep). */
  #finishStep(l: LaunchedStep): void {
    const t2 = this.#phases ? performance.now() : 0;
    let result: SampleResult | null = null;
    let results: readonly SampleResult[] | null = null;
    try {
      if (l.pendingSteps) results = l.pendingSteps.wait();
      else result = l.pending ? l.pending.wait() : this.#backend.sample(l.logits!, l.prepared!);
    } finally {
      this.#inFlight = false;
      l.pending = null;
      l.pendingSteps = null;
    }
    const t3 = performance.now();
    const n = l.steps;
    this.#steps += n;
    const { running, nTop } = l;
    let finished = 0;
    for (let j = 0; j < n; j++) {
      const res = results ? results[j]! : result!;
      for (let r = 0; r < running.length; r++) {
        const s = running[r]!;
        // A sequence that ended within a multi-step round ignores the round's later tokens.
        if (s.done) continue;
        s.computed = s.totalTokens;
        const tok = res.tokens[r]!;
        s.outputIds.push(tok);
        if (s.outputIds.length === 1) s.firstTokenAt = t3;
        let lps = NO_LOGPROBS;
        if (s.logprobs >= 0) {
          const top = [];
          for (let i = 0; i < Math.min(s.logprobs, nTop); i++) {
            top.push({ tokenId: res.topIds[r * nTop + i]!, logprob: res.topLogprobs[r * nTop + i]! });
          }
          lps = [{ tokenId: tok, logprob: res.logprobs[r]!, top }];
        }
        if (this.#onToken(s, tok, lps)) finished++;
      }
    }
    if (finished > 0) {
      for (const s of running) if (s.done) this.#free(s);
      this.#running = this.#running.filter((s) => !s.done);
    }
    // Nothing runs next to hide the output handling behind: do it now.
    if (this.#running.length === 0) this.flushOutputs();
    if (l.decodeOnly) {
      const t4 = performance.now();
      this.#decodeSteps += n;
      // Host time: everything but the wait for the device (the event-loop turn while it
      // computes is not counted: that time belongs to the streams' consumers). Device idle:
      // from the previous step's tokens being taken to this step's sampling being issued,
      // plus taking this step's tokens. A multi-step round's are shared by its n steps
      // (the profile's phases too: each is per decode step).
      const host = l.tD - l.t0 + (l.tF - l.t1) + (t4 - t3);
      this.#decodeHostMs += host;
      const idle = this.#lastTokensAt > 0 ? l.tD - this.#lastTokensAt + (t4 - t3) : -1;
      if (idle >= 0) {
        this.#decodeIdleMs += idle;
        this.#decodeIdleSteps += n;
      }
      if (this.#phases) {
        const p = this.#phases, us = 1000 / n;
        p.schedule.push((l.tA - l.t0) * us);
        p.buildBatch.push((l.tB - l.tA) * us);
        p.prepare.push((l.tC - l.tB) * us);
        p.forward.push((l.tE - l.tC) * us);
        p.sampleIssue.push((l.tD - l.tE) * us);
        p.outputs.push((l.tF - l.t1) * us);
        p.eventLoop.push((t2 - l.tF) * us);
        p.wait.push((t3 - t2) * us);
        p.tokens.push((t4 - t3) * us);
        p.host.push(host * us);
        if (idle >= 0) p.idle.push(idle * us);
      }
      this.#lastTokensAt = t4;
    } else this.#lastTokensAt = 0;
  }

  /** Streams the outputs the last step held back (see #launchStep). */
  flushOutputs(): void {
    const q = this.#outputs;
    if (q.length === 0) return;
    // Swap first: what the loop below triggers must not see this queue half drained.
    this.#outputs = this.#flushing;
    this.#flushing = q;
    try {
      for (let i = 0; i < q.length; i++) {
        const s = q.seqs[i]!, token = q.tokens[i]!, reason = q.reasons[i] as FinishReason | null;
        const text = s.detok.push(token);
        if (reason === null) s.emit(text, [token], q.logprobs[i]!, null);
        else s.emit(text + s.detok.flush(), [token], q.logprobs[i]!, reason);
      }
    } finally {
      q.clear();
    }
  }

  /**
   * Takes one new token's output; true when it ends the sequence. Sequences with stop
   * strings are matched and streamed at once; the others are queued for flushOutputs
   * (and marked done when this token ends them).
   */
  #onToken(s: Sequence, tok: number, lps: TokenLogprob[]): boolean {
    let reason: FinishReason | null = null;
    if (!s.ignoreEos && this.#eos.has(tok)) reason = "stop";
    else if (s.outputIds.length >= s.maxTokens || s.totalTokens >= this.maxModelLen) reason = "length";
    if (!s.hasStops) {
      this.#outputs.push(s, tok, lps, reason);
      if (reason !== null) s.done = true;
      return reason !== null;
    }
    s.done = true; // unless it goes on below
    const text = s.stop.push(s.detok.push(tok));
    if (text.stopped) {
      s.emit(text.text, [tok], lps, "stop");
      return true;
    }
    if (reason !== null) {
      // End of stream: release text held back for UTF-8 or a possible stop string.
      const tail = s.stop.push(s.detok.flush());
      let out = text.text + tail.text;
      if (tail.stopped) reason = "stop";
      else out += s.stop.flush();
      s.emit(out, [tok], lps, reason);
      return true;
    }
    s.done = false;
    s.emit(text.text, [tok], lps, null);
    return false;
  }

  /** Moves waiting sequences into the running batch while slots, blocks and the token budget allow. */
  #admit(): ReadonlySet<Sequence> {
    if (this.#waiting.length === 0 || this.#running.length >= this.maxBatch) return NOT_ADMITTED;
    const admitted = new Set<Sequence>();
    let budget = this.maxBatchedTokens;
    const bySeqId = new Map(this.#waiting.map((s) => [s.seqId, s]));
    for (const q of this.#policy.order(this.#waiting, this.#running)) {
      if (this.#running.length >= this.maxBatch) break;
      const s = bySeqId.get(q.seqId)!;
      const tokens = s.totalTokens - s.computed;
      if (tokens > budget && admitted.size > 0) break;
      // Keep a block in hand for the decode that follows (and for the running sequences).
      if (this.#blocks.missing(s.blocks, s.totalTokens + 1) > this.#blocks.freeBlocks - this.#running.length) break;
      if (s.lora) {
        const slot = this.#pool.acquire(s.lora.id, s.lora.adapter);
        if (slot < 0) continue; // every slot is busy with other adapters; try requests for resident ones
        s.slot = slot;
      }
      this.#blocks.grow(s.blocks, s.totalTokens);
      budget -= tokens;
      s.status = "running";
      this.#running.push(s);
      admitted.add(s);
    }
    if (admitted.size > 0) this.#waiting = this.#waiting.filter((s) => !admitted.has(s));
    return admitted;
  }

  /** Each decoding sequence needs room for one more token; preempt the newest if the cache is full. */
  #reserveDecodeBlocks(admitted: ReadonlySet<Sequence>): void {
    for (let i = 0; i < this.#running.length; i++) {
      const s = this.#running[i]!;
      if (admitted.has(s)) continue;
      while (!this.#blocks.grow(s.blocks, s.totalTokens)) {
        const victim = this.#running[this.#running.length - 1]!;
        this.#preempt(victim);
        if (victim === s) break;
      }
    }
  }

  /**
   * How many decode steps this round runs: schedulerSteps when every running sequence is
   * decoding, none is waiting (a round delays admissions by its length), each may take that
   * many more tokens, and free KV blocks cover them (they are then reserved); else 1.
   * All or one keeps the graphs to two per batch bucket.
   */
  #multiSteps(): number {
    const n = this.schedulerSteps;
    if (n <= 1 || !this.#backend.decodeSteps || this.#waiting.length > 0 || this.#running.length === 0) return 1;
    let missing = 0;
    for (let i = 0; i < this.#running.length; i++) {
      const s = this.#running[i]!;
      if (s.computed !== s.totalTokens - 1) return 1;
      if (s.maxTokens - s.outputIds.length < n || this.maxModelLen - s.totalTokens < n) return 1;
      missing += this.#blocks.missing(s.blocks, s.totalTokens + n - 1);
    }
    if (missing > this.#blocks.freeBlocks) return 1;
    for (let i = 0; i < this.#running.length; i++) {
      const s = this.#running[i]!;
      this.#blocks.grow(s.blocks, s.totalTokens + n - 1);
    }
    return n;
  }

  /** Gives a sequence's blocks back; it is recomputed from its tokens when readmitted. */
  #preempt(s: Sequence): void {
    this.#free(s);
    s.status = "waiting";
    this.#running = this.#running.filter((x) => x !== s);
    this.#waiting.unshift(s);
  }

  #buildBatch(seqs: readonly BatchedSeq[]): StepBatch {
    const numSeqs = seqs.length;
    let numTokens = 0;
    for (let i = 0; i < numSeqs; i++) {
      const s = seqs[i]!;
      numTokens += s.totalTokens - s.computed;
    }
    const B = this.#maxBlocksPerSeq;
    const bs = this.#blocks.blockSize;
    // Arrays allocated once (host time per step counts); a step's batch is consumed
    // before the next one is built.
    const a = this.#stepArrays;
    if (numTokens > a.tokenIds.length || numSeqs > a.contextLens.length) {
      throw new Error(`step of ${numTokens} tokens / ${numSeqs} sequences exceeds the engine's step capacity`);
    }
    const { tokenIds, positions, slotMapping, loraSlots, queryStart, contextLens, blockTables, sampleRows } = a;
    const rowSeq = this.#rowSeq, rowBlocks = this.#rowBlocks, rowTop = this.#rowTop;
    if (this.#rowsStale) {
      rowSeq.fill(null);
      this.#rowsStale = false;
    }
    let numTopLogprobs = 0;
    let t = 0;
    for (let i = 0; i < numSeqs; i++) {
      const s = seqs[i]!;
      const total = s.totalTokens;
      const blocks = s.blocks;
      const slot = s.slot;
      queryStart[i] = t;
      for (let p = s.computed; p < total; p++, t++) {
        tokenIds[t] = s.tokenAt(p);
        positions[t] = p;
        slotMapping[t] = blocks[Math.floor(p / bs)]! * bs + (p % bs);
        loraSlots[t] = slot;
      }
      contextLens[i] = total;
      sampleRows[i] = t - 1;
      a.counters[i] = s.outputIds.length;
      const row = i * B;
      const nBlocks = blocks.length;
      if (rowSeq[i] !== s || rowBlocks[i]! > nBlocks) {
        // A new sequence in this row (see #rowSeq): its constants and whole block-table row.
        rowSeq[i] = s;
        const p = s.params;
        a.temperature[i] = p.temperature;
        a.topP[i] = p.topP;
        a.topK[i] = p.topK;
        a.seeds[i] = s.seed;
        rowTop[i] = p.logprobs;
        for (let j = 0; j < nBlocks; j++) blockTables[row + j] = blocks[j]!;
        blockTables.fill(-1, row + nBlocks, row + B);
      } else {
        for (let j = rowBlocks[i]!; j < nBlocks; j++) blockTables[row + j] = blocks[j]!;
      }
      rowBlocks[i] = nBlocks;
      if (rowTop[i]! > numTopLogprobs) numTopLogprobs = rowTop[i]!;
    }
    queryStart[numSeqs] = t;
    for (let i = numSeqs; i < this.#rowsBuilt; i++) rowSeq[i] = null;
    this.#rowsBuilt = numSeqs;

    // Decode-only steps reuse their views; other steps (prefills, rare) get fresh ones.
    let batch = numTokens === numSeqs ? this.#decodeBatches[numSeqs] : undefined;
    if (!batch) {
      batch = this.#views(numTokens, numSeqs);
      if (numTokens === numSeqs) this.#decodeBatches[numSeqs] = batch;
    }
    batch.sampling.numTopLogprobs = numTopLogprobs;
    return batch;
  }

  /** Views of the step arrays for a step of `numTokens` tokens over `numSeqs` sequences. */
  #views(numTokens: number, numSeqs: number): StepViews {
    const a = this.#stepArrays;
    const B = this.#maxBlocksPerSeq;
    return {
      numTokens, numSeqs,
      tokenIds: a.tokenIds.subarray(0, numTokens),
      positions: a.positions.subarray(0, numTokens),
      slotMapping: a.slotMapping.subarray(0, numTokens),
      loraSlots: a.loraSlots.subarray(0, numTokens),
      queryStart: a.queryStart.subarray(0, numSeqs + 1),
      contextLens: a.contextLens.subarray(0, numSeqs),
      blockTables: a.blockTables.subarray(0, numSeqs * B),
      maxBlocksPerSeq: B,
      sampleRows: a.sampleRows.subarray(0, numSeqs),
      sampling: {
        temperature: a.temperature.subarray(0, numSeqs),
        topP: a.topP.subarray(0, numSeqs),
        topK: a.topK.subarray(0, numSeqs),
        seeds: a.seeds.subarray(0, numSeqs),
        counters: a.counters.subarray(0, numSeqs),
        numTopLogprobs: 0,
      },
    };
  }
}

/** Loads a model folder and its adapters and starts the engine loop. */
export async function createEngine(opts: EngineOptions): Promise<Engine> {
  const say = opts.onProgress ?? (() => {});
  const dir = resolve(opts.modelDir);
  const config = loadModelConfig(dir);
  const tokenizer = TextTokenizer.load(dir);
  const backend = await createBackend(opts.device ?? "auto");
  const maxModelLen = opts.maxModelLen ?? config.maxPositionEmbeddings;
  if (maxModelLen > config.maxPositionEmbeddings) {
    throw new Error(`--max-model-len ${maxModelLen} exceeds the model's max_position_embeddings (${config.maxPositionEmbeddings})`);
  }
  const maxBatch = opts.maxBatch ?? 256;
  const maxBatchedTokens = Math.max(opts.maxBatchedTokens ?? 1024, maxModelLen);
  const blockSize = opts.blockSize ?? 16;

  say(`loading ${dir} (${config.architecture}, ${config.numLayers} layers) on ${backend.name}`);
  const src = opts.loadFormat === "dummy" ? DUMMY : readQuantSpec(dir) ? openQuantizedSource(dir) : SafetensorsDir.open(dir);
  let loaded = 0;
  const total = src === DUMMY ? 0 : src.names().length;
  const counted = (): void => {
    loaded++;
    if (loaded % 64 === 0 || loaded === total) say(`loaded ${loaded}${total ? `/${total}` : ""} tensors`);
  };
  // A GPTQ checkpoint's linears stay quantized where the backend has low-bit kernels
  // (src/quant/load_quantized.ts); the rest is dequantized at load by the QuantizedSource.
  const quantKernels = opts.quantKernels ?? (backend.name === "cuda" && process.env.INLAID_QUANT_KERNELS !== "0");
  const dummySpec = src === DUMMY && quantKernels ? readQuantSpec(dir) : null;
  const quant = !quantKernels ? null
    : src instanceof QuantizedSource ? QuantizedLinears.load(backend, config, dir, { onTensor: counted })
    : dummySpec ? QuantizedLinears.dummy(backend, config, dummySpec)
    : null;
  if (quant) say(`${quant.size} fused linears served by low-bit kernels`);
  const dense = loadLlamaWeights(backend, config, src, counted, quant ? { skip: quant.skip } : undefined);
  const weights = quant ? quant.attach(dense) : dense;
  if (src !== DUMMY) src.close();

  const maxLoraRank = opts.maxLoraRank ?? 64;
  const registry = new AdapterRegistry(config, maxLoraRank);
  for (const [name, path] of Object.entries(opts.adapters ?? {})) {
    say(`loading adapter ${name} from ${path}`);
    registry.load(name, resolve(path));
  }
  const pool = new AdapterPool(backend, config, opts.maxLoras ?? 16, maxLoraRank);
  const maxTokens = maxBatchedTokens + maxBatch;
  const model = new LlamaModel(backend, config, weights, { maxTokens, maxSeqs: maxBatch }, pool.wrap);
  backend.reserve?.({
    maxTokens, maxSeqs: maxBatch, maxBlocksPerSeq: Math.ceil(maxModelLen / blockSize),
    numHeads: config.numHeads, headDim: config.headDim, vocabSize: config.vocabSize, maxTopLogprobs: 20,
  });
  // The KV cache takes what is left: on a GPU, up to --gpu-memory-utilization of the
  // device once weights, workspace and step buffers exist; on the CPU, enough for
  // maxBatch full contexts, at most 1 GiB.
  const bytesPerToken = config.numLayers * 2 * config.numKvHeads * config.headDim * bytesPerElement(backend.activationDtype);
  const minBlocks = Math.ceil(maxModelLen / blockSize) + 1;
  // Enough for every sequence of a full batch at full context (no preemption), plus one.
  const wanted = (Math.ceil((maxBatch * maxModelLen) / blockSize) + 1) * blockSize * bytesPerToken;
  let kvBytes = opts.kvCacheBytes;
  if (kvBytes === undefined) {
    const mem = backend.memoryInfo?.();
    const util = opts.gpuMemoryUtilization ?? 0.9;
    kvBytes = mem ? Math.min(mem.free - mem.total * (1 - util), wanted) : Math.min(Math.max(2 ** 30, minBlocks * blockSize * bytesPerToken), wanted);
  }
  const numBlocks = Math.floor(kvBytes / (bytesPerToken * blockSize));
  if (numBlocks < minBlocks) {
    throw new Error(
      `not enough memory for the KV cache: ${(kvBytes / 2 ** 20).toFixed(0)} MiB holds ${numBlocks} blocks, one full context needs ${minBlocks}; ` +
        "lower --max-model-len or --max-batch, or raise --gpu-memory-utilization");
  }
  say(`KV cache: ${numBlocks} blocks of ${blockSize} tokens (${((numBlocks * blockSize * bytesPerToken) / 2 ** 20).toFixed(0)} MiB)`);
  if (backend.replay) say(`decode steps replay graphs launched from the ${(backend.graphLaunch ?? "host") === "host" ? "host" : "device"}`);
  return new Engine(config, tokenizer, backend, model, registry, pool, {
    maxBatch,
    maxWaiting: opts.maxWaiting ?? 4096,
    maxModelLen,
    maxBatchedTokens,
    blockSize,
    ...(opts.schedulerSteps !== undefined && { schedulerSteps: opts.schedulerSteps }),
    numBlocks,
    modelId: opts.modelId ?? basename(dir),
    policy: createPolicy(opts.policy ?? "fcfs"),
  });
}
