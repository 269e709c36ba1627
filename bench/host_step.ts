// The engine's JavaScript host work per decode step, measured on the CPU without a device.
//
// The real Engine (scheduling, batch building, token handling, output streaming) drives a
// stand-in backend whose forward and sampling cost nothing and whose prepare() packs each
// step with step_layout's packStep into an ArrayBuffer laid out as CudaBackend.prepare's
// pinned staging buffer (same capacity as `inlaid bench` reserves; no upload). What this
// measures is therefore the engine's and packStep's JS work and allocation, NOT the GPU
// host's time per step: FFI calls (upload, events, graph launch, sampling) are absent,
// and the machine differs. Use it to compare builds on one machine.
//
// The workload mirrors `inlaid bench --config llama-2-7b` (its defaults): B requests of
// P random prompt tokens, G tokens each (EOS ignored, greedy), K adapters round-robin,
// block size 16, every prompt prefilled in one step. Tokens are pseudo-random ids of the
// model's vocabulary, as a randomly initialized model's argmax would be.
//
//   npx tsx bench/host_step.ts [--config DIR] [--batch 32] [--prompt-len 128] [--gen 128]
//                              [--adapters 8] [--rounds 20] [--warmup-rounds 5] [--evict-kib 0]
//                              [--compact 0|1] [--steps N]
//
// --steps N runs N decode steps per scheduling round (EngineOptions.schedulerSteps; the
// stand-in's decodeSteps returns N results at once): the engine's host work per decode step
// is then a round's share. Allocation figures are per prepare() call (per round).
// --compact 1 packs with step_layout's compact layout (decode steps' token rows in
// seqs-sized regions; a smaller upload), which CudaBackend does not use yet.
// --evict-kib N walks N KiB of unrelated memory while each step "computes" (in the wait
// for its tokens, which is not host time), as the driver's graph launch and
// synchronization do on the GPU host: the engine's next host work then starts with
// cold caches, as it does there.
//
// Prints one JSON object: per decode-step phase p50/p90/mean microseconds (the engine's
// INLAID_PROFILE_STEPS phases, plus packStep timed inside prepare), the engine's own mean
// host time per decode step, and heap bytes allocated per decode step with the GCs seen.
// Phases and allocation come from two separate engines (profiling itself allocates).

import { PerformanceObserver, constants as perfConstants } from "node:perf_hooks";
import { resolve } from "node:path";
import { getHeapStatistics } from "node:v8";
import type { Backend, KvCache, KvCacheSpec, PendingSample, PendingSteps, PreparedStep, SampleResult, StepBatch, Tensor } from "../src/backend/backend.js";
import { capacityShortfall, packStep, stagingViews, stepLayout, type StagingViews, type StepLayout } from "../src/backend/cuda/step_layout.js";
import { Engine } from "../src/engine/engine.js";
import type { GenerateRequest } from "../src/engine/types.js";
import { loadModelConfig, type ModelConfig } from "../src/model/config.js";
import type { LlamaModel } from "../src/model/llama.js";
import { TextTokenizer } from "../src/model/tokenizer.js";
import type { AdapterPool } from "../src/lora/adapter_pool.js";
import type { AdapterRegistry } from "../src/lora/registry.js";
import { createPolicy } from "../src/scheduler/index.js";

interface Options {
  config: string;
  batch: number;
  promptLen: number;
  gen: number;
  adapters: number;
  rounds: number;
  warmupRounds: number;
  evictKib: number;
  compact: boolean;
  steps: number;
}

function parseArgs(argv: string[]): Options {
  const o: Options = { config: "bench/configs/llama-2-7b", batch: 32, promptLen: 128, gen: 128, adapters: 8, rounds: 20, warmupRounds: 5, evictKib: 0, compact: false, steps: 1 };
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i]!, v = argv[i + 1];
    if (v === undefined) throw new Error(`${k} needs a value`);
    const n = Number(v);
    switch (k) {
      case "--config": o.config = v; break;
      case "--batch": o.batch = n; break;
      case "--prompt-len": o.promptLen = n; break;
      case "--gen": o.gen = n; break;
      case "--adapters": o.adapters = n; break;
      case "--rounds": o.rounds = n; break;
      case "--warmup-rounds": o.warmupRounds = n; break;
      case "--evict-kib": o.evictKib = n; break;
      case "--compact": o.compact = n === 1; break;
      case "--steps": o.steps = n; break;
      default: throw new Error(`unknown option ${k}`);
    }
  }
  return o;
}

