// The quantization methods of `inlaid quantize`, end to end: Hessians per task (from the
// work-folder cache or captured), aggregated, solved, written atomically.
//
//   rtn         round to nearest; no calibration data
//   gptq-mixed  every task's calibration data through the base WITHOUT adapters, one
//               pooled Hessian (the naive multi-task baseline)
//   gptq        per task: that task's data with its adapter active, one checkpoint per
//               task in OUT/TASK/ (not shareable: the quality ceiling)
//   mlgptq      per task with its adapter active, per-token-normalized H_t, aggregated
//               (--aggregate; default mean, see DEFAULT_AGGREGATE)
//
// Every Hessian comes from the unquantized base, and aggregates fold tasks in order in
// f32, so `incremental` (adding tasks to a checkpoint's cached state) writes the same
// bytes as quantizing all tasks at once.

import { existsSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { loadModelConfig } from "../model/config.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { aggregator, type Aggregate, type AggregateKind, type AggState } from "./aggregate.js";
import { CALIBRATION_RECIPE } from "./calibration.js";
import { HessianCapture, type CalibrationSet } from "./capture.js";
import { writeQuantizedCheckpoint } from "./checkpoint.js";
import { makeTempDirBeside, replaceDir } from "./durable.js";
import { hessianSites, type HessianSite, type Hessians } from "./hessian.js";
import { baseFingerprint, captureKey, HessianCache } from "./hessian_cache.js";
import { manifestSites, readManifest, readState, specOfManifest, writeMlgptqDir, type Manifest, type ManifestTask } from "./mlgptq_dir.js";
import { quantizeModelRtn } from "./rtn.js";
import { SILENT, solveModel, type LinearStats, type QuantProgress } from "./solve.js";
import type { QuantSpec } from "./types.js";

export const METHODS = ["mlgptq", "gptq", "gptq-mixed", "rtn"] as const;
export type Method = (typeof METHODS)[number];

/**
 * The aggregate mlgptq uses unless told otherwise: the one that measured best on the
 * quality harness (bench/quality.ts; table and analysis in docs/mlgptq.md). DESIGN §3's
 * element-wise max lost there: it is indefinite at almost every site of the demo
 * (damping 0.4-12.8x the mean diagonal instead of 1%) and inflates cross-channel terms
 * beyond any task's, so its layers fit every task's activations worse than the mean's
 * (2.2x the output error at 3 bits, 1.9x at 2 bits), and at 3 bits it scored 96.8 exact
 * match against GPTQ-mixed's 96.9 (mean: 97.0).
 */
export const DEFAULT_AGGREGATE: Aggregate = "mean";

export interface QuantTask {
  readonly name: string;
  /** PEFT adapter folder (null: the base alone). */
  readonly adapterDir: string | null;
  readonly calibPath: string;
}

export interface QuantizeOptions {
  readonly baseDir: string;
  readonly outDir: string;
  readonly method: Method;
  readonly spec: QuantSpec;
  /** mlgptq only (default DEFAULT_AGGREGATE). */
  readonly aggregate?: Aggregate;
  readonly staticGroups?: boolean;
  /** Initial damping, fraction of mean(diag H) (default 0.01). */
  readonly percDamp?: number;
  readonly tasks: readonly QuantTask[];
  /** Calibration rows per task (default: all). */
  readonly calibLimit?: number;
  /** Tokens per calibration forward step (default 512; part of the cache key). */
  readonly stepTokens?: number;
  /** Per-task Hessian cache (default OUT.work beside --out). */
  readonly workDir?: string;
  /** Keep the work folder after success (default: removed). */
  readonly keepWork?: boolean;
  readonly progress?: QuantProgress;
}

export interface QuantizeResult {
  /** Checkpoints written: --out, or OUT/TASK for per-task gptq. */
  readonly outDirs: readonly string[];
  readonly stats: readonly LinearStats[];
  readonly seconds: number;
}

/** The options both quantize entry points (CPU and layer-streamed) resolve alike: absolute
 * paths and defaults; the step length's default is the caller's. */
export function resolveQuantizeOptions(o: QuantizeOptions, defaultStepTokens: number) {
  const outDir = resolve(o.outDir);
  return {
    progress: o.progress ?? SILENT,
    baseDir: resolve(o.baseDir),
    outDir,
    workDir: resolve(o.workDir ?? `${outDir}.work`),
    staticGroups: o.staticGroups ?? false,
    percDamp: o.percDamp ?? 0.01,
    stepTokens: o.stepTokens ?? defaultStepTokens,
  };
}

/** Fails early, before any work, with a message that names the option. */
export function validateOptions(o: Pick<QuantizeOptions, "method" | "spec" | "tasks" | "aggregate">): void {
  if (o.method === "rtn" && o.spec.descAct) {
    throw new Error("--act-order needs a Hessian to order inputs by, and rtn has none; drop --act-order or use a GPTQ method");
  }
  if (o.method !== "rtn" && o.tasks.length === 0) throw new Error(`--method ${o.method} needs at least one --task NAME=ADAPTER_DIR:CALIB.jsonl`);
  if (o.aggregate !== undefined && o.method !== "mlgptq") throw new Error(`--aggregate applies to mlgptq only, not ${o.method}`);
  const names = new Set<string>();
  for (const t of o.tasks) {
    if (names.has(t.name)) throw new Error(`task '${t.name}' is given twice`);
    names.add(t.name);
    if (!existsSync(t.calibPath)) throw new Error(`task ${t.name}: calibration file ${t.calibPath} does not exist`);
    if (t.adapterDir !== null && !existsSync(join(t.adapterDir, "adapter_config.json"))) {
      throw new Error(`task ${t.name}: ${t.adapterDir} is not a PEFT adapter folder (no adapter_config.json)`);
    }
    if ((o.method === "mlgptq" || o.method === "gptq") && t.adapterDir === null) {
      throw new Error(`task ${t.name}: --method ${o.method} runs calibration with the task's adapter; give NAME=ADAPTER_DIR:CALIB.jsonl`);
    }
  }
}

/** Where per-task Hessians come from: the work-folder cache, else a capture (base loaded once, lazily). */
export class HessianSource {
  readonly sites: readonly HessianSite[];
  readonly fingerprint: string;
  readonly #cache: HessianCache;
  #capture: HessianCapture | null = null;

  constructor(
    readonly baseDir: string,
    workDir: string,
    readonly limit: number | undefined,
    readonly stepTokens: number,
    readonly progress: QuantProgress,
  ) {
    this.sites = hessianSites(loadModelConfig(baseDir));
    this.fingerprint = baseFingerprint(baseDir);
    this.#cache = new HessianCache(workDir);
  }

  /** H_t of one task with its adapter on (withAdapter) or off; cached in the work folder. */
  get(task: QuantTask, withAdapter: boolean): { hs: Hessians; key: string } {
    const set: CalibrationSet = { adapterDir: withAdapter ? task.adapterDir : null, calibPath: task.calibPath, ...(this.limit !== undefined && { limit: this.limit }) };
    const key = captureKey(this.fingerprint, set, this.stepTokens);
    const how = set.adapterDir === null ? "no adapter" : "adapter on";
    const cached = this.#cache.load(key, this.sites);
    if (cached) {
      this.progress.note(`task ${task.name} (${how}): Hessians from the work folder (${cached.tokens} tokens)`);
      return { hs: cached, key };
    }
    this.progress.note(`task ${task.name} (${how}): capturing Hessians`);
    this.#capture ??= HessianCapture.open(this.baseDir);
    let started = false;
    let hs: Hessians;
    try {
      hs = this.#capture.capture(set, {
        stepTokens: this.stepTokens,
        onProgress: (done, total) => {
          if (!started) this.progress.start(`capture ${task.name} (${how})`, total, "sequences");
          started = true;
          this.progress.update(done);
        },
      });
    } finally {
      this.progress.stop();
    }
    this.#cache.save(key, hs, task.name);
    return { hs, key };
  }
}

