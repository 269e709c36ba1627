// Layer-streamed Hessian capture (DESIGN §3 step 1, §4): every task's calibration tokens
// run through the unquantized base with the task's adapter on, one decoder layer at a
// time, on any backend (the CUDA one is what makes a 7B base fit).
//
//   embed every task's tokens once: the residual stream of each task's token chunks
//   for each layer:
//     make the layer resident (LayerSource)
//     for each task, for each chunk: run the layer (LoRA on, the task's slot), adding
//       X^T X of the four Hessian sites' inputs into device buffers (Backend.gram), and
//       move the chunk's residual on to the layer's output
//     read each task's sums back, H_t = (2/n_t) X X^T, hand them to `onLayer` (which
//     folds and solves while the layer is still resident), free the layer
//
// The residual moves on with the UNQUANTIZED layer and the adapter on, so a task's
// Hessians depend only on (base, adapter, calibration data) - the same rule as the
// one-pass capture (capture.ts), which incremental quantization relies on.
//
// Device memory beyond the backend's own: one layer's weights, every task's residual
// stream (f32, tokens x hidden), one set of the four sites' K x K f32 sums (reused by
// every task and layer), the LoRA pool with every task's adapter, and one chunk's
// scratch (the decoder workspace and a one-layer KV cache). For Llama-2-7B with 4 tasks
// of 32 x 512 tokens: 0.4 + 1.07 + 0.69 + 0.32 + ~0.3 GB (chunks of 2048 tokens).
//
// On the CPU backend the sums are Backend.gram's float64 dot products rounded to f32
// once per chunk, so Hessians equal the one-pass capture's (float64 throughout) up to
// that rounding; on the GPU the activations are bf16 (a test bounds the difference).

import type { Backend, KvCache, Tensor } from "../backend/backend.js";
import { AdapterPool } from "../lora/adapter_pool.js";
import type { PeftAdapter } from "../lora/peft.js";
import { LINEAR_GROUPS, type LinearWrapper } from "../model/linear.js";
import { createLayerScratch, DecoderLayer, freeLayerScratch, ropeTables, scratchRows } from "../model/llama.js";
import type { LayerWeights } from "../model/weights.js";
import { BLOCK_SIZE, packSteps, prefillBatch, RecordingLinear } from "./capture.js";
import { hessianSites, SITE_OF, type HessianSite, type Hessians } from "./hessian.js";
import type { LayerSource } from "./layer_source.js";
import { mirrorUpper } from "./linalg.js";

/** One task's calibration as the streamer runs it. */
export interface StreamTask {
  readonly name: string;
  /** Active during the task's forward; null runs the base alone (GPTQ-mixed). */
  readonly adapter: PeftAdapter | null;
  /** Token ids of each calibration sequence. */
  readonly seqs: readonly (readonly number[])[];
}

export interface StreamCaptureOptions {
  /** Most tokens per forward chunk (default 2048; raised to the longest sequence). */
  readonly stepTokens?: number;
  /** Called once per layer, in order, while the layer is resident (`resident`: its weights, for
   * LayerSource.weight), with each task's Hessians of the layer's sites (in task order), or in
   * sum mode (`sum`) with the sums per site instead (perTask empty). */
  readonly onLayer: (layer: number, perTask: readonly Hessians[], resident: LayerWeights, sums: ReadonlyMap<string, Float32Array>) => void;
  /**
   * Sum mode: one running sum per site, initial(site) + sum_t alpha[t] X_t^T X_t, accumulated
   * on the device (Backend.gram's alpha) and read back once per layer - for aggregates that
   * are sums (mean: alpha = 2/n_t; pooled: 2), whose per-task Hessians need not be seen. At
   * 7B that saves reading and folding 0.7 GB per task and layer on the host.
   */
  readonly sum?: { readonly alpha: readonly number[]; readonly initial?: (site: HessianSite) => Float32Array | undefined };
  /** Called where device memory peaks (after allocations, after every chunk). */
  readonly onMemory?: () => void;
  /** Layers captured so far, of `total`. */
  readonly onProgress?: (done: number, total: number) => void;
}

/** Seconds spent, by phase, over the whole stream. */
export interface StreamTiming {
  /** Embedding and every layer's forward + Gram sums + reading them back. */
  captureSeconds: number;
  /** Inside onLayer (the caller's fold and solve). */
  layerSeconds: number;
}

