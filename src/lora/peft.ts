// Loads a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
// into f32 A/B matrices per (layer, projection), checked against the base model.
//
// Only plain LoRA on the seven Llama-family projections is served: anything that
// changes the forward beyond y += s * B(A x) (DoRA, biases, replaced modules, embedding
// LoRA...) is refused with an AdapterLoadError that names it, rather than served wrong.
// Pickled adapter_model.bin files are never opened.

import { existsSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { toF32 } from "../backend/tensor.js";
import type { ModelConfig } from "../model/config.js";
import { SafetensorsFile, type TensorInfo } from "../model/safetensors.js";
// The same dims the base weights are checked against and the adapter pool allocates.
import { projDims } from "../model/weights.js";

export const TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;
export type TargetModule = (typeof TARGET_MODULES)[number];

export interface LoraModuleWeights {
  readonly layer: number;
  readonly module: TargetModule;
  readonly rank: number;
  readonly scale: number;
  readonly inDim: number;
  readonly outDim: number;
  /** [rank, inDim] row-major (lora_A.weight as stored). */
  readonly a: Float32Array;
  /** [outDim, rank] row-major (lora_B.weight as stored). */
  readonly b: Float32Array;
}

export interface PeftAdapter {
  readonly path: string;
  readonly maxRank: number;
  /** Projections that carry weights in at least one layer, in TARGET_MODULES order. */
  readonly targetModules: readonly TargetModule[];
  /** Sorted by layer, then TARGET_MODULES order. */
  readonly modules: readonly LoraModuleWeights[];
  /** f32 bytes of all A and B matrices. */
  readonly sizeBytes: number;
}

/** The adapter at `path` cannot be served; the message says what is wrong and what to do. */
export class AdapterLoadError extends Error {
  constructor(
    readonly path: string,
    readonly reason: string,
  ) {
    super(`adapter ${path}: ${reason}`);
    this.name = "AdapterLoadError";
  }
}

const SUBLAYER: Readonly<Record<TargetModule, "self_attn" | "mlp">> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

function isTargetModule(s: string): s is TargetModule {
  return (TARGET_MODULES as readonly string[]).includes(s);
}

// `...layers.3.self_attn.q_proj.lora_A.weight`, optionally with the adapter name
// (`lora_A.default.weight`) that some savers leave in.
const LORA_TENSOR = /^(?:.*\.)?layers\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight$/;
/** Any LoRA A/B tensor, to name the module of one that is not in a decoder layer (lm_head...). */
const ANY_LORA = /(?:^|\.)([A-Za-z0-9_]+)\.lora_(?:A|B)(?:\.[A-Za-z0-9_]+)?\.weight$/;

interface RawConfig {
  readonly r: number;
  readonly alpha: number;
  readonly rslora: boolean;
  readonly rankPattern: ReadonlyArray<readonly [RegExp, string, number]>;
  readonly alphaPattern: ReadonlyArray<readonly [RegExp, string, number]>;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Set-like fields count as "used" when they are non-null and not empty. */
function nonEmpty(v: unknown): boolean {
  if (v === undefined || v === null || v === false) return false;
  if (Array.isArray(v)) return v.length > 0;
  if (isObject(v)) return Object.keys(v).length > 0;
  return true;
}

function parseConfig(path: string, json: unknown): RawConfig {
  const fail = (why: string) => new AdapterLoadError(path, why);
  if (!isObject(json)) throw fail("adapter_config.json must be a JSON object");
  const c = json;

  const peftType = c["peft_type"];
  if (peftType !== undefined && peftType !== "LORA") {
    throw fail(`peft_type ${JSON.stringify(peftType)} is not supported; only LORA adapters can be served`);
  }
  if (c["use_dora"] === true) {
    throw fail("use_dora is true: DoRA adapters are not supported (they rescale each weight column, not just add B·A); retrain without DoRA or merge it into the base model");
  }
  if (c["use_qalora"] === true) throw fail("use_qalora is true: QA-LoRA adapters are not supported; retrain as plain LoRA");
  if (nonEmpty(c["modules_to_save"])) {
    throw fail(
      `modules_to_save ${JSON.stringify(c["modules_to_save"])} is not supported: the adapter replaces whole base modules, which cannot be shared between adapters; retrain with modules_to_save=None`,
    );
  }
  const bias = c["bias"] ?? "none";
  if (bias !== "none") throw fail(`bias ${JSON.stringify(bias)} is not supported (adapters that train base biases change the shared base); retrain with bias="none"`);
  if (c["lora_bias"] === true) throw fail("lora_bias is true: a bias on lora_B is not supported; retrain with lora_bias=False");
  if (c["fan_in_fan_out"] === true) {
    throw fail("fan_in_fan_out is true (weights stored transposed, for GPT-2-style Conv1D layers); Llama-family adapters must use fan_in_fan_out=False");
  }
  for (const field of ["layer_replication", "trainable_token_indices", "alora_invocation_tokens", "target_parameters", "arrow_config"]) {
    if (nonEmpty(c[field])) throw fail(`${field} is set (${JSON.stringify(c[field])}), which is not supported; retrain as a plain LoRA adapter`);
  }

  // A list names modules (matched by suffix); a string is a regex PEFT matched against
  // module names, or "all-linear" — for those, the tensors present tell the targets.
  const targets = c["target_modules"];
  if (Array.isArray(targets)) {
    for (const t of targets) {
      const last = typeof t === "string" ? t.split(".").pop()! : String(t);
      if (!isTargetModule(last)) {
        throw fail(`target module ${JSON.stringify(t)} is not supported; LoRA may target only ${TARGET_MODULES.join(", ")}`);
      }
    }
  } else if (targets !== undefined && targets !== null && typeof targets !== "string") {
    throw fail(`target_modules must be a list or a string, got ${JSON.stringify(targets)}`);
  }

  // PEFT's own defaults (LoraConfig) when a field is missing.
  const r = c["r"] ?? 8;
  if (typeof r !== "number" || !Number.isSafeInteger(r) || r < 1) throw fail(`r must be a positive integer, got ${JSON.stringify(r)}`);
  const alpha = c["lora_alpha"] ?? 8;
  if (typeof alpha !== "number" || !Number.isFinite(alpha)) throw fail(`lora_alpha must be a number, got ${JSON.stringify(alpha)}`);
  const rslora = c["use_rslora"] ?? false;
  if (typeof rslora !== "boolean") throw fail(`use_rslora must be true or false, got ${JSON.stringify(rslora)}`);

  return {
    r,
    alpha,
    rslora,
    rankPattern: parsePattern(path, c, "rank_pattern", true),
    alphaPattern: parsePattern(path, c, "alpha_pattern", false),
  };
}

/**
 * rank_pattern / alpha_pattern: key -> value, in file order. PEFT's get_pattern_key
 * matches each key against the full module name with `(.*\.)?(KEY)$` and takes the
 * first key that matches, so keys may be a bare name, a dotted suffix or a regex.
 */
function parsePattern(path: string, c: Record<string, unknown>, field: string, integer: boolean): Array<readonly [RegExp, string, number]> {
  const p = c[field];
  if (p === undefined || p === null) return [];
  if (!isObject(p)) throw new AdapterLoadError(path, `${field} must be an object of module pattern -> number`);
  return Object.entries(p).map(([key, v]) => {
    if (typeof v !== "number" || !Number.isFinite(v) || (integer && (!Number.isSafeInteger(v) || v < 1))) {
      throw new AdapterLoadError(path, `${field}[${JSON.stringify(key)}] must be ${integer ? "a positive integer" : "a number"}, got ${JSON.stringify(v)}`);
    }
    let re: RegExp;
    try {
      re = new RegExp(`^(?:.*\\.)?(?:${key})$`);
    } catch (e) {
      throw new AdapterLoadError(path, `${field} key ${JSON.stringify(key)} is not a valid regular expression (${(e as Error).message})`);
    }
    return [re, key, v] as const;
  });
}

function lookup(pattern: RawConfig["rankPattern"], moduleName: string): { key: string; value: number } | null {
  for (const [re, key, value] of pattern) if (re.test(moduleName)) return { key, value };
  return null;
}

interface Pair {
  layer: number;
  module: TargetModule;
  a?: string;
  b?: string;
}

/** Reads, validates and converts the adapter in `dir` for a base model with config `model`. */
export function loadPeftAdapter(dir: string, model: ModelConfig): PeftAdapter {
  const path = resolve(dir);
  const fail = (why: string) => new AdapterLoadError(path, why);
  if (!existsSync(path) || !statSync(path).isDirectory()) throw fail("is not a folder; an adapter is a PEFT folder with adapter_config.json and adapter_model.safetensors");

  const configPath = join(path, "adapter_config.json");
  const weightsPath = join(path, "adapter_model.safetensors");
  const binPath = join(path, "adapter_model.bin");
  if (!existsSync(configPath)) {
    throw fail("has no adapter_config.json; a PEFT adapter folder needs adapter_config.json and adapter_model.safetensors (as written by PeftModel.save_pretrained)");
  }
  if (!existsSync(weightsPath)) {
    if (existsSync(binPath)) {
      throw fail(
        "has only adapter_model.bin: pickled .bin adapters are not supported (never unpickled); convert to safetensors with " +
          "`PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)` or safetensors.torch.save_file",
      );
    }
    throw fail("has no adapter_model.safetensors");
  }

  let json: unknown;
  try {
    json = JSON.parse(readFileSync(configPath, "utf8"));
  } catch (e) {
    throw fail(`adapter_config.json is not valid JSON (${(e as Error).message})`);
  }
  const cfg = parseConfig(path, json);

  let file: SafetensorsFile;
  try {
    file = SafetensorsFile.open(weightsPath);
  } catch (e) {
    throw fail((e as Error).message);
  }
  try {
    return readModules(path, file, cfg, model);
  } finally {
    file.close();
  }
}

function readModules(path: string, file: SafetensorsFile, cfg: RawConfig, model: ModelConfig): PeftAdapter {
  const fail = (why: string) => new AdapterLoadError(path, why);

  // Pair up A and B per (layer, module), refusing anything that is not plain LoRA.
  const pairs = new Map<string, Pair>();
  for (const name of file.names()) {
    const m = LORA_TENSOR.exec(name);
    if (!m) throw fail(describeForeignTensor(name));
    const layerStr = m[1]!, sub = m[2]!, mod = m[3]!, ab = m[4] as "A" | "B";
    if (!isTargetModule(mod)) {
      throw fail(`target module ${JSON.stringify(mod)} (tensor ${name}) is not supported; LoRA may target only ${TARGET_MODULES.join(", ")}`);
    }
    if (SUBLAYER[mod] !== sub) throw fail(`tensor ${name}: ${mod} belongs under ${SUBLAYER[mod]}, not ${sub}; is this adapter for a Llama-family model?`);
    const layer = Number(layerStr);
    if (layer >= model.numLayers) {
      throw fail(`tensor ${name} is for layer ${layer}, but the base model has ${model.numLayers} layers (0..${model.numLayers - 1}); is this adapter for a different base model?`);
    }
    const key = `${layer}.${mod}`;
    const pair = pairs.get(key) ?? { layer, module: mod };
    const slot = ab === "A" ? "a" : "b";
    if (pair[slot] !== undefined) throw fail(`module model.layers.${layer}.${sub}.${mod} has two lora_${ab} tensors (${pair[slot]} and ${name})`);
    pair[slot] = name;
    pairs.set(key, pair);
  }
  if (pairs.size === 0) throw fail("adapter_model.safetensors contains no LoRA weights");

  const ordered = [...pairs.values()].sort((x, y) => x.layer - y.layer || TARGET_MODULES.indexOf(x.module) - TARGET_MODULES.indexOf(y.module));

  // Check every shape, rank and dtype before reading any data.
  const plans = ordered.map((p) => {
    const moduleName = `model.layers.${p.layer}.${SUBLAYER[p.module]}.${p.module}`;
    if (p.a === undefined || p.b === undefined) {
      throw fail(`module ${moduleName} has lora_${p.a === undefined ? "A" : "B"} missing (found only ${p.a ?? p.b}); the adapter file is incomplete`);
    }
    const { inDim, outDim } = projDims(model, p.module);
    const aInfo = checkedInfo(path, file, p.a);
    const bInfo = checkedInfo(path, file, p.b);
    if (aInfo.shape.length !== 2) throw fail(`tensor ${p.a} has shape [${aInfo.shape.join(", ")}], expected [rank, ${inDim}]`);
    const stored = aInfo.shape[0]!;
    const rankFrom = lookup(cfg.rankPattern, moduleName);
    const rank = rankFrom?.value ?? cfg.r;
    if (stored !== rank) {
      const why = rankFrom ? `rank_pattern key ${JSON.stringify(rankFrom.key)}` : "r";
      throw fail(`tensor ${p.a} has rank ${stored}, but adapter_config.json gives ${moduleName} rank ${rank} (from ${why}); the config does not match the weights`);
    }
    const expectA = [rank, inDim];
    const expectB = [outDim, rank];
    if (!sameShape(aInfo.shape, expectA)) {
      throw fail(`tensor ${p.a} has shape [${aInfo.shape.join(", ")}], expected [${expectA.join(", ")}] (rank × ${p.module} input); is this adapter for a different base model?`);
    }
    if (!sameShape(bInfo.shape, expectB)) {
      throw fail(`tensor ${p.b} has shape [${bInfo.shape.join(", ")}], expected [${expectB.join(", ")}] (${p.module} output × rank); is this adapter for a different base model?`);
    }
    const alpha = lookup(cfg.alphaPattern, moduleName)?.value ?? cfg.alpha;
    // rsLoRA keeps the update's scale stable across ranks by dividing by sqrt(r).
    const scale = cfg.rslora ? alpha / Math.sqrt(rank) : alpha / rank;
    return { layer: p.layer, module: p.module, rank, scale, inDim, outDim, aName: p.a, bName: p.b };
  });

  const modules: LoraModuleWeights[] = plans.map((p) => ({
    layer: p.layer,
    module: p.module,
    rank: p.rank,
    scale: p.scale,
    inDim: p.inDim,
    outDim: p.outDim,
    a: readF32(path, file, p.aName),
    b: readF32(path, file, p.bName),
  }));

  const present = new Set(modules.map((m) => m.module));
  return {
    path,
    maxRank: Math.max(...modules.map((m) => m.rank)),
    targetModules: TARGET_MODULES.filter((m) => present.has(m)),
    modules,
    sizeBytes: modules.reduce((n, m) => n + (m.a.length + m.b.length) * 4, 0),
  };
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function checkedInfo(path: string, file: SafetensorsFile, name: string): TensorInfo {
  const info = file.info(name);
  if (info.dtype !== "f32" && info.dtype !== "bf16" && info.dtype !== "f16") {
    throw new AdapterLoadError(path, `tensor ${name} has dtype ${info.fileDtype}; LoRA weights must be F32, F16 or BF16`);
  }
  return info;
}

function readF32(path: string, file: SafetensorsFile, name: string): Float32Array {
  try {
    const t = file.get(name);
    // `get` returns a fresh array, so an f32 tensor can be kept without another copy.
    return toF32(t.data, t.dtype);
  } catch (e) {
    throw new AdapterLoadError(path, (e as Error).message);
  }
}

/** Says why a tensor that is not a decoder-layer LoRA A/B weight cannot be served. */
function describeForeignTensor(name: string): string {
  if (name.includes("lora_magnitude_vector")) return `tensor ${name} is a DoRA magnitude vector: DoRA adapters are not supported; retrain without DoRA`;
  if (/\.lora_B(?:\.[A-Za-z0-9_]+)?\.bias$/.test(name)) return `tensor ${name} is a lora_B bias: lora_bias adapters are not supported; retrain with lora_bias=False`;
  const emb = /(?:^|\.)([A-Za-z0-9_]+)\.lora_embedding_[AB](?:\.[A-Za-z0-9_]+)?$/.exec(name);
  if (emb) return `target module ${JSON.stringify(emb[1])} (tensor ${name}, an embedding LoRA) is not supported; LoRA may target only ${TARGET_MODULES.join(", ")}`;
  const m = ANY_LORA.exec(name);
  if (m) return `target module ${JSON.stringify(m[1])} (tensor ${name}) is not supported; LoRA may target only ${TARGET_MODULES.join(", ")}`;
  return `tensor ${name} is not a LoRA A/B weight of a decoder-layer projection (a saved base module or trained bias?); only plain LoRA adapters are supported`;
}