const stats = (xs: number[]): { p50: number; p90: number; mean: number } => {
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number): number => s[Math.floor(q * (s.length - 1))] ?? 0;
  return { p50: +at(0.5).toFixed(2), p90: +at(0.9).toFixed(2), mean: +(s.reduce((a, b) => a + b, 0) / Math.max(1, s.length)).toFixed(2) };
};

/** A backend whose device work is free: prepare() packs like CudaBackend, sampling returns pseudo-random ids. */
class HostOnlyBackend {
  readonly name = "host-only";
  readonly activationDtype = "f32";
  readonly #layout: StepLayout;
  readonly #views: StagingViews;
  readonly #logits: Tensor = { shape: [1, 1], dtype: "f32" };
  readonly #tokens: Int32Array;
  readonly #result: SampleResult;
  readonly #pending: PendingSample;
  readonly #prepared: { batch: StepBatch };
  #rng = 12345;
  /** Per decode step, while recording: packStep microseconds, and used heap bytes at prepare(). */
  recording = false;
  readonly packUs: number[] = [];
  readonly heapAt: number[] = [];
  copyWords = 0;

  readonly #evict: Int32Array;
  evictSum = 0;

  constructor(capacity: { tokens: number; seqs: number; blocksPerSeq: number }, readonly vocab: number, evictKib: number, compact: boolean) {
    this.#evict = new Int32Array(evictKib * 256);
    this.#layout = stepLayout(capacity, { compact });
    this.#views = stagingViews(new ArrayBuffer(this.#layout.totalWords * 4));
    this.#tokens = new Int32Array(capacity.seqs);
    this.#result = { tokens: this.#tokens, logprobs: new Float32Array(capacity.seqs), topIds: new Int32Array(0), topLogprobs: new Float32Array(0) };
    this.#pending = {
      wait: () => {
        // One read per 64-byte line is enough to displace the cache's contents.
        const e = this.#evict;
        let sum = 0;
        for (let i = 0; i < e.length; i += 16) sum += e[i]!;
        this.evictSum += sum;
        return this.#result;
      },
    };
    this.#prepared = { batch: undefined as unknown as StepBatch };
  }

  prepare(batch: StepBatch): PreparedStep {
    const decode = batch.numTokens === batch.numSeqs;
    if (this.recording && decode) this.heapAt.push(getHeapStatistics().used_heap_size);
    const short = capacityShortfall(batch, this.#layout.capacity);
    if (short !== null) throw new Error(`step does not fit the bench's layout: ${short}`);
    const t = performance.now();
    const packed = packStep(batch, this.#layout, this.#views);
    const dt = performance.now() - t;
    if (this.recording && decode) {
      this.packUs.push(dt * 1000);
      this.copyWords = packed.copyWords;
    }
    this.#prepared.batch = batch;
    return this.#prepared;
  }

  replay(_key: string, _forward: () => Tensor): Tensor {
    return this.#logits;
  }

  sampleAsync(_logits: Tensor, step: PreparedStep): PendingSample {
    const m = step.batch.sampleRows.length;
    let x = this.#rng;
    for (let r = 0; r < m; r++) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      this.#tokens[r] = x % this.vocab;
    }
    this.#rng = x;
    return this.#pending;
  }

  sample(logits: Tensor, step: PreparedStep): SampleResult {
    return this.sampleAsync(logits, step).wait();
  }

  /** n steps' pseudo-random tokens at once (Backend.decodeSteps), the caches walked once. */
  decodeSteps(n: number, _key: string, _forward: unknown, step: PreparedStep): PendingSteps {
    const m = step.batch.sampleRows.length;
    const results: SampleResult[] = [];
    let x = this.#rng;
    for (let j = 0; j < n; j++) {
      const tokens = new Int32Array(m);
      for (let r = 0; r < m; r++) {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        tokens[r] = x % this.vocab;
      }
      results.push({ tokens, logprobs: new Float32Array(m), topIds: new Int32Array(0), topLogprobs: new Float32Array(0) });
    }
    this.#rng = x;
    return {
      wait: () => {
        this.#pending.wait();
        return results;
      },
    };
  }

  createKvCache(spec: KvCacheSpec): KvCache {
    return { spec };
  }

  freeKvCache(): void {}
}

