// Runs calibration text through the unquantized base on the CPU backend, with one
// task's LoRA adapter active (or none), and accumulates the Hessian of every
// quantized linear from the inputs it sees (DESIGN §3 step 1).
//
// The model is the serving model (LlamaModel) with one more LinearWrapper layer: each
// linear that opens a Hessian site hands its input to the accumulator before running.
// Every layer's Hessians come from the unquantized model, so they depend only on (base,
// adapter, calibration data) - which is what lets incremental quantization reuse them.
//
// All layers are captured in one pass, which holds every site's K x K sum in memory
// (33 MB per task for the demo). A 7B model needs the layer-by-layer GPU path instead
// (DESIGN §4: stream one layer, capture its Hessians, move the activations on).

import { resolve } from "node:path";
import type { Backend, KvCache, PreparedStep, StepBatch, Tensor } from "../backend/backend.js";
import { CpuBackend } from "../backend/cpu/cpu_backend.js";
import { AdapterPool } from "../lora/adapter_pool.js";
import { loadPeftAdapter } from "../lora/peft.js";
import { loadModelConfig, type ModelConfig } from "../model/config.js";
import { LINEAR_GROUPS, type Linear, type LinearWrapper, type Projection } from "../model/linear.js";
import { LlamaModel } from "../model/llama.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { TextTokenizer } from "../model/tokenizer.js";
import { loadLlamaWeights, projDims, projRows, type LlamaWeights } from "../model/weights.js";
import { calibrationIds, readCalibration } from "./calibration.js";
import { HessianAccumulator, hessianSites, moduleName, SITE_OF, type HessianSite, type Hessians } from "./hessian.js";

/** One task's calibration: its adapter (null = the base alone) and its jsonl file. */
export interface CalibrationSet {
  readonly adapterDir: string | null;
  readonly calibPath: string;
  /** Use only the first `limit` rows. */
  readonly limit?: number;
}

export interface CaptureOptions {
  /** Most tokens per forward step (default 512). */
  readonly stepTokens?: number;
  /** Sequences done so far, of `total`. */
  readonly onProgress?: (done: number, total: number) => void;
}

/** KV block size of the calibration forward (prefillBatch's block tables). */
export const BLOCK_SIZE = 16;

/** Passes the input to `record`, then runs the wrapped linear (a Hessian site's first linear). */
export class RecordingLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;
  constructor(
    readonly inner: Linear,
    readonly record: (x: Tensor) => void,
  ) {
    this.inDim = inner.inDim;
    this.outDim = inner.outDim;
  }

  forward(out: Tensor, x: Tensor, step: PreparedStep): void {
    this.record(x);
    this.inner.forward(out, x, step);
  }
}

/** The unquantized base, loaded once on the CPU, ready to capture any task's Hessians. */
export class HessianCapture {
  readonly sites: readonly HessianSite[];
  readonly #backend: Backend = new CpuBackend();
  readonly #weights: LlamaWeights;

  private constructor(
    readonly baseDir: string,
    readonly config: ModelConfig,
    readonly tokenizer: TextTokenizer,
  ) {
    const src = SafetensorsDir.open(baseDir);
    try {
      this.#weights = loadLlamaWeights(this.#backend, config, src);
    } finally {
      src.close();
    }
    this.sites = hessianSites(config);
  }

  static open(baseDir: string): HessianCapture {
    const dir = resolve(baseDir);
    return new HessianCapture(dir, loadModelConfig(dir), TextTokenizer.load(dir));
  }

  /** Dense weight of a projection, [outDim, inDim] f32 (the HF orientation). */
  weight(layer: number, proj: Projection): Float32Array {
    const lw = this.#weights.layers[layer];
    if (!lw) throw new Error(`the base has ${this.config.numLayers} layers, not ${layer + 1}`);
    // The layer holds fused weights (q/k/v, gate/up stacked by rows): cut this projection's rows.
    const { group, rowStart, rows } = projRows(this.config, proj);
    const inDim = projDims(this.config, proj).inDim;
    const fused = this.#backend.read(lw.proj[group]!) as Float32Array;
    return fused.slice(rowStart * inDim, (rowStart + rows) * inDim);
  }

