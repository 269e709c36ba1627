// Loading a GPTQ checkpoint's linears onto a backend with low-bit kernels (CUDA): each fused
// group (q/k/v, o, gate/up, down) whose members are all quantized, share bit width, group
// size and g_idx, and fit the kernels becomes one QuantLinear; everything else (and every
// other tensor) is loaded dense by loadLlamaWeights, from the dequantizing QuantizedSource,
// exactly as before. Usage (engine.ts):
//   const quant = QuantizedLinears.load(backend, config, dir, { onWarning, onTensor });
//   const weights = quant.attach(loadLlamaWeights(backend, config, src, onTensor, { skip: quant.skip }));
// A group that cannot be served quantized is named in a warning with the reason.

import type { Backend, QuantizedTensor } from "../backend/backend.js";
import type { ModelConfig } from "../model/config.js";
import { GROUP_NAMES, LINEAR_GROUPS, type Linear, type LinearGroup, type Projection } from "../model/linear.js";
import { SafetensorsDir } from "../model/safetensors.js";
import type { LlamaWeights } from "../model/weights.js";
import { moduleSpec, readGptqConfig, type GptqConfig } from "./gptq_config.js";
import { unpackGptq } from "./gptq_pack.js";
import { linearModules } from "./modules.js";
import { QuantLinear, stackQuantized } from "./quant_linear.js";
import type { QuantizedWeight, QuantSpec } from "./types.js";
import { groupDims } from "../model/weights.js";

export interface QuantizedLinearsOptions {
  /** A group served dequantized instead, and why (default: console.warn). */
  readonly onWarning?: (message: string) => void;
  /** Called with `${module}.weight` for every projection loaded quantized (progress counts). */
  readonly onTensor?: (name: string) => void;
}

/** Errors that mean "these weights do not fit the kernels": the group is served dense instead. */
const FALLBACK_ERRORS = new Set(["QuantLayoutError", "QuantStackError"]);

function readModule(st: SafetensorsDir, cfg: GptqConfig, module: string): QuantizedWeight {
  const spec = moduleSpec(cfg, module);
  if (!spec) throw new Error(`${module} has a qweight, but ${cfg.source}'s dynamic rules exclude it from quantization; the checkpoint is inconsistent`);
  const g = `${module}.g_idx`;
  return unpackGptq(
    { qweight: st.get(`${module}.qweight`), qzeros: st.get(`${module}.qzeros`), scales: st.get(`${module}.scales`), g_idx: st.has(g) ? st.get(g) : null },
    spec, cfg.format, `${st.path}: ${module}`,
  );
}

export class QuantizedLinears {
  readonly #backend: Backend;
  /** `${layer}.${group}` -> the group's quantized weight on the backend. */
  readonly #weights: Map<string, QuantizedTensor>;
  /** Groups served dense, with the reason. */
  readonly fallbacks: readonly { layer: number; group: LinearGroup; reason: string }[];

  private constructor(backend: Backend, weights: Map<string, QuantizedTensor>, fallbacks: { layer: number; group: LinearGroup; reason: string }[]) {
    this.#backend = backend;
    this.#weights = weights;
    this.fallbacks = fallbacks;
  }

