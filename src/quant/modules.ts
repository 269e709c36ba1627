// Which linears a quantized checkpoint quantizes: the seven projections of every decoder
// layer, named as HF names them (`model.layers.L.self_attn.q_proj`). Embeddings, norms
// and lm_head stay in the base dtype, as AutoGPTQ and GPTQModel leave them by default.

import type { ModelConfig } from "../model/config.js";
import { PROJECTIONS, type Projection } from "../model/linear.js";
import { projDims } from "../model/weights.js";

export interface LinearModule {
  /** HF module name; its dense tensor is `${name}.weight`. */
  readonly name: string;
  readonly layer: number;
  readonly proj: Projection;
  readonly inDim: number;
  readonly outDim: number;
}

// The same table as model/weights.ts's (not exported there).
const PARENT: Readonly<Record<Projection, string>> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

/** Every quantizable linear, in layer order and PROJECTIONS order within a layer. */
export function linearModules(cfg: ModelConfig): LinearModule[] {
  const out: LinearModule[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of PROJECTIONS) out.push({ name: `model.layers.${l}.${PARENT[p]}.${p}`, layer: l, proj: p, ...projDims(cfg, p) });
  }
  return out;
}
