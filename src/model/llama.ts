// The Llama-family decoder (Llama, Mistral, Qwen2), written once against the Backend
// interface. It knows nothing about LoRA or weight formats: each projection is a
// `Linear`, which a caller may wrap (see LinearWrapper).
//
// A decoder layer is its own object (DecoderLayer) over a caller's scratch, so a caller
// that holds one layer's weights at a time (layer-streamed calibration,
// quant/stream_capture.ts) runs the very ops `LlamaModel.forward` runs.

import type { Backend, KvCache, PreparedStep, Tensor } from "../backend/backend.js";
import type { ModelConfig } from "./config.js";
import { DenseLinear, GROUP_NAMES, type Linear, type LinearGroup, type LinearWrapper } from "./linear.js";
import { ropeInvFreq } from "./rope.js";
import type { LayerWeights, LlamaWeights } from "./weights.js";

/**
 * Scratch activations of the decoder layers, allocated once at the largest step. Dtypes
 * follow backend.ts: matmul inputs (normed, attn, act) in the backend's activation
 * dtype; matmul outputs (qkv, gateUp, hidden), q/k/v split from qkv and the residual
 * stream in f32.
 */
export interface LayerScratch {
  readonly residual: Tensor;
  readonly normed: Tensor;
  readonly qkv: Tensor;
  readonly q: Tensor;
  readonly k: Tensor;
  readonly v: Tensor;
  readonly attn: Tensor;
  readonly hidden: Tensor;
  readonly gateUp: Tensor;
  readonly act: Tensor;
}

/** The model's scratch: the layers' plus the sampled rows' hidden states and logits. */
interface Workspace extends LayerScratch {
  readonly lastHidden: Tensor;
  readonly logits: Tensor;
}

/** Layer scratch for steps of up to `maxTokens` rows (free with freeLayerScratch). */
export function createLayerScratch(backend: Backend, c: ModelConfig, maxTokens: number): LayerScratch {
  const act = backend.activationDtype;
  const e = (cols: number, dtype = act): Tensor => backend.empty([maxTokens, cols], dtype);
  return {
    residual: e(c.hiddenSize, "f32"),
    normed: e(c.hiddenSize),
    qkv: e((c.numHeads + 2 * c.numKvHeads) * c.headDim, "f32"),
    q: e(c.numHeads * c.headDim, "f32"),
    k: e(c.numKvHeads * c.headDim, "f32"),
    v: e(c.numKvHeads * c.headDim, "f32"),
    attn: e(c.numHeads * c.headDim),
    hidden: e(c.hiddenSize, "f32"),
    gateUp: e(2 * c.intermediateSize, "f32"),
    act: e(c.intermediateSize),
  };
}

export function freeLayerScratch(backend: Backend, s: LayerScratch): void {
  for (const t of Object.values(s)) backend.free(t);
}

/** Views of the first `n` rows of every scratch tensor (make them after `prepare`). */
export function scratchRows(backend: Backend, s: LayerScratch, n: number): LayerScratch {
  const r = (t: Tensor): Tensor => backend.rows(t, n);
  return {
    residual: r(s.residual), normed: r(s.normed), qkv: r(s.qkv), q: r(s.q), k: r(s.k), v: r(s.v),
    attn: r(s.attn), hidden: r(s.hidden), gateUp: r(s.gateUp), act: r(s.act),
  };
}

/** What every layer shares: RoPE's inverse frequencies (f32 on the backend) and 1/sqrt(headDim). */
export interface RopeTables {
  readonly invFreq: Tensor;
  readonly attnScale: number;
}

export function ropeTables(backend: Backend, c: ModelConfig): RopeTables {
  return {
    invFreq: backend.upload({ shape: [c.headDim / 2], dtype: "f32", data: ropeInvFreq(c) }, "f32"),
    attnScale: 1 / Math.sqrt(c.headDim),
  };
}

/** One decoder layer: attention and MLP blocks over the residual stream. */
export class DecoderLayer {
  readonly inputNorm: Tensor;
  readonly postAttnNorm: Tensor;
  readonly proj: Readonly<Record<LinearGroup, Linear>>;

