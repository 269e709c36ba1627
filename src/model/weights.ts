// Checkpoint tensors -> backend tensors for the Llama family (HF names).

import type { Backend, HostTensor, Tensor } from "../backend/backend.js";
import type { ModelConfig } from "./config.js";
import { GROUP_NAMES, LINEAR_GROUPS, groupOf, type Linear, type LinearGroup, type Projection } from "./linear.js";

export interface LayerWeights {
  readonly inputNorm: Tensor;
  readonly postAttnNorm: Tensor;
  /** Fused weights [sum of the members' outDims, inDim]: the members' rows stacked in
   * LINEAR_GROUPS order (see projRows). Absent for a group loaded some other way (`linears`). */
  readonly proj: Readonly<Partial<Record<LinearGroup, Tensor>>>;
  readonly bias: Readonly<Partial<Record<LinearGroup, Tensor>>>;
  /** Base linears made elsewhere (e.g. low-bit QuantLinears); the model uses them instead of a
   * dense linear over proj[group]. */
  readonly linears?: Readonly<Partial<Record<LinearGroup, Linear>>>;
}

export interface LoadWeightsOptions {
  /** Groups whose weights are not loaded (their base linear comes from elsewhere: LayerWeights.linears).
   * Their biases still are. */
  readonly skip?: (layer: number, group: LinearGroup) => boolean;
}

export interface LlamaWeights {
  readonly embed: Tensor;
  readonly layers: readonly LayerWeights[];
  readonly norm: Tensor;
  /** The embedding itself when tie_word_embeddings. */
  readonly lmHead: Tensor;
}

/** Where a model's tensors come from: a checkpoint on disk, or random weights. */
export interface TensorSource {
  has(name: string): boolean;
  get(name: string): HostTensor;
}

const PROJ_PREFIX: Record<Projection, string> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

export function projDims(cfg: ModelConfig, p: Projection): { inDim: number; outDim: number } {
  const q = cfg.numHeads * cfg.headDim, kv = cfg.numKvHeads * cfg.headDim;
  switch (p) {
    case "q_proj": return { inDim: cfg.hiddenSize, outDim: q };
    case "k_proj":
    case "v_proj": return { inDim: cfg.hiddenSize, outDim: kv };
    case "o_proj": return { inDim: q, outDim: cfg.hiddenSize };
    case "gate_proj":
    case "up_proj": return { inDim: cfg.hiddenSize, outDim: cfg.intermediateSize };
    case "down_proj": return { inDim: cfg.intermediateSize, outDim: cfg.hiddenSize };
    default: return p satisfies never;
  }
}

/** A fused group's input size and its members' output sizes, in order. */
export function groupDims(cfg: ModelConfig, g: LinearGroup): { inDim: number; outDims: number[] } {
  const members = LINEAR_GROUPS[g] as readonly Projection[];
  return { inDim: projDims(cfg, members[0]!).inDim, outDims: members.map((p) => projDims(cfg, p).outDim) };
}

/** Where a projection's weight rows sit in its group's fused weight. */
export function projRows(cfg: ModelConfig, p: Projection): { group: LinearGroup; rowStart: number; rows: number } {
  const { group, index } = groupOf(p);
  const { outDims } = groupDims(cfg, group);
  return { group, rowStart: outDims.slice(0, index).reduce((a, b) => a + b, 0), rows: outDims[index]! };
}

/** Host tensors stacked along dimension 0 (all of one dtype and row width). */
function stackRows(parts: readonly HostTensor[], name: string): HostTensor {
  const first = parts[0]!;
  if (parts.length === 1) return first;
  const cols = first.shape.length === 2 ? first.shape[1]! : 1;
  let rows = 0;
  for (const t of parts) {
    if (t.dtype !== first.dtype) throw new Error(`${name}: members stored as ${first.dtype} and ${t.dtype}; fused loading needs one dtype`);
    rows += t.shape[0]!;
  }
  const data = new (first.data.constructor as new (n: number) => HostTensor["data"])(rows * cols);
  let at = 0;
  for (const t of parts) {
    data.set(t.data as never, at);
    at += t.data.length;
  }
  return { shape: first.shape.length === 2 ? [rows, cols] : [rows], dtype: first.dtype, data };
}

function hasBias(cfg: ModelConfig, p: Projection): boolean {
  if (p === "q_proj" || p === "k_proj" || p === "v_proj") return cfg.qkvBias;
  if (p === "o_proj") return cfg.oBias;
  return cfg.mlpBias;
}

