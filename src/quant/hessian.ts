// Per-linear Hessians of the layer-wise quantization objective ||W X - Ŵ X||²:
// H = (2/n) X X^T over the n calibration tokens a linear saw (X: [K, n], its inputs).
//
// Normalizing per token (rather than per sequence, as the original GPTQ code does)
// makes every task weigh the same in an aggregate whatever its calibration size
// (DESIGN §3); the GPTQ solve itself does not care about H's scale.
//
// Linears that read the same activations share one Hessian ("site"): q/k/v read the
// attention input, gate/up the MLP input. A layer has four sites, named after the
// first linear reading them (model.layers.L.self_attn.q_proj, ...).

import type { ModelConfig } from "../model/config.js";
import { PROJECTIONS, type Projection } from "../model/linear.js";
import { projDims } from "../model/weights.js";
import { accumulateGram, mirrorUpper } from "./linalg.js";

const SUBLAYER: Readonly<Record<Projection, string>> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

/** The projection whose input each projection shares. */
export const SITE_OF: Readonly<Record<Projection, Projection>> = {
  q_proj: "q_proj", k_proj: "q_proj", v_proj: "q_proj", o_proj: "o_proj",
  gate_proj: "gate_proj", up_proj: "gate_proj", down_proj: "down_proj",
};

/** HF module name of a projection: model.layers.3.self_attn.q_proj. */
export function moduleName(layer: number, proj: Projection): string {
  return `model.layers.${layer}.${SUBLAYER[proj]}.${proj}`;
}

export interface HessianSite {
  /** Module name of the first linear reading this input. */
  readonly name: string;
  readonly layer: number;
  readonly proj: Projection;
  readonly inDim: number;
  /** Module names of every linear reading this input (the site's own first). */
  readonly linears: readonly string[];
}

/** The model's Hessian sites, layer by layer, in forward order. */
export function hessianSites(cfg: ModelConfig): HessianSite[] {
  const sites: HessianSite[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of PROJECTIONS) {
      if (SITE_OF[p] !== p) continue;
      const linears = PROJECTIONS.filter((q) => SITE_OF[q] === p).map((q) => moduleName(l, q));
      sites.push({ name: moduleName(l, p), layer: l, proj: p, inDim: projDims(cfg, p).inDim, linears });
    }
  }
  return sites;
}

/** One calibration set's Hessians: per site, a full symmetric [K, K] f32 matrix. */
export interface Hessians {
  /** Calibration tokens every site saw. */
  readonly tokens: number;
  readonly h: ReadonlyMap<string, Float32Array>;
}

/**
 * Sums X X^T per site in float64 while activations stream by, then normalizes. The
 * order of `add` calls fixes the result bit for bit, so the same calibration run in the
 * same batches always gives the same Hessians.
 */
export class HessianAccumulator {
  readonly #sites: ReadonlyMap<string, HessianSite>;
  readonly #sums = new Map<string, Float64Array>();
  readonly #tokens = new Map<string, number>();
  #scratch: Float64Array = new Float64Array(0);

  constructor(sites: readonly HessianSite[]) {
    this.#sites = new Map(sites.map((s) => [s.name, s]));
    for (const s of sites) {
      this.#sums.set(s.name, new Float64Array(s.inDim * s.inDim));
      this.#tokens.set(s.name, 0);
    }
  }

  /** Adds `rows` activations x [rows, K] (row-major) seen by `site`. */
  add(site: string, x: Float32Array, rows: number): void {
    const s = this.#sites.get(site);
    if (!s) throw new Error(`no Hessian site named ${site}`);
    if (x.length < rows * s.inDim) throw new Error(`site ${site}: ${rows} rows of ${s.inDim} need ${rows * s.inDim} values, got ${x.length}`);
    this.#scratch = accumulateGram(this.#sums.get(site)!, x, rows, s.inDim, this.#scratch);
    this.#tokens.set(site, this.#tokens.get(site)! + rows);
  }

  /** H = (2/n) X X^T per site, as f32. Every site must have seen the same tokens. */
  finish(): Hessians {
    const counts = new Set(this.#tokens.values());
    if (counts.size !== 1) throw new Error(`Hessian sites saw different token counts (${[...counts].join(", ")}); the forward skipped a linear`);
    const n = [...counts][0]!;
    if (n === 0) throw new Error("no calibration tokens were seen");
    const h = new Map<string, Float32Array>();
    for (const [name, sum] of this.#sums) {
      const K = this.#sites.get(name)!.inDim;
      mirrorUpper(sum, K);
      const out = new Float32Array(K * K);
      const c = 2 / n;
      for (let i = 0; i < out.length; i++) out[i] = c * sum[i]!;
      h.set(name, out);
    }
    return { tokens: n, h };
  }
}