function makeEngine(o: Options, config: ModelConfig, tokenizer: TextTokenizer, profile: boolean): { engine: Engine; backend: HostOnlyBackend; names: string[] } {
  const maxLen = o.promptLen + o.gen;
  const blockSize = 16;
  // As `inlaid bench` sizes them (src/bench/offline.ts, createEngine, CudaBackend.reserve).
  const maxBatchedTokens = Math.max(o.promptLen, Math.min(o.batch * o.promptLen, 8192), maxLen);
  const maxTokens = maxBatchedTokens + o.batch;
  const blocksPerSeq = Math.ceil(maxLen / blockSize);
  const backend = new HostOnlyBackend({ tokens: maxTokens, seqs: o.batch, blocksPerSeq }, config.vocabSize, o.evictKib, o.compact);
  const names = Array.from({ length: o.adapters }, (_, i) => `synthetic-${i}`);
  const registered = new Map(names.map((name, id) => [name, { id, name, path: "", adapter: { maxRank: 16 } }]));
  const registry = { get: (n: string) => registered.get(n), list: () => [...registered.values()] };
  const pool = { acquire: (id: number) => id, release: () => {}, evict: () => {}, dispose: () => {} };
  const model = { limits: { maxTokens, maxSeqs: o.batch }, forward: () => backend.replay("", () => ({ shape: [1], dtype: "f32" })) };
  const prev = process.env.INLAID_PROFILE_STEPS;
  process.env.INLAID_PROFILE_STEPS = profile ? "1" : "0";
  const engine = new Engine(
    config, tokenizer, backend as unknown as Backend, model as unknown as LlamaModel,
    registry as unknown as AdapterRegistry, pool as unknown as AdapterPool,
    {
      maxBatch: o.batch, maxWaiting: 4096, maxModelLen: maxLen, maxBatchedTokens, blockSize,
      numBlocks: o.batch * (Math.ceil((maxLen + 1) / blockSize) + 1) + 1, modelId: "bench", policy: createPolicy("fcfs"),
      schedulerSteps: o.steps,
    },
  );
  if (prev === undefined) delete process.env.INLAID_PROFILE_STEPS;
  else process.env.INLAID_PROFILE_STEPS = prev;
  return { engine, backend, names };
}

