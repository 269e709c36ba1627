// `inlaid quantize` on a device: the GPTQ methods (mlgptq, gptq-mixed, per-task gptq)
// with layer-streamed capture (stream_capture.ts) and an injected GPTQ solver
// (gpu_gptq.ts), layer by layer: a layer's Hessians for every task are captured, folded
// into the aggregate and solved while that layer alone is resident. Same methods, same
// aggregates, same checkpoint layout and mlgptq/ folder as the one-pass CPU path
// (methods.ts); incremental (`--from`) folds new tasks into the checkpoint's cached state.
//
// Hessian caching. The CPU path caches each task's Hessians in the work folder (resume,
// reuse across bit widths). Here a task's Hessians are cached too when they are small
// (up to cacheLimitBytes, default 4 GiB: every demo-sized model); above that they are not
// kept (Llama-2-7B: 22 GB per task in f32), a crashed run captures again, and only the
// aggregate state is stored, in the checkpoint's mlgptq/ as always (22 GB for 7B in f32:
// what incremental quantization needs). Cache keys carry the device ("stream-cuda"), so
// GPU Hessians never stand in for CPU ones or the other way round.

import { existsSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Backend } from "../backend/backend.js";
import { loadPeftAdapter, type PeftAdapter } from "../lora/peft.js";
import { loadModelConfig, type ModelConfig } from "../model/config.js";
import { PROJECTIONS, type Projection } from "../model/linear.js";
import { TextTokenizer } from "../model/tokenizer.js";
import { projDims } from "../model/weights.js";
import { aggregator, type AggregateKind, type AggState } from "./aggregate.js";
import { calibrationIds, readCalibration } from "./calibration.js";
import type { CalibrationSet } from "./capture.js";
import { writeQuantizedCheckpoint } from "./checkpoint.js";
import { makeTempDirBeside, replaceDir } from "./durable.js";
import type { GptqSolver } from "./gpu_gptq.js";
import { hessianSites, moduleName, type HessianSite, type Hessians } from "./hessian.js";
import { baseFingerprint, captureKey, HessianCache } from "./hessian_cache.js";
import { CheckpointLayers, DummyLayers, type LayerSource } from "./layer_source.js";
import { mirrorUpper } from "./linalg.js";
import {
  aggregateOf, manifestOf, openIncremental, resolveQuantizeOptions, validateOptions, type IncrementalOptions, type QuantizeOptions, type QuantizeResult, type QuantTask,
} from "./methods.js";
import { readState, writeMlgptqDir, type Manifest, type ManifestTask } from "./mlgptq_dir.js";
import { SILENT, type LinearStats, type QuantProgress } from "./solve.js";
import { streamCapture, type StreamTask } from "./stream_capture.js";
import type { QuantizedWeight, QuantSpec } from "./types.js";

export interface DeviceQuantizeOptions {
  readonly backend: Backend;
  readonly solver: GptqSolver;
  /** "dummy": random base weights of --model's config.json (benchmarks; nothing is read). */
  readonly loadFormat?: "auto" | "dummy";
  /** Largest per-task Hessians (bytes, f32) kept in the work folder (default 4 GiB). */
  readonly cacheLimitBytes?: number;
  /** A task's calibration token ids, instead of tokenizing its jsonl (benchmarks: random ids).
   * Cache keys still hash calibPath's bytes, so calibPath must identify the ids (e.g. hold them). */
  readonly calibrationIds?: (task: QuantTask) => number[][];
}

export interface DeviceQuantizeResult extends QuantizeResult {
  /** Seconds by phase: load (tokenize, adapters, cached Hessians), capture (forward +
   * Gram sums), fold (aggregating), solve, cache (per-task Hessians into the work folder),
   * write (the checkpoint). */
  readonly phases: { load: number; capture: number; fold: number; solve: number; cache: number; write: number };
  /** Most device memory in use beyond what was in use at the start (cuMemGetInfo, sampled
   * after every chunk and every solved linear); null when the backend cannot tell. */
  readonly peakExtraBytes: number | null;
  readonly device: string;
}

const DEFAULT_STEP_TOKENS = 2048;
const DEFAULT_CACHE_LIMIT = 4 * 2 ** 30;

/** What the device run captured with: recorded in the manifest and the cache keys. */
const deviceLabel = (b: Backend): string => `stream-${b.name}`;