  /** Runs the calibration set through the base (with its adapter) and returns H per site. */
  capture(set: CalibrationSet, opts: CaptureOptions = {}): Hessians {
    const cfg = this.config;
    const rows = readCalibration(set.calibPath, set.limit);
    const seqs = rows.map((r) => calibrationIds(this.tokenizer, r));
    const maxLen = cfg.maxPositionEmbeddings;
    const stepTokens = Math.max(opts.stepTokens ?? 512, ...seqs.map((s) => s.length));
    seqs.forEach((s, i) => {
      if (s.length > maxLen) {
        throw new Error(`${set.calibPath}: row ${i + 1} is ${s.length} tokens, more than the model's ${maxLen}; shorten it or drop it`);
      }
    });

    const acc = new HessianAccumulator(this.sites);
    const b = this.#backend;
    let wrapLora: LinearWrapper | null = null;
    let slot = -1;
    let pool: AdapterPool | null = null;
    if (set.adapterDir !== null) {
      const adapter = loadPeftAdapter(resolve(set.adapterDir), cfg);
      pool = new AdapterPool(b, cfg, 1, Math.max(1, adapter.maxRank));
      slot = pool.acquire(0, adapter);
      wrapLora = pool.wrap;
    }
    const wrap: LinearWrapper = (layer, group, base) => {
      const inner = wrapLora ? wrapLora(layer, group, base) : base;
      // One fused linear per input: its first member names the site.
      const proj = LINEAR_GROUPS[group][0];
      if (SITE_OF[proj] !== proj) return inner;
      const site = moduleName(layer, proj);
      return new RecordingLinear(inner, (x) => acc.add(site, b.read(x) as Float32Array, x.shape[0]!));
    };
    const maxSeqs = Math.min(seqs.length, stepTokens);
    const model = new LlamaModel(b, cfg, this.#weights, { maxTokens: stepTokens, maxSeqs }, wrap);
    const kv = b.createKvCache({
      numLayers: cfg.numLayers,
      numBlocks: Math.ceil(stepTokens / BLOCK_SIZE) + maxSeqs,
      blockSize: BLOCK_SIZE,
      numKvHeads: cfg.numKvHeads,
      headDim: cfg.headDim,
    });
    try {
      let done = 0;
      opts.onProgress?.(0, seqs.length);
      for (const group of packSteps(seqs, stepTokens)) {
        model.forward(b.prepare(prefillBatch(group, slot)), kv);
        done += group.length;
        opts.onProgress?.(done, seqs.length);
      }
    } finally {
      b.freeKvCache(kv as KvCache);
      pool?.dispose();
    }
    return acc.finish();
  }
}

/** Consecutive sequences grouped into steps of at most `stepTokens` tokens. */
export function packSteps(seqs: readonly number[][], stepTokens: number): number[][][] {
  const steps: number[][][] = [];
  let cur: number[][] = [];
  let n = 0;
  for (const s of seqs) {
    if (n + s.length > stepTokens && cur.length > 0) {
      steps.push(cur);
      cur = [];
      n = 0;
    }
    cur.push(s);
    n += s.length;
  }
  if (cur.length > 0) steps.push(cur);
  return steps;
}

/** One prefill step over whole sequences, each in its own fresh KV blocks. */
export function prefillBatch(seqs: readonly number[][], loraSlot: number): StepBatch {
  const numSeqs = seqs.length;
  const numTokens = seqs.reduce((a, s) => a + s.length, 0);
  const maxBlocksPerSeq = Math.max(...seqs.map((s) => Math.ceil(s.length / BLOCK_SIZE)));
  const tokenIds = new Int32Array(numTokens), positions = new Int32Array(numTokens), slotMapping = new Int32Array(numTokens);
  const loraSlots = new Int32Array(numTokens).fill(loraSlot);
  const queryStart = new Int32Array(numSeqs + 1), contextLens = new Int32Array(numSeqs), sampleRows = new Int32Array(numSeqs);
  const blockTables = new Int32Array(numSeqs * maxBlocksPerSeq).fill(-1);
  let t = 0;
  let nextBlock = 0;
  seqs.forEach((s, i) => {
    queryStart[i] = t;
    const first = nextBlock;
    const blocks = Math.ceil(s.length / BLOCK_SIZE);
    for (let k = 0; k < blocks; k++) blockTables[i * maxBlocksPerSeq + k] = first + k;
    nextBlock += blocks;
    for (let p = 0; p < s.length; p++, t++) {
      tokenIds[t] = s[p]!;
      positions[t] = p;
      slotMapping[t] = (first + Math.floor(p / BLOCK_SIZE)) * BLOCK_SIZE + (p % BLOCK_SIZE);
    }
    contextLens[i] = s.length;
    sampleRows[i] = t - 1;
  });
  queryStart[numSeqs] = t;
  return {
    numTokens, numSeqs, tokenIds, positions, slotMapping, loraSlots, queryStart, contextLens, blockTables, maxBlocksPerSeq, sampleRows,
    sampling: {
      temperature: new Float32Array(numSeqs), topP: new Float32Array(numSeqs).fill(1), topK: new Int32Array(numSeqs),
      seeds: new Uint32Array(numSeqs), counters: new Uint32Array(numSeqs), numTopLogprobs: 0,
    },
  };
}