  /**
   * Uploads every fused group of the GPTQ checkpoint in `dir` that the backend's kernels
   * take. A backend without uploadQuantized gets none (everything is loaded dense).
   */
  static load(backend: Backend, cfg: ModelConfig, dir: string, opts: QuantizedLinearsOptions = {}): QuantizedLinears {
    const weights = new Map<string, QuantizedTensor>();
    const fallbacks: { layer: number; group: LinearGroup; reason: string }[] = [];
    const gcfg = readGptqConfig(dir);
    if (!gcfg || !backend.uploadQuantized || !backend.linearQuantized) return new QuantizedLinears(backend, weights, fallbacks);
    const warn = opts.onWarning ?? ((m: string) => console.warn(`inlaid: ${m}`));
    const names = new Map(linearModules(cfg).map((m) => [`${m.layer}.${m.proj}`, m.name]));
    const st = SafetensorsDir.open(dir);
    try {
      for (let l = 0; l < cfg.numLayers; l++) {
        for (const g of GROUP_NAMES) {
          const modules = (LINEAR_GROUPS[g] as readonly Projection[]).map((p) => names.get(`${l}.${p}`)!);
          const quantized = modules.filter((m) => st.has(`${m}.qweight`));
          if (quantized.length === 0) continue;
          let reason: string | null = null;
          if (quantized.length !== modules.length) {
            reason = `only ${quantized.join(", ")} of the fused ${modules.join(", ")} are quantized`;
          } else {
            try {
              const q = stackQuantized(modules.map((m) => readModule(st, gcfg, m)));
              weights.set(`${l}.${g}`, backend.uploadQuantized(q));
              for (const m of modules) opts.onTensor?.(`${m}.weight`);
            } catch (e) {
              if (!(e instanceof Error) || !FALLBACK_ERRORS.has(e.name)) throw e;
              reason = e.message;
            }
          }
          if (reason !== null) {
            fallbacks.push({ layer: l, group: g, reason });
            warn(`layer ${l} ${g} is served dequantized (bf16), not with the low-bit kernel: ${reason}`);
          }
        }
      }
    } catch (e) {
      for (const w of weights.values()) backend.freeQuantized?.(w);
      throw e;
    } finally {
      st.close();
    }
    return new QuantizedLinears(backend, weights, fallbacks);
  }

  /**
   * Random quantized weights of the config's shapes for every fused group (`--load-format
   * dummy` of a model folder whose config has a quantization_config): what a quantized
   * checkpoint of that model costs in memory and time, without one. Backends without
   * randomQuantized get none (the engine makes dense random weights).
   */
  static dummy(backend: Backend, cfg: ModelConfig, spec: QuantSpec, opts: Pick<QuantizedLinearsOptions, "onWarning"> = {}): QuantizedLinears {
    const weights = new Map<string, QuantizedTensor>();
    const fallbacks: { layer: number; group: LinearGroup; reason: string }[] = [];
    if (!backend.randomQuantized || !backend.linearQuantized) return new QuantizedLinears(backend, weights, fallbacks);
    const warn = opts.onWarning ?? ((m: string) => console.warn(`inlaid: ${m}`));
    let seed = 0;
    for (let l = 0; l < cfg.numLayers; l++) {
      for (const g of GROUP_NAMES) {
        const { inDim, outDims } = groupDims(cfg, g);
        try {
          weights.set(`${l}.${g}`, backend.randomQuantized(spec, inDim, outDims.reduce((a, b) => a + b, 0), ++seed, 0.02));
        } catch (e) {
          if (!(e instanceof Error) || !FALLBACK_ERRORS.has(e.name)) throw e;
          fallbacks.push({ layer: l, group: g, reason: e.message });
          warn(`layer ${l} ${g} gets dense random weights, not low-bit ones: ${e.message}`);
        }
      }
    }
    return new QuantizedLinears(backend, weights, fallbacks);
  }

  /** How many fused groups are served quantized. */
  get size(): number {
    return this.#weights.size;
  }

  /** For loadLlamaWeights: the groups whose dense weights must not be loaded. */
  readonly skip = (layer: number, group: LinearGroup): boolean => this.#weights.has(`${layer}.${group}`);

  /** `weights` with a QuantLinear (and the group's dense-loaded bias) in place of every quantized group. */
  attach(weights: LlamaWeights): LlamaWeights {
    if (this.#weights.size === 0) return weights;
    return {
      ...weights,
      layers: weights.layers.map((lw, l) => {
        const linears: Partial<Record<LinearGroup, Linear>> = { ...lw.linears };
        for (const g of GROUP_NAMES) {
          const w = this.#weights.get(`${l}.${g}`);
          if (w) linears[g] = new QuantLinear(this.#backend, w, lw.bias[g]);
        }
        return { ...lw, linears };
      }),
    };
  }
}
