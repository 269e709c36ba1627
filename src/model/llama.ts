// The Llama-family decoder (Llama, Mistral, Qwen2), written once against the Backend
// interface. It knows nothing about LoRA or weight formats: each projection is a
// `Linear`, which a caller may wrap (see LinearWrapper).

import type { Backend, KvCache, PreparedStep, Tensor } from "../backend/backend.js";
import type { ModelConfig } from "./config.js";
import { DenseLinear, GROUP_NAMES, type Linear, type LinearGroup, type LinearWrapper } from "./linear.js";
import { ropeInvFreq } from "./rope.js";
import type { LlamaWeights } from "./weights.js";

interface Layer {
  readonly inputNorm: Tensor;
  readonly postAttnNorm: Tensor;
  readonly proj: Readonly<Record<LinearGroup, Linear>>;
}

/**
 * Scratch activations, allocated once at the largest step the engine will run. Dtypes
 * follow backend.ts: matmul inputs (normed, attn, act, lastHidden) in the backend's
 * activation dtype; matmul outputs (qkv, gateUp, hidden), q/k/v split from qkv, the
 * residual stream and the logits in f32.
 */
interface Workspace {
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
  readonly lastHidden: Tensor;
  readonly logits: Tensor;
}

export interface ModelLimits {
  /** Most token rows in one step. */
  readonly maxTokens: number;
  /** Most sequences sampled in one step. */
  readonly maxSeqs: number;
}

export class LlamaModel {
  readonly #backend: Backend;
  readonly #layers: Layer[];
  readonly #ws: Workspace;
  readonly #invFreq: Tensor;
  readonly #attnScale: number;

  constructor(
    backend: Backend,
    readonly config: ModelConfig,
    readonly weights: LlamaWeights,
    readonly limits: ModelLimits,
    wrap?: LinearWrapper,
  ) {
    this.#backend = backend;
    this.#layers = weights.layers.map((lw, l) => {
      const proj = {} as Record<LinearGroup, Linear>;
      for (const g of GROUP_NAMES) {
        const dense = lw.proj[g];
        const base = lw.linears?.[g] ?? (dense ? new DenseLinear(backend, dense, lw.bias[g]) : null);
        if (!base) throw new Error(`layer ${l} has neither a weight nor a linear for ${g}`);
        proj[g] = wrap ? wrap(l, g, base) : base;
      }
      return { inputNorm: lw.inputNorm, postAttnNorm: lw.postAttnNorm, proj };
    });
    const c = config;
    const T = limits.maxTokens;
    const act = backend.activationDtype;
    const e = (cols: number, rows = T, dtype = act): Tensor => backend.empty([rows, cols], dtype);
    this.#ws = {
      residual: e(c.hiddenSize, T, "f32"),
      normed: e(c.hiddenSize),
      qkv: e((c.numHeads + 2 * c.numKvHeads) * c.headDim, T, "f32"),
      q: e(c.numHeads * c.headDim, T, "f32"),
      k: e(c.numKvHeads * c.headDim, T, "f32"),
      v: e(c.numKvHeads * c.headDim, T, "f32"),
      attn: e(c.numHeads * c.headDim),
      hidden: e(c.hiddenSize, T, "f32"),
      gateUp: e(2 * c.intermediateSize, T, "f32"),
      act: e(c.intermediateSize),
      lastHidden: e(c.hiddenSize, limits.maxSeqs),
      logits: e(c.vocabSize, limits.maxSeqs, "f32"),
    };
    this.#invFreq = backend.upload({ shape: [c.headDim / 2], dtype: "f32", data: ropeInvFreq(c) }, "f32");
    this.#attnScale = 1 / Math.sqrt(c.headDim);
  }

  /** Runs one step; returns the logits [numSample, vocab] of the step's sample rows (a workspace view). */
  forward(step: PreparedStep, kv: KvCache): Tensor {
    const b = this.#backend;
    const c = this.config;
    const n = step.batch.numTokens;
    const m = step.batch.sampleRows.length;
    if (n > this.limits.maxTokens || m > this.limits.maxSeqs) {
      throw new Error(`step of ${n} tokens / ${m} samples exceeds the model workspace (${this.limits.maxTokens} / ${this.limits.maxSeqs})`);
    }
    const r = (t: Tensor): Tensor => b.rows(t, n);
    const ws = this.#ws;
    const residual = r(ws.residual), normed = r(ws.normed), hidden = r(ws.hidden);
    const qkv = r(ws.qkv), q = r(ws.q), k = r(ws.k), v = r(ws.v), attn = r(ws.attn);
    const gateUp = r(ws.gateUp), act = r(ws.act);

    b.embedding(residual, this.weights.embed, step);
    for (let l = 0; l < this.#layers.length; l++) {
      const layer = this.#layers[l]!;
      // The previous layer's MLP output joins the residual stream here, fused with the norm.
      if (l === 0) b.rmsnorm(normed, residual, layer.inputNorm, c.rmsNormEps);
      else b.addRmsnorm(normed, residual, hidden, layer.inputNorm, c.rmsNormEps);
      layer.proj.qkv_proj.forward(qkv, normed, step);
      b.rope(q, k, v, qkv, this.#invFreq, c.headDim, step);
      b.attention(attn, q, k, v, kv, l, this.#attnScale, step);
      layer.proj.o_proj.forward(hidden, attn, step);
      b.addRmsnorm(normed, residual, hidden, layer.postAttnNorm, c.rmsNormEps);
      layer.proj.gate_up_proj.forward(gateUp, normed, step);
      b.siluMul(act, gateUp);
      layer.proj.down_proj.forward(hidden, act, step);
    }
    b.addRmsnorm(normed, residual, hidden, this.weights.norm, c.rmsNormEps);
    const last = b.rows(ws.lastHidden, m);
    const logits = b.rows(ws.logits, m);
    b.gatherRows(last, normed, step);
    b.linear(logits, last, this.weights.lmHead);
    return logits;
  }
}
