// Checkpoint tensors -> backend tensors for the Llama family (HF names).

import type { Backend, HostTensor, Tensor } from "../backend/backend.js";
import type { ModelConfig } from "./config.js";
import { PROJECTIONS, type Projection } from "./linear.js";

export interface LayerWeights {
  readonly inputNorm: Tensor;
  readonly postAttnNorm: Tensor;
  readonly proj: Readonly<Record<Projection, Tensor>>;
  readonly bias: Readonly<Partial<Record<Projection, Tensor>>>;
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
): LlamaWeights {
  let seed = 0;
  // `dtype` overrides the backend's weight dtype: biases are added to f32 matmul outputs
  // (backend.ts's activation rule), so they are stored in f32.
  const take = (name: string, shape: readonly number[], dtype?: "f32"): Tensor => {
    if (src === DUMMY) {
      onTensor?.(name);
      // Norm weights near 1 keep activations in range; matrices and biases get small noise.
      if (name.endsWith("norm.weight")) return backend.upload({ shape, dtype: "f32", data: new Float32Array(shape[0]!).fill(1) });
      const t = backend.empty(shape, dtype ?? (cfg.dtype === "f32" ? "f32" : "bf16"));
      backend.fillRandom(t, ++seed, 0.02);
      return t;
    }
    if (!src.has(name)) throw new Error(`checkpoint has no tensor ${name}; is this a ${cfg.architecture} model?`);
    const host = src.get(name);
    if (host.shape.length !== shape.length || host.shape.some((d, i) => d !== shape[i])) {
      throw new Error(`tensor ${name} has shape [${host.shape.join(", ")}], config.json implies [${shape.join(", ")}]`);
    }
    onTensor?.(name);
    return dtype ? backend.upload(host, dtype) : backend.upload(host);
  };
  const H = cfg.hiddenSize;
  const embed = take("model.embed_tokens.weight", [cfg.vocabSize, H]);
  const layers: LayerWeights[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const pre = `model.layers.${l}`;
    const proj = {} as Record<Projection, Tensor>;
    const bias: Partial<Record<Projection, Tensor>> = {};
    for (const p of PROJECTIONS) {
      const { inDim, outDim } = projDims(cfg, p);
      proj[p] = take(`${pre}.${PROJ_PREFIX[p]}.${p}.weight`, [outDim, inDim]);
      if (hasBias(cfg, p)) bias[p] = take(`${pre}.${PROJ_PREFIX[p]}.${p}.bias`, [outDim], "f32");
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