/** Folds tasks into an aggregate state per site, in order; returns the manifest entries too. */
function foldTasks(
  source: HessianSource,
  kind: AggregateKind,
  tasks: readonly QuantTask[],
  withAdapter: boolean,
  state: Map<string, AggState>,
): ManifestTask[] {
  const agg = aggregator(kind);
  const entries: ManifestTask[] = [];
  for (const t of tasks) {
    const { hs, key } = source.get(t, withAdapter);
    for (const s of source.sites) {
      let st = state.get(s.name);
      if (!st) state.set(s.name, (st = agg.init(s.inDim)));
      agg.fold(st, hs.h.get(s.name)!, s.inDim, hs.tokens);
    }
    entries.push({ name: t.name, adapter: t.adapterDir === null ? null : resolve(t.adapterDir), calib: resolve(t.calibPath), tokens: hs.tokens, key });
  }
  return entries;
}

export function manifestOf(
  o: { method: Method; spec: QuantSpec; staticGroups: boolean; percDamp: number; stepTokens: number; limit: number | undefined },
  aggregate: AggregateKind | null,
  base: { path: string; fingerprint: string },
  sites: readonly HessianSite[],
  tasks: readonly ManifestTask[],
): Manifest {
  return {
    format: "inlaid-mlgptq/1",
    method: o.method,
    aggregate,
    spec: { bits: o.spec.bits, group_size: o.spec.groupSize, sym: o.spec.sym, desc_act: o.spec.descAct },
    static_groups: o.staticGroups,
    damp_percent: o.percDamp,
    base,
    calibration: { recipe: CALIBRATION_RECIPE, limit: o.limit ?? null, step_tokens: o.stepTokens, adapters_active: o.method !== "gptq-mixed" },
    tasks,
    sites: manifestSites(sites),
  };
}