  constructor(
    private readonly backend: Backend,
    readonly config: ModelConfig,
    readonly index: number,
    lw: LayerWeights,
    private readonly rope: RopeTables,
    wrap?: LinearWrapper,
  ) {
    const proj = {} as Record<LinearGroup, Linear>;
    for (const g of GROUP_NAMES) {
      const dense = lw.proj[g];
      const base = lw.linears?.[g] ?? (dense ? new DenseLinear(backend, dense, lw.bias[g]) : null);
      if (!base) throw new Error(`layer ${index} has neither a weight nor a linear for ${g}`);
      proj[g] = wrap ? wrap(index, g, base) : base;
    }
    this.inputNorm = lw.inputNorm;
    this.postAttnNorm = lw.postAttnNorm;
    this.proj = proj;
  }

  /**
   * Runs the layer over `s` (step-sized views). On return the layer's MLP output is in
   * s.hidden, not yet added to s.residual: the next layer adds it, fused with its input
   * norm (`pending`), or the caller does (addRmsnorm). `pending`: s.hidden holds the
   * previous layer's output still to add. Attention reads and writes layer `kvLayer` of kv.
   */
  forward(s: LayerScratch, step: PreparedStep, kv: KvCache, kvLayer: number, pending: boolean): void {
    const b = this.backend;
    const eps = this.config.rmsNormEps;
    if (pending) b.addRmsnorm(s.normed, s.residual, s.hidden, this.inputNorm, eps);
    else b.rmsnorm(s.normed, s.residual, this.inputNorm, eps);
    this.proj.qkv_proj.forward(s.qkv, s.normed, step);
    b.rope(s.q, s.k, s.v, s.qkv, this.rope.invFreq, this.config.headDim, step);
    b.attention(s.attn, s.q, s.k, s.v, kv, kvLayer, this.rope.attnScale, step);
    this.proj.o_proj.forward(s.hidden, s.attn, step);
    b.addRmsnorm(s.normed, s.residual, s.hidden, this.postAttnNorm, eps);
    this.proj.gate_up_proj.forward(s.gateUp, s.normed, step);
    b.siluMul(s.act, s.gateUp);
    this.proj.down_proj.forward(s.hidden, s.act, step);
  }
}

export interface ModelLimits {
  /** Most token rows in one step. */
  readonly maxTokens: number;
  /** Most sequences sampled in one step. */
  readonly maxSeqs: number;
}

export class LlamaModel {
  readonly #backend: Backend;
  readonly #layers: DecoderLayer[];
  readonly #ws: Workspace;

  constructor(
    backend: Backend,
    readonly config: ModelConfig,
    readonly weights: LlamaWeights,
    readonly limits: ModelLimits,
    wrap?: LinearWrapper,
  ) {
    this.#backend = backend;
    const rope = ropeTables(backend, config);
    this.#layers = weights.layers.map((lw, l) => new DecoderLayer(backend, config, l, lw, rope, wrap));
    const act = backend.activationDtype;
    this.#ws = {
      ...createLayerScratch(backend, config, limits.maxTokens),
      lastHidden: backend.empty([limits.maxSeqs, config.hiddenSize], act),
      logits: backend.empty([limits.maxSeqs, config.vocabSize], "f32"),
    };
  }

  /** Runs one step; returns the logits [numSample, vocab] of the step's sample rows (a workspace view). */
  forward(step: PreparedStep, kv: KvCache): Tensor {
    const b = this.#backend;
    const n = step.batch.numTokens;
    const m = step.batch.sampleRows.length;
    if (n > this.limits.maxTokens || m > this.limits.maxSeqs) {
      throw new Error(`step of ${n} tokens / ${m} samples exceeds the model workspace (${this.limits.maxTokens} / ${this.limits.maxSeqs})`);
    }
    const s = scratchRows(b, this.#ws, n);
    b.embedding(s.residual, this.weights.embed, step);
    // Each layer leaves its MLP output pending; the next adds it, fused with its norm.
    for (const [l, layer] of this.#layers.entries()) layer.forward(s, step, kv, l, l > 0);
    b.addRmsnorm(s.normed, s.residual, s.hidden, this.weights.norm, this.config.rmsNormEps);
    const last = b.rows(this.#ws.lastHidden, m);
    const logits = b.rows(this.#ws.logits, m);
    b.gatherRows(last, s.normed, step);
    b.linear(logits, last, this.weights.lmHead);
    return logits;
  }
}