/** A set of tasks solved into one checkpoint. */
interface Target {
  readonly outDir: string;
  readonly kind: AggregateKind;
  /** Indices into the run's task list, folded in this order. */
  readonly tasks: readonly number[];
  readonly state: Map<string, AggState>;
  readonly tokensBefore: readonly number[];
  readonly weights: Map<string, QuantizedWeight>;
}

interface PreparedTask {
  readonly task: QuantTask;
  readonly set: CalibrationSet;
  readonly key: string;
  /** From the work folder, or null: captured in this run. */
  readonly cached: Hessians | null;
  tokens: number;
}

class PeakMemory {
  readonly #backend: Backend;
  readonly #base: number | null;
  #minFree = Infinity;

  constructor(backend: Backend) {
    this.#backend = backend;
    this.#base = backend.memoryInfo ? backend.memoryInfo().free : null;
  }

  sample = (): void => {
    if (this.#base === null) return;
    this.#minFree = Math.min(this.#minFree, this.#backend.memoryInfo!().free);
  };

  get peak(): number | null {
    return this.#base === null ? null : Math.max(0, this.#base - Math.min(this.#minFree, this.#base));
  }
}

function siteBytes(sites: readonly HessianSite[]): number {
  return sites.reduce((a, s) => a + s.inDim * s.inDim * 4, 0);
}

interface RunOptions {
  readonly backend: Backend;
  readonly solver: GptqSolver;
  readonly baseDir: string;
  readonly dummy: boolean;
  readonly config: ModelConfig;
  readonly sites: readonly HessianSite[];
  readonly tasks: readonly PreparedTask[];
  readonly withAdapter: boolean;
  readonly targets: readonly Target[];
  readonly spec: QuantSpec;
  readonly gptq: { readonly staticGroups: boolean; readonly percDamp: number };
  readonly stepTokens: number;
  readonly limit: number | undefined;
  readonly cache: HessianCache;
  readonly cacheLimitBytes: number;
  readonly progress: QuantProgress;
  readonly calibrationIds: ((task: QuantTask) => number[][]) | undefined;
  readonly phases: DeviceQuantizeResult["phases"];
  readonly memory: PeakMemory;
}

/** Captures what is not cached, folds every task into every target and solves, layer by layer. */
function captureAndSolve(r: RunOptions, source: LayerSource): LinearStats[] {
  const { backend: b, config: cfg, progress } = r;
  const t0 = performance.now();
  const tokenizer = r.tasks.some((t) => t.cached === null) && !r.calibrationIds ? TextTokenizer.load(r.baseDir) : null;
  const capture: { index: number; stream: StreamTask }[] = [];
  r.tasks.forEach((t, index) => {
    if (t.cached !== null) return;
    const seqs = r.calibrationIds
      ? r.calibrationIds(t.task).slice(0, t.set.limit)
      : readCalibration(t.set.calibPath, t.set.limit).map((row) => calibrationIds(tokenizer!, row));
    const adapter: PeftAdapter | null = r.withAdapter ? loadPeftAdapter(resolve(t.task.adapterDir!), cfg) : null;
    t.tokens = seqs.reduce((a, s) => a + s.length, 0);
    capture.push({ index, stream: { name: t.task.name, adapter, seqs } });
  });
  // A task's Hessians are kept whole (to cache them) only when they are small.
  const perTaskBytes = siteBytes(r.sites);
  const keep = perTaskBytes <= r.cacheLimitBytes;
  if (capture.length > 0 && !keep) {
    progress.note(`per-task Hessians are ${(perTaskBytes / 2 ** 30).toFixed(1)} GiB each, above the work folder's ${(r.cacheLimitBytes / 2 ** 30).toFixed(1)} GiB limit: not cached (the aggregate still goes to mlgptq/)`);
  }
  const kept = capture.map(() => new Map<string, Float32Array>());
  // Sum mode (stream_capture.ts): a sum aggregate of tasks none of which is cached sums on the
  // device; every task's Hessians are needed on the host only to cache them or for the others.
  const only = r.targets.length === 1 ? r.targets[0]! : null;
  const sumMode = !keep && only !== null && (only.kind === "mean" || only.kind === "pooled") && r.tasks.every((t) => t.cached === null)
    ? {
        // mean's state is sum_t H_t = sum_t (2/n_t) X_t^T X_t; pooled's sum_t n_t H_t = sum_t 2 X_t^T X_t.
        alpha: capture.map((c) => (only.kind === "mean" ? 2 / r.tasks[c.index]!.tokens : 2)),
        initial: (site: HessianSite) => only.state.get(site.name)?.["sum"],
      }
    : undefined;
  r.phases.load += (performance.now() - t0) / 1000;

  const stats: LinearStats[] = [];
  const sitesOf = (l: number) => r.sites.filter((s) => s.layer === l);
  let started = false;
  const timing = streamCapture(b, source, capture.map((c) => c.stream), {
    stepTokens: r.stepTokens,
    onMemory: r.memory.sample,
    onProgress: (done, total) => {
      if (!started) progress.start(`quantize on ${b.name}`, total, "layers");
      started = true;
      progress.update(done);
    },
    ...(sumMode && { sum: sumMode }),
    onLayer: (l, perTask, resident, sums) => {
      const tf = performance.now();
      // Every task's H_t of this layer, in task order: cached, or just captured.
      const hOf = (i: number, site: string): Float32Array => {
        const t = r.tasks[i]!;
        const c = capture.findIndex((x) => x.index === i);
        return t.cached !== null ? t.cached.h.get(site)! : perTask[c]!.h.get(site)!;
      };
      if (keep) perTask.forEach((hs, c) => { for (const [site, h] of hs.h) kept[c]!.set(site, h); });
      for (const target of r.targets) {
        const agg = aggregator(target.kind);
        for (const site of sitesOf(l)) {
          if (sumMode) {
            target.state.set(site.name, { sum: sums.get(site.name)! });
            continue;
          }
          let st = target.state.get(site.name);
          if (!st) target.state.set(site.name, (st = agg.init(site.inDim)));
          for (const i of target.tasks) agg.fold(st, hOf(i, site.name), site.inDim, r.tasks[i]!.tokens);
        }
      }
      const ts = performance.now();
      r.phases.fold += (ts - tf) / 1000;
      // Weights come from the source once per linear, shared by every target.
      const dense = new Map<Projection, Float32Array>();
      const weightOf = (p: Projection): Float32Array => {
        let w = dense.get(p);
        if (!w) dense.set(p, (w = source.weight(l, p, resident)));
        return w;
      };
      for (const target of r.targets) {
        const agg = aggregator(target.kind);
        const tokens = [...target.tokensBefore, ...target.tasks.map((i) => r.tasks[i]!.tokens)];
        for (const site of sitesOf(l)) {
          const h = solverHessian(target.kind, target.state.get(site.name)!, site.inDim, tokens);
          for (const name of site.linears) {
            const proj = PROJECTIONS.find((p) => moduleName(l, p) === name)!;
            const { inDim, outDim } = projDims(cfg, proj);
            const res = r.solver.solve(weightOf(proj), outDim, inDim, h, r.spec, { staticGroups: r.gptq.staticGroups, percDamp: r.gptq.percDamp });
            target.weights.set(name, res.weight);
            stats.push({ name, damp: res.damp, attempts: res.attempts, loss: res.loss, deadColumns: res.deadColumns });
            r.memory.sample();
          }
        }
      }
      r.phases.solve += (performance.now() - ts) / 1000;
    },
  });
  progress.stop();
  r.phases.capture += timing.captureSeconds;
  const tc = performance.now();
  if (keep) {
    capture.forEach((c, k) => {
      const t = r.tasks[c.index]!;
      r.cache.save(t.key, { tokens: t.tokens, h: kept[k]! }, t.task.name);
    });
  }
  r.phases.cache += (performance.now() - tc) / 1000;
  return stats;
}

/**
 * The aggregate's Hessian as the solver takes it (f32, symmetric). For the sum aggregates
 * (mean, pooled) straight from the f32 state: fround(sum / d), which is what converting
 * finish()'s float64 result gives, without a 1 GB float64 copy per 7B down_proj; mirrored
 * from the upper triangle, since device sums may differ between triangles in the last bit.
 */
function solverHessian(kind: AggregateKind, st: AggState, K: number, tokens: readonly number[]): Float32Array {
  if (kind !== "mean" && kind !== "pooled") return new Float32Array(aggregator(kind).finish(st, K, tokens));
  const d = kind === "mean" ? tokens.length : tokens.reduce((a, b) => a + b, 0);
  const sum = st["sum"]!;
  const h = new Float32Array(K * K);
  for (let i = 0; i < h.length; i++) h[i] = sum[i]! / d;
  mirrorUpper(h, K);
  return h;
}

function openSource(backend: Backend, cfg: ModelConfig, baseDir: string, dummy: boolean): LayerSource {
  if (dummy) return new DummyLayers(backend, cfg);
  if (!existsSync(join(baseDir, "model.safetensors")) && !existsSync(join(baseDir, "model.safetensors.index.json"))) {
    throw new Error(`${baseDir} has no model.safetensors (or index); for random weights of its config.json use --load-format dummy`);
  }
  return new CheckpointLayers(backend, cfg, baseDir);
}

/** Loads cached Hessians and fills in the cache keys of every task. */
function prepareTasks(
  tasks: readonly QuantTask[], withAdapter: boolean, fingerprint: string, limit: number | undefined, stepTokens: number,
  device: string, cache: HessianCache, sites: readonly HessianSite[], progress: QuantProgress,
): PreparedTask[] {
  return tasks.map((task) => {
    const set: CalibrationSet = { adapterDir: withAdapter ? task.adapterDir : null, calibPath: task.calibPath, ...(limit !== undefined && { limit }) };
    const key = captureKey(fingerprint, set, stepTokens, device);
    const cached = cache.load(key, sites);
    const how = withAdapter ? "adapter on" : "no adapter";
    progress.note(cached ? `task ${task.name} (${how}): Hessians from the work folder (${cached.tokens} tokens)` : `task ${task.name} (${how}): capturing Hessians on ${device}`);
    return { task, set, key, cached, tokens: cached?.tokens ?? 0 };
  });
}

function manifestEntry(t: PreparedTask): ManifestTask {
  return { name: t.task.name, adapter: t.task.adapterDir === null ? null : resolve(t.task.adapterDir), calib: resolve(t.task.calibPath), tokens: t.tokens, key: t.key };
}

/** `inlaid quantize --device cuda` (any backend): quantize() of methods.ts, layer-streamed on the backend. */
export function quantizeOnDevice(o: QuantizeOptions & DeviceQuantizeOptions): DeviceQuantizeResult {
  const t0 = performance.now();
  validateOptions(o);
  if (o.method === "rtn") throw new Error("rtn needs no calibration forward; run it with --device cpu");
  const { progress, baseDir, outDir, workDir, staticGroups, percDamp, stepTokens } = resolveQuantizeOptions(o, DEFAULT_STEP_TOKENS);
  const dummy = o.loadFormat === "dummy";
  const memory = new PeakMemory(o.backend);
  const phases = { load: 0, capture: 0, fold: 0, solve: 0, cache: 0, write: 0 };
  const cfg = loadModelConfig(baseDir);
  const sites = hessianSites(cfg);
  const fingerprint = baseFingerprint(baseDir);
  const device = deviceLabel(o.backend);
  const cache = new HessianCache(workDir);
  const withAdapter = o.method !== "gptq-mixed";
  const tl = performance.now();
  const tasks = prepareTasks(o.tasks, withAdapter, fingerprint, o.calibLimit, stepTokens, device, cache, sites, progress);
  phases.load += (performance.now() - tl) / 1000;

  const kind = o.method === "gptq" ? "mean" : aggregateOf(o.method, o.aggregate)!;
  const tmp = o.method === "gptq" ? makeTempDirBeside(outDir) : null;
  const targets: Target[] = (o.method === "gptq" ? tasks.map((_, i) => [i]) : [tasks.map((_, i) => i)]).map((idx) => ({
    outDir: tmp !== null ? join(tmp, tasks[idx[0]!]!.task.name) : outDir,
    kind, tasks: idx, state: new Map(), tokensBefore: [], weights: new Map(),
  }));
  const source = openSource(o.backend, cfg, baseDir, dummy);
  let stats: LinearStats[];
  try {
    stats = captureAndSolve({
      backend: o.backend, solver: o.solver, baseDir, dummy, config: cfg, sites, tasks, withAdapter, targets, spec: o.spec,
      gptq: { staticGroups, percDamp }, stepTokens, limit: o.calibLimit, cache, cacheLimitBytes: o.cacheLimitBytes ?? DEFAULT_CACHE_LIMIT,
      progress, calibrationIds: o.calibrationIds, phases, memory,
    }, source);
    const tw = performance.now();
    const meta = { method: o.method, spec: o.spec, staticGroups, percDamp, stepTokens, limit: o.calibLimit };
    const base = { path: baseDir, fingerprint };
    for (const target of targets) {
      const m = manifestOf(meta, o.method === "gptq" ? null : kind, base, sites, target.tasks.map((i) => manifestEntry(tasks[i]!)));
      const manifest: Manifest = { ...m, calibration: { ...m.calibration, device } };
      writeQuantizedCheckpoint({
        baseDir, outDir: target.outDir, spec: o.spec, weights: target.weights, dampPercent: percDamp, baseTensors: source.tensors(),
        extra: (dir) => writeMlgptqDir(dir, manifest, target.state),
        onProgress: (msg) => progress.note(msg),
      });
    }
    if (tmp !== null) replaceDir(tmp, outDir);
    phases.write += (performance.now() - tw) / 1000;
  } catch (e) {
    if (tmp !== null) rmSync(tmp, { recursive: true, force: true });
    throw e;
  } finally {
    source.close();
  }
  if (!o.keepWork) rmSync(workDir, { recursive: true, force: true });
  const outDirs = o.method === "gptq" ? tasks.map((t) => join(outDir, t.task.name)) : [outDir];
  return { outDirs, stats, seconds: (performance.now() - t0) / 1000, phases, peakExtraBytes: memory.peak, device };
}

/** `inlaid quantize --from QUANT_DIR --device cuda`: quantizeIncremental of methods.ts, layer-streamed. */
export function quantizeIncrementalOnDevice(o: IncrementalOptions & DeviceQuantizeOptions): DeviceQuantizeResult {
  const t0 = performance.now();
  const progress = o.progress ?? SILENT;
  const { fromDir, outDir, manifest: m, method, spec, baseDir, fingerprint } = openIncremental(o);
  const device = deviceLabel(o.backend);
  if ((m.calibration.device ?? "cpu") !== device) {
    progress.note(`${fromDir}'s Hessians were captured on ${m.calibration.device ?? "cpu"}, the new tasks' on ${device}: the result is a valid checkpoint but not byte-identical to quantizing every task on one device`);
  }
  const memory = new PeakMemory(o.backend);
  const phases = { load: 0, capture: 0, fold: 0, solve: 0, cache: 0, write: 0 };
  const cfg = loadModelConfig(baseDir);
  const sites = hessianSites(cfg);
  const workDir = resolve(o.workDir ?? `${outDir}.work`);
  const cache = new HessianCache(workDir);
  const kind = m.aggregate!;
  const tl = performance.now();
  const state = readState(fromDir, m, Object.keys(aggregator(kind).init(1)));
  const limit = m.calibration.limit ?? undefined;
  const stepTokens = m.calibration.step_tokens;
  progress.note(`${fromDir}: ${m.tasks.length} task(s) cached (${m.tasks.map((t) => t.name).join(", ")}), adding ${o.tasks.map((t) => t.name).join(", ")}`);
  const tasks = prepareTasks(o.tasks, method === "mlgptq", fingerprint, limit, stepTokens, device, cache, sites, progress);
  phases.load += (performance.now() - tl) / 1000;
  const target: Target = { outDir, kind, tasks: tasks.map((_, i) => i), state, tokensBefore: m.tasks.map((t) => t.tokens), weights: new Map() };
  const dummy = o.loadFormat === "dummy";
  const source = openSource(o.backend, cfg, baseDir, dummy);
  let stats: LinearStats[];
  try {
    stats = captureAndSolve({
      backend: o.backend, solver: o.solver, baseDir, dummy, config: cfg, sites, tasks, withAdapter: method === "mlgptq", targets: [target], spec,
      gptq: { staticGroups: m.static_groups, percDamp: m.damp_percent }, stepTokens, limit, cache, cacheLimitBytes: o.cacheLimitBytes ?? DEFAULT_CACHE_LIMIT,
      progress, calibrationIds: o.calibrationIds, phases, memory,
    }, source);
    const tw = performance.now();
    const manifest: Manifest = {
      ...m, base: { path: baseDir, fingerprint }, tasks: [...m.tasks, ...tasks.map(manifestEntry)],
      calibration: { ...m.calibration, device },
    };
    writeQuantizedCheckpoint({
      baseDir, outDir, spec, weights: target.weights, dampPercent: m.damp_percent, baseTensors: source.tensors(),
      extra: (dir) => writeMlgptqDir(dir, manifest, state),
      onProgress: (msg) => progress.note(msg),
    });
    phases.write += (performance.now() - tw) / 1000;
  } finally {
    source.close();
  }
  if (!o.keepWork) rmSync(workDir, { recursive: true, force: true });
  return { outDirs: [outDir], stats, seconds: (performance.now() - t0) / 1000, phases, peakExtraBytes: memory.peak, device };
}