export function aggregateOf(method: Method, aggregate: Aggregate | undefined): AggregateKind | null {
  if (method === "mlgptq") return aggregate ?? DEFAULT_AGGREGATE;
  if (method === "gptq-mixed") return "pooled";
  return null;
}

/** Solves with an aggregate state and writes one checkpoint with its mlgptq/ folder. */
function solveAndWrite(
  baseDir: string,
  outDir: string,
  source: HessianSource,
  kind: AggregateKind,
  state: Map<string, AggState>,
  manifest: Manifest,
  gptq: { spec: QuantSpec; staticGroups: boolean; percDamp: number },
  progress: QuantProgress,
): LinearStats[] {
  const agg = aggregator(kind);
  const tokens = manifest.tasks.map((t) => t.tokens);
  const solved = solveModel(baseDir, source.sites, (s) => agg.finish(state.get(s.name)!, s.inDim, tokens), gptq.spec,
    { staticGroups: gptq.staticGroups, percDamp: gptq.percDamp }, progress);
  writeQuantizedCheckpoint({
    baseDir, outDir, spec: gptq.spec, weights: solved.weights, dampPercent: gptq.percDamp,
    extra: (tmp) => writeMlgptqDir(tmp, manifest, state),
    onProgress: (m) => progress.note(m),
  });
  return solved.stats;
}

/** `inlaid quantize --model ... --method ...`. */
export function quantize(o: QuantizeOptions): QuantizeResult {
  const t0 = performance.now();
  validateOptions(o);
  const { progress, baseDir, outDir, workDir, staticGroups, percDamp, stepTokens } = resolveQuantizeOptions(o, 512);
  const meta = { method: o.method, spec: o.spec, staticGroups, percDamp, stepTokens, limit: o.calibLimit };
  let outDirs: string[] = [outDir];
  let stats: LinearStats[] = [];

  if (o.method === "rtn") {
    const cfg = loadModelConfig(baseDir);
    const src = SafetensorsDir.open(baseDir);
    let weights;
    try {
      progress.start("rtn", cfg.numLayers * 7, "linears");
      let done = 0;
      weights = quantizeModelRtn(src, cfg, o.spec, () => progress.update(++done));
    } finally {
      progress.stop();
      src.close();
    }
    const sites = hessianSites(cfg);
    const manifest = manifestOf(meta, null, { path: baseDir, fingerprint: baseFingerprint(baseDir) }, sites, []);
    writeQuantizedCheckpoint({ baseDir, outDir, spec: o.spec, weights, extra: (tmp) => writeMlgptqDir(tmp, manifest, null), onProgress: (m) => progress.note(m) });
    return { outDirs, stats, seconds: (performance.now() - t0) / 1000 };
  }

  const source = new HessianSource(baseDir, workDir, o.calibLimit, stepTokens, progress);
  const base = { path: baseDir, fingerprint: source.fingerprint };
  if (o.method === "gptq") {
    // One checkpoint per task, built in a temp folder and swapped in as a whole.
    const tmp = makeTempDirBeside(outDir);
    try {
      outDirs = [];
      for (const t of o.tasks) {
        const state = new Map<string, AggState>();
        const entries = foldTasks(source, "mean", [t], true, state);
        // One task's "mean" is its own H_t; the manifest records no aggregate.
        const manifest = manifestOf(meta, null, base, source.sites, entries);
        progress.note(`task ${t.name}: solving its own base`);
        stats = stats.concat(solveAndWrite(baseDir, join(tmp, t.name), source, "mean", state, manifest, { spec: o.spec, staticGroups, percDamp }, progress));
        outDirs.push(join(outDir, t.name));
      }
      replaceDir(tmp, outDir);
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      throw e;
    }
  } else {
    const kind = aggregateOf(o.method, o.aggregate)!;
    const state = new Map<string, AggState>();
    const entries = foldTasks(source, kind, o.tasks, o.method === "mlgptq", state);
    const manifest = manifestOf(meta, kind, base, source.sites, entries);
    stats = solveAndWrite(baseDir, outDir, source, kind, state, manifest, { spec: o.spec, staticGroups, percDamp }, progress);
  }
  if (!o.keepWork) rmSync(workDir, { recursive: true, force: true });
  return { outDirs, stats, seconds: (performance.now() - t0) / 1000 };
}

