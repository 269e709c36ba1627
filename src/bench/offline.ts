// `inlaid bench` (offline throughput): B requests of exactly P random prompt tokens are
// submitted at once, each generates exactly G tokens (greedy, EOS ignored), with K
// synthetic adapters of rank r assigned round-robin so every batch mixes adapters.
// Reports throughput, prefill time, decode step times and the step's memory roofline.
//
// How steps are timed (from outputs alone; the engine is not instrumented). The engine
// emits each sequence's token at the end of the step that made it, and consumers see it
// in the microtasks that run before the next step starts, so a token's arrival time is
// its step's end time (plus a constant few microseconds). By default the KV cache holds
// every sequence and the step token budget holds every prompt, so step 1 prefills all
// B prompts and steps 2..G are decode steps over all B sequences. Then:
//   prefill_s      = time until every request has its first token;
//   decode step k  = arrival(token k) - arrival(token k-1), k = 1..G-1, taken from the
//                    request whose first token came last: every step after its first
//                    token is a decode-only step (all prefills are done), and it is in
//                    every step until the run ends.
// When the prompts do not fit one step (--max-batched-tokens below B*P), prefill spreads
// over several steps and the early sequences finish early, so the last decode steps run
// fewer than B sequences; the method still times decode-only steps.

import { cpus } from "node:os";
import { basename, resolve } from "node:path";
import type { Backend } from "../backend/backend.js";
import { createBackend, type DeviceName } from "../backend/select.js";
import { bytesPerElement, type DType } from "../backend/tensor.js";
import { createEngine, type Engine } from "../engine/engine.js";
import type { GenerateRequest } from "../engine/types.js";
import { loadModelConfig, type ModelConfig } from "../model/config.js";
import { readQuantSpec } from "../quant/checkpoint.js";
import { measureBandwidth, type Bandwidth } from "./bandwidth.js";
import { decodeStepBytes, storageBytes } from "./roofline.js";
import { DEFAULT_ADAPTER_CACHE, syntheticAdapters } from "./synthetic_adapter.js";
import { mulberry32 } from "../backend/rng.js";

export interface OfflineBenchOptions {
  readonly modelDir: string;
  /** Name reported as `model` (default: the folder's name). */
  readonly modelName?: string;
  readonly loadFormat: "safetensors" | "dummy";
  readonly device: DeviceName;
  readonly batch: number;
  readonly promptLen: number;
  readonly gen: number;
  /** Synthetic adapters, round-robin over the requests (0 = base model only). */
  readonly adapters: number;
  readonly rank: number;
  /** One short untimed run first (same batch and prompts, 4 tokens): kernels, plans and graphs warm up, adapters become resident. */
  readonly warmup: boolean;
  /** Known device bandwidth in GB/s; measured when absent. */
  readonly bandwidthGbs?: number;
  /** Prompt tokens prefilled per step (default: all prompts at once, at most 8192 tokens). */
  readonly maxBatchedTokens?: number;
  readonly adapterCache?: string;
  /** Seed of the random prompts (default 0). */
  readonly seed?: number;
  /** Decode steps per scheduling round (EngineOptions.schedulerSteps; default INLAID_SCHEDULER_STEPS or 1). */
  readonly schedulerSteps?: number;
}

export interface ProgressSink {
  note(message: string): void;
  start(label: string, total: number, unit?: string): void;
  update(done: number): void;
  stop(): void;
}

export interface OfflineBenchResult {
  readonly bench: "offline";
  readonly machine: string;
  readonly device: string;
  readonly backend: string;
  /** Who launched the replayed decode graphs ("host", "device", "tail"; null without graphs). */
  readonly graph_launch: string | null;
  /** Decode steps per scheduling round (multi-step; 1 = one step per round). Above 1 the tokens
   * arrive in bursts, so decode_step_ms's p50 / p99 describe the bursts; its mean is the step. */
  readonly scheduler_steps: number;
  readonly model: string;
  readonly load_format: "safetensors" | "dummy";
  readonly shape: {
    readonly architecture: string;
    readonly layers: number;
    readonly hidden: number;
    readonly intermediate: number;
    readonly heads: number;
    readonly kv_heads: number;
    readonly head_dim: number;
    readonly vocab: number;
  };
  readonly batch: number;
  readonly prompt_len: number;
  readonly gen: number;
  readonly adapters: number;
  readonly rank: number;
  readonly max_batched_tokens: number;
  readonly seconds: number;
  readonly output_tokens_per_s: number;
  readonly total_tokens_per_s: number;
  readonly prefill_s: number;
  /** Engine steps in the timed run (G when all prompts are prefilled in one step). */
  readonly steps: number;
  /** Null when G = 1 (no decode step). */
  readonly decode_step_ms: { readonly mean: number; readonly p50: number; readonly p99: number; readonly n: number } | null;
  /** batch / mean decode step: the steady-state decode rate. */
  readonly decode_tokens_per_s: number | null;
  /** Mean host time of a decode step (building, launching, handling tokens), excluding the wait for the device. */
  readonly host_us_per_decode_step: number;
  /** Host time per decode step the device waits through (EngineStats.decodeIdleUs). */
  readonly device_idle_us_per_decode_step: number;
  /** With INLAID_PROFILE_STEPS=1: the timed run's decode-step host phases (Engine.hostPhases), `host` the whole. */
  readonly host_phases_us?: Record<string, { p50: number; p90: number; p99: number; max: number; mean: number }>;
  readonly roofline: {
    readonly bytes_per_step: number;
    readonly weights_bytes: number;
    readonly adapter_bytes: number;
    readonly kv_bytes: number;
    readonly mean_context: number;
    /** Null when the bandwidth could not be measured (pass --bandwidth-gbs). */
    readonly bandwidth_gbs: number | null;
    readonly bandwidth_source: string;
    readonly step_ms: number | null;
    /** Measured mean decode step / roofline step (>= 1; 1 = at the roofline). */
    readonly ratio: number | null;
  };
  readonly node: string;
}

