// Synthetic LoRA adapters for benchmarks: PEFT folders (adapter_config.json +
// adapter_model.safetensors) of rank r on all seven projections of a model config,
// with small random weights, so adapter cost can be measured on any shape without
// training anything.
//
// Size: per layer r * (sum of the seven projections' in + out dims) values; for
// Llama-2-7B at r = 16 that is 16 * (35584 + 42496) = 1.25M per layer, 40M over 32
// layers: 80 MB in bf16 per adapter. Weights are written as bf16 (half of f32 on disk)
// and cached: a folder is named by its shape, rank and seed, written once (into a temp
// folder renamed into place, so a crashed run never leaves half an adapter) and reused.

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { HostTensor } from "../backend/backend.js";
import { TARGET_MODULES, type TargetModule } from "../lora/peft.js";
import type { ModelConfig } from "../model/config.js";
import { writeSafetensors } from "../model/safetensors.js";
import { projDims } from "../model/weights.js";

export interface SyntheticAdapterOptions {
  readonly rank: number;
  /** Different seeds give different weights (default 0). */
  readonly seed?: number;
  /** lora_alpha (default 2 * rank, a common choice: scale 2). */
  readonly alpha?: number;
}

/** Where synthetic adapters are cached unless a folder is given. */
export const DEFAULT_ADAPTER_CACHE = join(tmpdir(), "inlaid-bench-adapters");

/** Bump when the file contents change, so old caches are not reused. */
const FORMAT_VERSION = 1;

const SUBLAYER: Readonly<Record<TargetModule, string>> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

/** Values (A plus B) of one adapter of rank `rank` on all seven projections of every layer. */
export function syntheticAdapterParams(config: ModelConfig, rank: number): number {
  let perLayer = 0;
  for (const m of TARGET_MODULES) {
    const { inDim, outDim } = projDims(config, m);
    perLayer += rank * (inDim + outDim);
  }
  return perLayer * config.numLayers;
}

/**
 * Uniform values in [-bound, bound) as bf16 bits (truncated: these are random numbers,
 * rounding does not matter). xorshift32 seeded per tensor: fast, and the same seed
 * always gives the same file.
 */
function randomBf16(n: number, seed: number, bound: number): Uint16Array {
  const f = new Float32Array(n);
  let s = (seed ^ 0x9e3779b9) >>> 0 || 1;
  const k = (2 * bound) / 2 ** 32;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    f[i] = (s >>> 0) * k - bound;
  }
  const bits = new Uint32Array(f.buffer);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = bits[i]! >>> 16;
  return out;
}

/** Writes one synthetic adapter into `dir` (created if missing; files replaced). */
export function writeSyntheticAdapter(dir: string, config: ModelConfig, opts: SyntheticAdapterOptions): void {
  const { rank } = opts;
  if (!Number.isSafeInteger(rank) || rank < 1) throw new Error(`synthetic adapter rank must be a positive integer, got ${rank}`);
  const seed = opts.seed ?? 0;
  const tensors: Record<string, HostTensor> = {};
  let t = 0;
  for (let l = 0; l < config.numLayers; l++) {
    for (const m of TARGET_MODULES) {
      const { inDim, outDim } = projDims(config, m);
      const pre = `base_model.model.model.layers.${l}.${SUBLAYER[m]}.${m}`;
      // A like PEFT's kaiming-uniform init (bound 1/sqrt(in)); B small but not zero
      // (PEFT initializes B to zero, which would make the adapter a no-op).
      tensors[`${pre}.lora_A.weight`] = { shape: [rank, inDim], dtype: "bf16", data: randomBf16(rank * inDim, seed * 1_000_003 + t++, 1 / Math.sqrt(inDim)) };
      tensors[`${pre}.lora_B.weight`] = { shape: [outDim, rank], dtype: "bf16", data: randomBf16(outDim * rank, seed * 1_000_003 + t++, 0.01) };
    }
  }
  mkdirSync(dir, { recursive: true });
  writeSafetensors(join(dir, "adapter_model.safetensors"), tensors, { format: "pt" });
  const adapterConfig = {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: null,
    r: rank,
    lora_alpha: opts.alpha ?? 2 * rank,
    lora_dropout: 0.0,
    target_modules: [...TARGET_MODULES],
    bias: "none",
    fan_in_fan_out: false,
    use_rslora: false,
    use_dora: false,
    modules_to_save: null,
    init_lora_weights: true,
    inference_mode: true,
    rank_pattern: {},
    alpha_pattern: {},
  };
  writeFileSync(join(dir, "adapter_config.json"), `${JSON.stringify(adapterConfig, null, 2)}\n`);
}

/** Cache folder name: readable shape and rank, plus a hash of everything that shapes the files. */
function cacheName(config: ModelConfig, opts: Required<SyntheticAdapterOptions>): string {
  const key = JSON.stringify({
    v: FORMAT_VERSION,
    l: config.numLayers, h: config.hiddenSize, i: config.intermediateSize,
    nh: config.numHeads, nkv: config.numKvHeads, d: config.headDim,
    r: opts.rank, a: opts.alpha, s: opts.seed,
  });
  const hash = createHash("sha256").update(key).digest("hex").slice(0, 12);
  return `L${config.numLayers}-H${config.hiddenSize}-r${opts.rank}-s${opts.seed}-${hash}`;
}

/**
 * `count` synthetic adapters (seeds 0..count-1) for `config`, from the cache under
 * `cacheDir` or written there. Returns their folders; `onWrite` hears of each one written.
 */
export function syntheticAdapters(
  config: ModelConfig,
  count: number,
  rank: number,
  cacheDir = DEFAULT_ADAPTER_CACHE,
  onWrite?: (dir: string) => void,
): string[] {
  const dirs: string[] = [];
  mkdirSync(cacheDir, { recursive: true });
  for (let seed = 0; seed < count; seed++) {
    const opts = { rank, seed, alpha: 2 * rank };
    const dir = join(cacheDir, cacheName(config, opts));
    if (!existsSync(join(dir, "adapter_config.json"))) {
      const tmp = mkdtempSync(join(cacheDir, ".tmp-"));
      try {
        writeSyntheticAdapter(tmp, config, opts);
        renameSync(tmp, dir);
      } catch (e) {
        rmSync(tmp, { recursive: true, force: true });
        // Another run may have written the same adapter meanwhile; that copy is as good.
        if (!existsSync(join(dir, "adapter_config.json"))) throw e;
      }
      onWrite?.(dir);
    }
    dirs.push(dir);
  }
  return dirs;
}