export interface IncrementalOptions {
  /** A checkpoint written by `inlaid quantize` with mlgptq or gptq-mixed. */
  readonly fromDir: string;
  readonly outDir: string;
  readonly tasks: readonly QuantTask[];
  /** The unquantized base, when it moved since fromDir was written (must be the same model). */
  readonly baseDir?: string;
  readonly workDir?: string;
  readonly keepWork?: boolean;
  readonly progress?: QuantProgress;
}

/** A checkpoint new tasks may be added to (`--from`), checked against the options: where both incremental paths start. */
export interface IncrementalStart {
  readonly fromDir: string;
  readonly outDir: string;
  readonly manifest: Manifest;
  readonly method: Method;
  readonly spec: QuantSpec;
  /** The unquantized base, and its fingerprint (equal to the one the checkpoint recorded). */
  readonly baseDir: string;
  readonly fingerprint: string;
}

/** Reads `o.fromDir`'s manifest and refuses what cannot be added to it, saying why. */
export function openIncremental(o: IncrementalOptions): IncrementalStart {
  const fromDir = resolve(o.fromDir);
  const outDir = resolve(o.outDir);
  const m = readManifest(fromDir);
  const method = m.method as Method;
  if (method !== "mlgptq" && method !== "gptq-mixed") {
    throw new Error(`${fromDir} was made with --method ${m.method}, which keeps no Hessians to add to; only mlgptq and gptq-mixed checkpoints take new tasks`);
  }
  if (o.tasks.length === 0) throw new Error("--from needs at least one new --task NAME=ADAPTER_DIR:CALIB.jsonl");
  for (const t of o.tasks) {
    if (m.tasks.some((x) => x.name === t.name)) {
      throw new Error(`task '${t.name}' is already in ${fromDir} (its tasks: ${m.tasks.map((x) => x.name).join(", ")}); give it another name`);
    }
  }
  const spec = specOfManifest(m);
  validateOptions({ method, spec, tasks: o.tasks });
  const baseDir = resolve(o.baseDir ?? m.base.path);
  if (!existsSync(join(baseDir, "config.json"))) {
    throw new Error(`the unquantized base ${baseDir} recorded in ${fromDir} is gone; pass --model with its new location`);
  }
  const fingerprint = baseFingerprint(baseDir);
  if (fingerprint !== m.base.fingerprint) {
    throw new Error(`the base at ${baseDir} is not the one ${fromDir} was quantized from (its config or weight files changed); incremental quantization needs the same base`);
  }
  if (m.calibration.recipe !== CALIBRATION_RECIPE) {
    throw new Error(`${fromDir} used calibration recipe ${m.calibration.recipe}, this version uses ${CALIBRATION_RECIPE}; quantize all tasks again`);
  }
  return { fromDir, outDir, manifest: m, method, spec, baseDir, fingerprint };
}

/** `inlaid quantize --from QUANT_DIR --task ...`: adds tasks to a checkpoint's cached Hessians and re-solves. */
export function quantizeIncremental(o: IncrementalOptions): QuantizeResult {
  const t0 = performance.now();
  const progress = o.progress ?? SILENT;
  const { fromDir, outDir, manifest: m, method, spec, baseDir } = openIncremental(o);
  const workDir = resolve(o.workDir ?? `${outDir}.work`);
  const source = new HessianSource(baseDir, workDir, m.calibration.limit ?? undefined, m.calibration.step_tokens, progress);
  const kind = m.aggregate!;
  const state = readState(fromDir, m, Object.keys(aggregator(kind).init(1)));
  progress.note(`${fromDir}: ${m.tasks.length} task(s) cached (${m.tasks.map((t) => t.name).join(", ")}), adding ${o.tasks.map((t) => t.name).join(", ")}`);
  const entries = foldTasks(source, kind, o.tasks, method === "mlgptq", state);
  const manifest: Manifest = { ...m, base: { path: baseDir, fingerprint: source.fingerprint }, tasks: [...m.tasks, ...entries] };
  const stats = solveAndWrite(baseDir, outDir, source, kind, state, manifest, { spec, staticGroups: m.static_groups, percDamp: m.damp_percent }, progress);
  if (!o.keepWork) rmSync(workDir, { recursive: true, force: true });
  return { outDirs: [outDir], stats, seconds: (performance.now() - t0) / 1000 };
}