/** `--load-format dummy`: random weights of the config's shapes, made on the device. */
export const DUMMY = "dummy";

export function loadLlamaWeights(
  backend: Backend,
  cfg: ModelConfig,
  src: TensorSource | typeof DUMMY,
  onTensor?: (name: string) => void,
  opts: LoadWeightsOptions = {},
): LlamaWeights {
  let seed = 0;
  // `dtype` overrides the backend's weight dtype: biases are added to f32 matmul outputs
  // (backend.ts's activation rule), so they are stored in f32.
  const dummy = (name: string, shape: readonly number[], dtype?: "f32"): Tensor => {
    onTensor?.(name);
    // Norm weights near 1 keep activations in range; matrices and biases get small noise.
    if (name.endsWith("norm.weight")) return backend.upload({ shape, dtype: "f32", data: new Float32Array(shape[0]!).fill(1) });
    const t = backend.empty(shape, dtype ?? (cfg.dtype === "f32" ? "f32" : "bf16"));
    backend.fillRandom(t, ++seed, 0.02);
    return t;
  };
  const read = (name: string, shape: readonly number[]): HostTensor => {
    if (src === DUMMY) throw new Error("unreachable: dummy weights are not read");
    if (!src.has(name)) throw new Error(`checkpoint has no tensor ${name}; is this a ${cfg.architecture} model?`);
    const host = src.get(name);
    if (host.shape.length !== shape.length || host.shape.some((d, i) => d !== shape[i])) {
      throw new Error(`tensor ${name} has shape [${host.shape.join(", ")}], config.json implies [${shape.join(", ")}]`);
    }
    onTensor?.(name);
    return host;
  };
  const take = (name: string, shape: readonly number[], dtype?: "f32"): Tensor => {
    if (src === DUMMY) return dummy(name, shape, dtype);
    const host = read(name, shape);
    return dtype ? backend.upload(host, dtype) : backend.upload(host);
  };
  // A fused group: its members read and stacked on the host, uploaded once.
  const takeGroup = (names: readonly string[], shapes: readonly (readonly number[])[], dtype?: "f32"): Tensor => {
    const rows = shapes.reduce((a, sh) => a + sh[0]!, 0);
    const fused = [rows, ...shapes[0]!.slice(1)];
    if (src === DUMMY) return dummy(names.join("+"), fused, dtype);
    const host = stackRows(names.map((n, i) => read(n, shapes[i]!)), names.join("+"));
    return dtype ? backend.upload(host, dtype) : backend.upload(host);
  };
  const H = cfg.hiddenSize;
  const embed = take("model.embed_tokens.weight", [cfg.vocabSize, H]);
  const layers: LayerWeights[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const pre = `model.layers.${l}`;
    const proj: Partial<Record<LinearGroup, Tensor>> = {};
    const bias: Partial<Record<LinearGroup, Tensor>> = {};
    for (const g of GROUP_NAMES) {
      const members = LINEAR_GROUPS[g] as readonly Projection[];
      const name = (p: Projection, what: string): string => `${pre}.${PROJ_PREFIX[p]}.${p}.${what}`;
      const dims = members.map((p) => projDims(cfg, p));
      if (!opts.skip?.(l, g)) proj[g] = takeGroup(members.map((p) => name(p, "weight")), dims.map((d) => [d.outDim, d.inDim]));
      // Members of a group share the bias rule (q/k/v: qkvBias; gate/up: mlpBias).
      if (hasBias(cfg, members[0]!)) bias[g] = takeGroup(members.map((p) => name(p, "bias")), dims.map((d) => [d.outDim]), "f32");
    }
    layers.push({
      inputNorm: take(`${pre}.input_layernorm.weight`, [H]),
      postAttnNorm: take(`${pre}.post_attention_layernorm.weight`, [H]),
      proj,
      bias,
    });
  }
  const norm = take("model.norm.weight", [H]);
  const hasHead = src === DUMMY ? !cfg.tieWordEmbeddings : src.has("lm_head.weight");
  const lmHead = cfg.tieWordEmbeddings || !hasHead ? embed : take("lm_head.weight", [cfg.vocabSize, H]);
  if (!cfg.tieWordEmbeddings && lmHead === embed) {
    throw new Error("checkpoint has no lm_head.weight and config.json says tie_word_embeddings is false");
  }
  return { embed, layers, norm, lmHead };
}