async function runRound(engine: Engine, o: Options, names: string[], vocab: number, round: number): Promise<void> {
  let x = 777 + round;
  const next = (): number => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) % vocab;
  await Promise.all(Array.from({ length: o.batch }, async (_, i) => {
    const req: GenerateRequest = {
      id: `host-${round}-${i}`,
      promptIds: Array.from({ length: o.promptLen }, next),
      adapter: names.length > 0 ? names[i % names.length]! : null,
      params: { maxTokens: o.gen, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: true, logprobs: -1 },
    };
    let n = 0;
    for await (const out of engine.generate(req)) n += out.tokenIds.length;
    if (n !== o.gen) throw new Error(`request ${i} got ${n} of ${o.gen} tokens`);
  }));
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const dir = resolve(o.config);
  const config = loadModelConfig(dir);
  const tokenizer = TextTokenizer.load(dir);

  // Pass 1: phase times (the engine's profile) and packStep.
  const a = makeEngine(o, config, tokenizer, true);
  for (let r = 0; r < o.warmupRounds; r++) await runRound(a.engine, o, a.names, config.vocabSize, r);
  a.engine.hostPhases(true);
  const s0 = a.engine.stats();
  a.backend.recording = true;
  for (let r = 0; r < o.rounds; r++) await runRound(a.engine, o, a.names, config.vocabSize, 1000 + r);
  a.backend.recording = false;
  const s1 = a.engine.stats();
  const phases = a.engine.hostPhases()!;
  await a.engine.close();

  // Pass 2: allocation, without profiling. Used heap is read at each decode step's
  // prepare(); a step's bytes are the rise to the next read, over steps without a GC
  // between (a drop marks one), less what reading the heap statistics itself allocates.
  const b = makeEngine(o, config, tokenizer, false);
  for (let r = 0; r < o.warmupRounds; r++) await runRound(b.engine, o, b.names, config.vocabSize, r);
  const gcs = { minor: 0, major: 0, ms: 0 };
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const kind = (e as unknown as { detail?: { kind?: number } }).detail?.kind;
      if (kind === perfConstants.NODE_PERFORMANCE_GC_MINOR) gcs.minor++;
      else gcs.major++;
      gcs.ms += e.duration;
    }
  });
  obs.observe({ entryTypes: ["gc"] });
  const t0 = b.engine.stats();
  b.backend.recording = true;
  for (let r = 0; r < o.rounds; r++) await runRound(b.engine, o, b.names, config.vocabSize, 1000 + r);
  b.backend.recording = false;
  const t1 = b.engine.stats();
  await new Promise((r) => setImmediate(r));
  obs.disconnect();
  await b.engine.close();
  const probe: number[] = [];
  for (let i = 0; i < 200; i++) probe.push(getHeapStatistics().used_heap_size);
  const probeDeltas = probe.slice(1).map((v, i) => v - probe[i]!).filter((d) => d > 0);
  const probeBytes = stats(probeDeltas).p50;
  const h = b.backend.heapAt;
  // Consecutive reads within one round only (a round's last step and the next round's first are not adjacent steps).
  const perStep: number[] = [];
  const stepsPerRound = o.gen - 1;
  for (let i = 1; i < h.length; i++) {
    if (i % stepsPerRound === 0) continue;
    const d = h[i]! - h[i - 1]!;
    if (d >= 0) perStep.push(d - probeBytes);
  }
  const decodeSteps = t1.decodeSteps - t0.decodeSteps;

  const us = (k: string): { p50: number; p90: number; mean: number } => phases[k] ?? { p50: 0, p90: 0, mean: 0 };
  console.log(JSON.stringify({
    bench: "host_step (engine + packStep JS host work on the CPU; no device, no FFI)",
    node: process.version,
    workload: { config: o.config, batch: o.batch, prompt_len: o.promptLen, gen: o.gen, adapters: o.adapters, rounds: o.rounds, warmup_rounds: o.warmupRounds, evict_kib: o.evictKib, compact_layout: o.compact, scheduler_steps: o.steps },
    decode_steps: s1.decodeSteps - s0.decodeSteps,
    phases_us: {
      schedule: us("schedule"),
      buildBatch: us("buildBatch"),
      prepare: us("prepare"),
      packStep: stats(a.backend.packUs),
      forward: us("forward"),
      sampleIssue: us("sampleIssue"),
      tokens: us("tokens"),
      outputs: us("outputs"),
      eventLoop: us("eventLoop"),
    },
    engine_host_us_per_decode_step: +((s1.decodeHostUs - s0.decodeHostUs) / Math.max(1, s1.decodeSteps - s0.decodeSteps)).toFixed(2),
    pack_copy_bytes: a.backend.copyWords * 4,
    alloc: {
      bytes_per_decode_step: stats(perStep),
      steps_sampled: perStep.length,
      heap_probe_bytes: probeBytes,
      unprofiled_engine_host_us_per_decode_step: +((t1.decodeHostUs - t0.decodeHostUs) / Math.max(1, decodeSteps)).toFixed(2),
      gc_minor_per_1000_steps: +((gcs.minor * 1000) / Math.max(1, decodeSteps)).toFixed(1),
      gc_major: gcs.major,
      gc_ms_per_1000_steps: +((gcs.ms * 1000) / Math.max(1, decodeSteps)).toFixed(2),
    },
  }, null, 1));
}

await main();