interface Chunk {
  readonly seqs: readonly (readonly number[])[];
  readonly tokens: number;
  /** This chunk's residual stream [tokens, hidden] f32, carried from layer to layer. */
  readonly residual: Tensor;
  readonly slot: number;
}

/** A site's f32 sum of X^T X (fresh from Backend.read) turned in place into H = (2/n) X X^T,
 * mirrored from the upper triangle (a GEMM's two triangles may differ in their last bit). */
function normalize(sum: Float32Array, K: number, n: number): Float32Array {
  const c = 2 / n;
  for (let i = 0; i < sum.length; i++) sum[i] = Math.fround(c * sum[i]!);
  mirrorUpper(sum, K);
  return sum;
}

/**
 * Streams `tasks` through `source` layer by layer on `backend`, calling opts.onLayer with
 * every layer's per-task Hessians. Returns the time spent, by phase. Everything it
 * allocates is freed on return, on success or error.
 */
export function streamCapture(backend: Backend, source: LayerSource, tasks: readonly StreamTask[], opts: StreamCaptureOptions): StreamTiming {
  const cfg = source.config;
  const maxLen = cfg.maxPositionEmbeddings;
  for (const t of tasks) {
    if (t.seqs.length === 0) throw new Error(`task ${t.name} has no calibration sequences`);
    t.seqs.forEach((s, i) => {
      if (s.length === 0) throw new Error(`task ${t.name}: calibration sequence ${i + 1} is empty`);
      if (s.length > maxLen) throw new Error(`task ${t.name}: calibration sequence ${i + 1} is ${s.length} tokens, more than the model's ${maxLen}; shorten it or drop it`);
    });
  }
  const stepTokens = Math.max(opts.stepTokens ?? 2048, ...tasks.flatMap((t) => t.seqs.map((s) => s.length)));
  const timing: StreamTiming = { captureSeconds: 0, layerSeconds: 0 };
  const t0 = performance.now();
  const sitesByLayer = new Map<number, HessianSite[]>();
  for (const s of hessianSites(cfg)) sitesByLayer.set(s.layer, [...(sitesByLayer.get(s.layer) ?? []), s]);

  const b = backend;
  const owned: Tensor[] = [];
  const alloc = (shape: readonly number[], dtype: "f32"): Tensor => {
    const t = b.empty(shape, dtype);
    owned.push(t);
    return t;
  };
  let pool: AdapterPool | null = null;
  let kv: KvCache | null = null;
  let scratch: ReturnType<typeof createLayerScratch> | null = null;
  let resident: LayerWeights | null = null;
  try {
    // Every task's adapter in its own slot for the whole stream.
    const withAdapter = tasks.filter((t) => t.adapter !== null);
    const slots = tasks.map(() => -1);
    if (withAdapter.length > 0) {
      pool = new AdapterPool(b, cfg, withAdapter.length, Math.max(1, ...withAdapter.map((t) => t.adapter!.maxRank)));
      tasks.forEach((t, i) => {
        if (t.adapter !== null) slots[i] = pool!.acquire(i, t.adapter);
      });
    }
    const chunks: Chunk[][] = tasks.map((t, i) =>
      packSteps(t.seqs as number[][], stepTokens).map((seqs) => {
        const tokens = seqs.reduce((a, s) => a + s.length, 0);
        return { seqs, tokens, residual: alloc([tokens, cfg.hiddenSize], "f32"), slot: slots[i]! };
      }));
    const tokens = tasks.map((_, i) => chunks[i]!.reduce((a, c) => a + c.tokens, 0));
    const maxSeqs = Math.max(1, ...chunks.flat().map((c) => c.seqs.length));
    const batches = new Map(chunks.flat().map((c) => [c, prefillBatch(c.seqs as number[][], c.slot)]));

    // Embedding: once per chunk; the table is resident only meanwhile. (No tasks: the
    // layers are still made resident in turn, for a caller that only solves.)
    if (tasks.length > 0) {
      const table = source.embed();
      try {
        for (const c of chunks.flat()) b.embedding(c.residual, table, b.prepare(batches.get(c)!));
        opts.onMemory?.();
      } finally {
        b.free(table);
      }
    }

    scratch = createLayerScratch(b, cfg, stepTokens);
    const rope = ropeTables(b, cfg);
    owned.push(rope.invFreq);
    // Attention runs one layer at a time: a cache of one layer, one chunk's blocks.
    kv = b.createKvCache({
      numLayers: 1,
      numBlocks: Math.ceil(stepTokens / BLOCK_SIZE) + maxSeqs,
      blockSize: BLOCK_SIZE,
      numKvHeads: cfg.numKvHeads,
      headDim: cfg.headDim,
    });
    // One K x K f32 sum per site of a layer (every layer's sites have the same sizes).
    const firstSites = sitesByLayer.get(0)!;
    const sums = new Map(firstSites.map((s) => [s.proj, alloc([s.inDim, s.inDim], "f32")]));
    opts.onMemory?.();

    opts.onProgress?.(0, cfg.numLayers);
    const sumMode = opts.sum;
    if (sumMode && sumMode.alpha.length !== tasks.length) throw new Error(`sum mode needs one alpha per task (${tasks.length}), got ${sumMode.alpha.length}`);
    for (let l = 0; l < cfg.numLayers; l++) {
      const sites = sitesByLayer.get(l)!;
      resident = source.layer(l);
      // Whether a site's sum holds anything yet (the first gram overwrites): per task, or per
      // layer in sum mode, where a cached initial sum is uploaded first.
      const started = new Set<string>();
      let task = 0;
      if (sumMode?.initial) {
        for (const site of sites) {
          const init = sumMode.initial(site);
          if (!init) continue;
          b.free(sums.get(site.proj)!);
          owned.splice(owned.indexOf(sums.get(site.proj)!), 1);
          const t = b.upload({ shape: [site.inDim, site.inDim], dtype: "f32", data: init }, "f32");
          owned.push(t);
          sums.set(site.proj, t);
          started.add(site.proj);
        }
      }
      const wrap: LinearWrapper = (layer, group, base) => {
        const inner = pool ? pool.wrap(layer, group, base) : base;
        // One fused linear per input: its first member names the site.
        const proj = LINEAR_GROUPS[group][0];
        if (SITE_OF[proj] !== proj) return inner;
        return new RecordingLinear(inner, (x) => {
          b.gram(sums.get(proj)!, x, started.has(proj), sumMode ? sumMode.alpha[task] : 1);
          started.add(proj);
        });
      };
      const layer = new DecoderLayer(b, cfg, l, resident, rope, wrap);
      const perTask: Hessians[] = [];
      for (let t = 0; t < tasks.length; t++) {
        task = t;
        if (!sumMode) started.clear();
        for (const c of chunks[t]!) {
          const step = b.prepare(batches.get(c)!);
          const s = { ...scratchRows(b, scratch, c.tokens), residual: c.residual };
          layer.forward(s, step, kv, 0, false);
          // The layer's MLP output joins this chunk's residual: the next layer's input. (The
          // norm written to s.normed is scratch; only the in-place add is wanted.)
          b.addRmsnorm(s.normed, c.residual, s.hidden, resident.inputNorm, cfg.rmsNormEps);
          opts.onMemory?.();
        }
        if (sumMode) continue;
        const h = new Map<string, Float32Array>();
        for (const site of sites) h.set(site.name, normalize(b.read(sums.get(site.proj)!) as Float32Array, site.inDim, tokens[t]!));
        perTask.push({ tokens: tokens[t]!, h });
      }
      const layerSums = new Map<string, Float32Array>();
      if (sumMode) {
        for (const site of sites) {
          if (!started.has(site.proj)) throw new Error(`sum mode: no task and no initial sum for ${site.name}`);
          layerSums.set(site.name, b.read(sums.get(site.proj)!) as Float32Array);
        }
      }
      const tl = performance.now();
      opts.onLayer(l, perTask, resident, layerSums);
      timing.layerSeconds += (performance.now() - tl) / 1000;
      source.freeLayer(resident);
      resident = null;
      opts.onProgress?.(l + 1, cfg.numLayers);
    }
  } finally {
    if (resident) source.freeLayer(resident);
    for (const t of owned) b.free(t);
    if (scratch) freeLayerScratch(b, scratch);
    if (kv) b.freeKvCache(kv);
    pool?.dispose();
  }
  timing.captureSeconds = (performance.now() - t0) / 1000 - timing.layerSeconds;
  return timing;
}