/** Tokens per step the warm-up generates: enough for an eager step, a graph capture and a replay. */
const WARMUP_GEN = 4;
const MAX_DEFAULT_BATCHED_TOKENS = 8192;

function round(x: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Nearest-rank percentile of ascending `sorted`. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export function randomPrompts(count: number, length: number, vocab: number, seed = 0): number[][] {
  return Array.from({ length: count }, (_, i) => {
    const next = mulberry32(seed * 1_000_003 + i + 1);
    return Array.from({ length }, () => Math.floor(next() * vocab));
  });
}

function machineName(): string {
  const c = cpus();
  return `${c.length}x ${c[0]?.model.trim() ?? "unknown CPU"}`;
}

/** The GPU's name where the backend says it (the CUDA backend's `device.name`), else the CPU's. */
function deviceName(b: Backend): string {
  const dev = (b as { device?: { name?: unknown } }).device;
  if (dev && typeof dev.name === "string") return dev.name;
  return b.name === "cpu" ? (cpus()[0]?.model.trim() ?? "cpu") : b.name;
}

interface Probe {
  readonly name: string;
  readonly backend: string;
  readonly activationDtype: DType;
  readonly bandwidth: Bandwidth | null;
  readonly error?: string;
}

/** Creates the backend the engine will get, to name the device and measure its bandwidth, then frees it. */
async function probeDevice(device: DeviceName, bandwidthGbs: number | undefined): Promise<Probe> {
  const b = await createBackend(device);
  const base = { name: deviceName(b), backend: b.name, activationDtype: b.activationDtype };
  try {
    if (bandwidthGbs !== undefined) return { ...base, bandwidth: { gbs: bandwidthGbs, source: "flag" } };
    try {
      return { ...base, bandwidth: measureBandwidth(b) };
    } catch (e) {
      return { ...base, bandwidth: null, error: e instanceof Error ? e.message : String(e) };
    }
  } finally {
    (b as { dispose?: () => void }).dispose?.();
  }
}

interface RunTimes {
  readonly t0: number;
  /** arrivals[i][k] = when request i's token k arrived (performance.now() ms). */
  readonly arrivals: readonly Float64Array[];
  readonly steps: number;
  /** Mean host time of this run's decode steps, excluding the wait for the device (us). */
  readonly hostUsPerDecodeStep: number;
  readonly idleUsPerDecodeStep: number;
}

/** Submits every prompt at once and records when each token arrives. */
async function runBatch(
  engine: Engine,
  prompts: readonly number[][],
  adapters: readonly string[],
  gen: number,
  onToken?: (total: number) => void,
): Promise<RunTimes> {
  const arrivals = prompts.map(() => new Float64Array(gen));
  let total = 0;
  const before = engine.stats();
  const t0 = performance.now();
  await Promise.all(prompts.map(async (promptIds, i) => {
    const req: GenerateRequest = {
      id: `bench-${i}`,
      promptIds,
      adapter: adapters.length > 0 ? adapters[i % adapters.length]! : null,
      params: { maxTokens: gen, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: true, logprobs: -1 },
    };
    const times = arrivals[i]!;
    let n = 0;
    let reason: string | null = null;
    for await (const o of engine.generate(req)) {
      const now = performance.now();
      for (let j = 0; j < o.tokenIds.length && n < gen; j++) times[n++] = now;
      total += o.tokenIds.length;
      onToken?.(total);
      reason = o.finishReason;
    }
    if (n !== gen) throw new Error(`request ${i} stopped after ${n} of ${gen} tokens (finish reason ${reason ?? "none"})`);
  }));
  const after = engine.stats();
  const decodeSteps = after.decodeSteps - before.decodeSteps;
  return {
    t0, arrivals, steps: after.steps - before.steps,
    // Host time of this run's decode steps only (the warm-up run captures the graphs).
    hostUsPerDecodeStep: decodeSteps > 0 ? (after.decodeHostUs - before.decodeHostUs) / decodeSteps : 0,
    idleUsPerDecodeStep: after.decodeIdleSteps > before.decodeIdleSteps
      ? (after.decodeIdleUs - before.decodeIdleUs) / (after.decodeIdleSteps - before.decodeIdleSteps) : 0,
  };
}

/** KV blocks that hold every sequence at full length: one spare block per sequence for the engine's look-ahead, and one more in hand. */
function kvBlocksFor(batch: number, maxLen: number, blockSize: number): number {
  return batch * (Math.ceil((maxLen + 1) / blockSize) + 1) + 1;
}

/** Bytes of `blocks` KV blocks as the engine counts them (elements of the backend's activation dtype). */
function kvCacheBytes(config: ModelConfig, blocks: number, blockSize: number, dtype: DType): number {
  return blocks * blockSize * config.numLayers * 2 * config.numKvHeads * config.headDim * bytesPerElement(dtype);
}

export async function runOfflineBench(opts: OfflineBenchOptions, progress: ProgressSink): Promise<OfflineBenchResult> {
  const { batch: B, promptLen: P, gen: G, adapters: K, rank: r } = opts;
  const dir = resolve(opts.modelDir);
  const config = loadModelConfig(dir);
  const maxLen = P + G;
  if (maxLen > config.maxPositionEmbeddings) {
    throw new Error(`--prompt-len ${P} + --gen ${G} = ${maxLen} exceeds the model's max_position_embeddings (${config.maxPositionEmbeddings})`);
  }

  let adapterDirs: string[] = [];
  if (K > 0) {
    const cache = opts.adapterCache ?? DEFAULT_ADAPTER_CACHE;
    progress.note(`synthetic adapters: ${K} of rank ${r} on all seven projections (cache ${cache})`);
    adapterDirs = syntheticAdapters(config, K, r, cache, (d) => progress.note(`wrote ${d}`));
  }
  const names = adapterDirs.map((_, i) => `synthetic-${i}`);

  progress.note(opts.bandwidthGbs === undefined ? "measuring device bandwidth" : `device bandwidth ${opts.bandwidthGbs} GB/s (--bandwidth-gbs)`);
  const probe = await probeDevice(opts.device, opts.bandwidthGbs);
  if (probe.bandwidth) progress.note(`bandwidth ${probe.bandwidth.gbs.toFixed(1)} GB/s (${probe.bandwidth.source})`);
  else progress.note(`could not measure the bandwidth (${probe.error}); pass --bandwidth-gbs for the roofline`);

  const blockSize = 16;
  const maxBatchedTokens = opts.maxBatchedTokens ?? Math.max(P, Math.min(B * P, MAX_DEFAULT_BATCHED_TOKENS));
  // A cache that holds every sequence: a preempted sequence would be recomputed, which
  // is not the workload this measures.
  const kvBlocks = kvBlocksFor(B, maxLen, blockSize);
  const engine = await createEngine({
    modelDir: dir,
    modelId: opts.modelName ?? basename(dir),
    adapters: Object.fromEntries(names.map((n, i) => [n, adapterDirs[i]!])),
    device: opts.device,
    loadFormat: opts.loadFormat,
    maxBatch: B,
    maxWaiting: Math.max(4096, B),
    maxModelLen: maxLen,
    maxBatchedTokens,
    blockSize,
    kvCacheBytes: kvCacheBytes(config, kvBlocks, blockSize, probe.activationDtype),
    maxLoras: Math.max(1, K),
    maxLoraRank: Math.max(1, r),
    ...(opts.schedulerSteps !== undefined && { schedulerSteps: opts.schedulerSteps }),
    onProgress: (m) => progress.note(m),
  });
  // With multi-step rounds of n the warm-up runs two rounds (capture, replay) and then two
  // single steps (the timed run's tail, when G - 1 is not a multiple of n): a graph captured
  // in the timed run would count its capture as host time.
  const n = engine.schedulerSteps;
  const warmupGen = Math.min(G, n > 1 ? Math.max(WARMUP_GEN, 2 * n + 3) : WARMUP_GEN);

  let timed: RunTimes;
  let hostPhases: ReturnType<typeof engine.hostPhases> = null;
  let graphLaunch: string | null = null;
  try {
    const { kvBlocksTotal } = engine.stats();
    if (kvBlocksTotal < kvBlocks) {
      throw new Error(`the engine made ${kvBlocksTotal} KV blocks, the benchmark needs ${kvBlocks} (${B} sequences of ${maxLen} tokens); lower --batch or --prompt-len/--gen`);
    }
    const prompts = randomPrompts(B, P, config.vocabSize, opts.seed ?? 0);
    if (opts.warmup) {
      const t = performance.now();
      await runBatch(engine, prompts, names, warmupGen);
      progress.note(`warm-up (${B} requests, ${warmupGen} tokens) in ${((performance.now() - t) / 1000).toFixed(2)} s`);
    }
    engine.hostPhases(true); // the timed run's phases only
    progress.start(`bench ${B}x(${P}+${G})`, B * G, "tokens");
    try {
      timed = await runBatch(engine, prompts, names, G, (n) => progress.update(n));
    } finally {
      progress.stop();
    }
    hostPhases = engine.hostPhases();
    graphLaunch = engine.graphLaunch; // after the run: a failed device setup falls back to the host
  } finally {
    await engine.close();
  }
  const backend = engine.backendName;
  if (backend !== probe.backend) throw new Error(`the engine runs on ${backend} but the bandwidth was measured on ${probe.backend}`);

  // ---- throughput and prefill
  const { t0, arrivals } = timed;
  let end = t0, lastFirst = 0;
  arrivals.forEach((a, i) => {
    end = Math.max(end, a[G - 1]!);
    if (a[0]! > arrivals[lastFirst]![0]!) lastFirst = i;
  });
  const seconds = (end - t0) / 1000;
  const prefillS = (arrivals[lastFirst]![0]! - t0) / 1000;

  // ---- decode steps (see the file header)
  const ref = arrivals[lastFirst]!;
  const stepMs: number[] = [];
  for (let k = 1; k < G; k++) stepMs.push(ref[k]! - ref[k - 1]!);
  const sorted = [...stepMs].sort((a, b) => a - b);
  const mean = stepMs.length > 0 ? stepMs.reduce((s, x) => s + x, 0) / stepMs.length : NaN;

  // ---- roofline
  // A GPTQ base on CUDA is served packed (unless INLAID_QUANT_KERNELS=0): its roofline counts packed bytes.
  const spec = readQuantSpec(dir);
  const packed = spec && backend === "cuda" && process.env.INLAID_QUANT_KERNELS !== "0" ? spec : undefined;
  const bytes = decodeStepBytes(config, { batch: B, promptLen: P, gen: G, adapters: K, rank: r }, storageBytes(backend), packed);
  const bw = probe.bandwidth;
  const rooflineMs = bw ? (bytes.total / (bw.gbs * 1e9)) * 1e3 : null;

  return {
    bench: "offline",
    machine: machineName(),
    device: probe.name,
    backend,
    graph_launch: graphLaunch,
    scheduler_steps: engine.schedulerSteps,
    model: opts.modelName ?? basename(dir),
    load_format: opts.loadFormat,
    shape: {
      architecture: config.architecture,
      layers: config.numLayers,
      hidden: config.hiddenSize,
      intermediate: config.intermediateSize,
      heads: config.numHeads,
      kv_heads: config.numKvHeads,
      head_dim: config.headDim,
      vocab: config.vocabSize,
    },
    batch: B,
    prompt_len: P,
    gen: G,
    adapters: K,
    rank: K > 0 ? r : 0,
    max_batched_tokens: Math.max(maxBatchedTokens, maxLen),
    seconds: round(seconds, 4),
    output_tokens_per_s: round((B * G) / seconds, 1),
    total_tokens_per_s: round((B * (P + G)) / seconds, 1),
    prefill_s: round(prefillS, 3),
    steps: timed.steps,
    decode_step_ms: stepMs.length > 0
      ? { mean: round(mean, 3), p50: round(percentile(sorted, 50), 3), p99: round(percentile(sorted, 99), 3), n: stepMs.length }
      : null,
    decode_tokens_per_s: stepMs.length > 0 ? round(B / (mean / 1000), 1) : null,
    host_us_per_decode_step: round(timed.hostUsPerDecodeStep, 1),
    device_idle_us_per_decode_step: round(timed.idleUsPerDecodeStep, 1),
    ...(hostPhases && { host_phases_us: hostPhases }),
    roofline: {
      bytes_per_step: Math.round(bytes.total),
      weights_bytes: bytes.weights,
      adapter_bytes: bytes.adapters,
      kv_bytes: Math.round(bytes.kv),
      mean_context: bytes.meanContext,
      bandwidth_gbs: bw ? round(bw.gbs, 1) : null,
      bandwidth_source: bw ? bw.source : "none",
      step_ms: rooflineMs === null ? null : round(rooflineMs, 3),
      ratio: stepMs.length > 0 && rooflineMs !== null ? round(mean / rooflineMs, 2) : null,
    },
    node: process.version,
  };
}
