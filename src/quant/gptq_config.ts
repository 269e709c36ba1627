// `quantization_config` (config.json) / `quantize_config.json`: what a GPTQ checkpoint
// says about itself, validated once here. Readers of the tensors (checkpoint.ts) trust it.
//
// Fields read (AutoGPTQ, GPTQModel, transformers' GPTQConfig and vLLM spell them so):
//   quant_method "gptq" (AutoGPTQ's quantize_config.json omits it), bits 2|3|4|8,
//   group_size (-1 = one group), sym (default true), desc_act (default false),
//   checkpoint_format or format: "gptq" (default) | "gptq_v2", pack_dtype "int32",
//   dynamic: GPTQModel's per-module overrides {"+:regex": {bits, group_size, sym, desc_act}}
//   and exclusions {"-:regex": {}}, matched against module names from the start, first
//   match wins (vLLM's get_dynamic_override).
// Everything else (damp_percent, true_sequential, static_groups, lm_head, meta, ...)
// describes how the checkpoint was made and does not change how it is read.

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { GptqFormat } from "./gptq_pack.js";
import { QUANT_BITS, type QuantBits, type QuantSpec } from "./types.js";

export class QuantConfigError extends Error {
  constructor(
    readonly source: string,
    readonly field: string | null,
    message: string,
  ) {
    super(`${source}: ${message}`);
    this.name = "QuantConfigError";
  }
}

export interface DynamicRule {
  /** The key as written, e.g. "+:model\\.layers\\.0\\..*". */
  readonly key: string;
  /** "-:" rules leave matching modules unquantized. */
  readonly exclude: boolean;
  readonly pattern: RegExp;
  readonly override: Partial<QuantSpec>;
}

export interface GptqConfig {
  /** Where it was read from. */
  readonly source: string;
  /** The spec of every module no dynamic rule overrides. */
  readonly spec: QuantSpec;
  readonly format: GptqFormat;
  readonly dynamic: readonly DynamicRule[];
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

const FORMATS: readonly GptqFormat[] = ["gptq", "gptq_v2"];

/** The spec fields of `obj` (a quantization_config or a dynamic override), each validated. */
function specFields(obj: Json, source: string, prefix: string): Partial<QuantSpec> {
  const out: { -readonly [K in keyof QuantSpec]?: QuantSpec[K] } = {};
  const fail = (field: string, msg: string) => new QuantConfigError(source, prefix + field, msg);
  if (obj["bits"] !== undefined) {
    const b = obj["bits"];
    if (!(QUANT_BITS as readonly unknown[]).includes(b)) {
      throw fail("bits", `${prefix}bits ${JSON.stringify(b)} is not supported; GPTQ checkpoints with ${QUANT_BITS.join(", ")} bits are`);
    }
    out.bits = b as QuantBits;
  }
  if (obj["group_size"] !== undefined) {
    const g = obj["group_size"];
    if (typeof g !== "number" || !Number.isSafeInteger(g) || (g !== -1 && g <= 0)) {
      throw fail("group_size", `${prefix}group_size must be a positive integer or -1 (one group per output), got ${JSON.stringify(g)}`);
    }
    out.groupSize = g;
  }
  for (const [field, key] of [["sym", "sym"], ["desc_act", "descAct"]] as const) {
    const v = obj[field];
    if (v === undefined || v === null) continue;
    if (typeof v !== "boolean") throw fail(field, `${prefix}${field} must be true or false, got ${JSON.stringify(v)}`);
    out[key] = v;
  }
  return out;
}

function parseDynamic(v: unknown, source: string): DynamicRule[] {
  if (v === undefined || v === null) return [];
  if (!isObject(v)) throw new QuantConfigError(source, "dynamic", `dynamic must be an object of "+:regex"/"-:regex" rules, got ${JSON.stringify(v)}`);
  return Object.entries(v).map(([key, ov]) => {
    const exclude = key.startsWith("-:");
    const body = exclude || key.startsWith("+:") ? key.slice(2) : key;
    let pattern: RegExp;
    try {
      // Python's re.match anchors at the start only.
      pattern = new RegExp(`^(?:${body})`);
    } catch (e) {
      throw new QuantConfigError(source, "dynamic", `dynamic rule ${JSON.stringify(key)} is not a regular expression we can read (${(e as Error).message})`);
    }
    if (!isObject(ov)) throw new QuantConfigError(source, "dynamic", `dynamic rule ${JSON.stringify(key)} must map to an object of overrides`);
    return { key, exclude, pattern, override: exclude ? {} : specFields(ov, source, `dynamic[${JSON.stringify(key)}].`) };
  });
}

/** Validates a quantization_config object; `source` names the file in errors. */
export function parseGptqConfig(json: unknown, source: string): GptqConfig {
  if (!isObject(json)) throw new QuantConfigError(source, null, "quantization_config must be a JSON object");
  const fail = (field: string, msg: string) => new QuantConfigError(source, field, msg);
  const method = json["quant_method"];
  if (method !== undefined && method !== null && method !== "gptq") {
    throw fail("quant_method", `quant_method ${JSON.stringify(method)} is not supported; only GPTQ checkpoints (quant_method "gptq") are. Quantize the unquantized model with \`inlaid quantize\` instead`);
  }
  if (json["is_marlin_format"] === true) {
    throw fail("is_marlin_format", "this checkpoint is in Marlin's repacked layout; only the plain GPTQ layout (qweight/qzeros/scales/g_idx) is supported");
  }
  const formatField = json["checkpoint_format"] !== undefined && json["checkpoint_format"] !== null ? "checkpoint_format" : "format";
  const fmt = json[formatField] ?? "gptq";
  if (typeof fmt !== "string" || !(FORMATS as readonly string[]).includes(fmt.toLowerCase())) {
    throw fail(formatField, `${formatField} ${JSON.stringify(fmt)} is not supported; supported: ${FORMATS.join(", ")}`);
  }
  const pack = json["pack_dtype"];
  if (pack !== undefined && pack !== null && pack !== "int32" && pack !== "torch.int32") {
    throw fail("pack_dtype", `pack_dtype ${JSON.stringify(pack)} is not supported; only int32 packing (the GPTQ default) is`);
  }
  const fields = specFields(json, source, "");
  if (fields.bits === undefined) throw fail("bits", "bits is missing");
  if (fields.groupSize === undefined) throw fail("group_size", "group_size is missing");
  const spec: QuantSpec = { bits: fields.bits, groupSize: fields.groupSize, sym: fields.sym ?? true, descAct: fields.descAct ?? false };
  return { source, spec, format: fmt.toLowerCase() as GptqFormat, dynamic: parseDynamic(json["dynamic"], source) };
}

function readJson(path: string): unknown {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new QuantConfigError(path, null, `cannot read it as JSON (${(e as Error).message})`);
  }
}

/**
 * The GPTQ config of a model folder: config.json's `quantization_config`, else a
 * `quantize_config.json` beside it (AutoGPTQ), else null (not quantized).
 */
export function readGptqConfig(dir: string): GptqConfig | null {
  const configPath = join(dir, "config.json");
  if (existsSync(configPath)) {
    const cfg = readJson(configPath);
    if (isObject(cfg) && cfg["quantization_config"] !== undefined && cfg["quantization_config"] !== null) {
      return parseGptqConfig(cfg["quantization_config"], `${configPath} (quantization_config)`);
    }
  }
  const qPath = join(dir, "quantize_config.json");
  if (existsSync(qPath)) return parseGptqConfig(readJson(qPath), qPath);
  return null;
}

/** The quantization spec of a model folder, or null when it is not quantized. */
export function readQuantSpec(dir: string): QuantSpec | null {
  return readGptqConfig(dir)?.spec ?? null;
}

/** The spec a module was quantized with, or null when a dynamic rule excludes it. */
export function moduleSpec(cfg: GptqConfig, module: string): QuantSpec | null {
  for (const rule of cfg.dynamic) {
    if (!rule.pattern.test(module)) continue;
    return rule.exclude ? null : { ...cfg.spec, ...rule.override };
  }
  return cfg.spec;
}

/**
 * The quantization_config we write: what transformers' GPTQConfig and vLLM's GPTQ and
 * GPTQ-Marlin configs read (vLLM requires bits, group_size, desc_act and, for Marlin, sym;
 * transformers checks 0 < damp_percent < 1).
 */
export function gptqConfigJson(spec: QuantSpec, opts: { dampPercent?: number; lmHead?: boolean; quantizer?: string } = {}): Json {
  const damp = opts.dampPercent ?? 0.01;
  if (!(damp > 0 && damp < 1)) throw new RangeError(`damp_percent must be in (0, 1), got ${damp}`);
  return {
    quant_method: "gptq",
    bits: spec.bits,
    group_size: spec.groupSize,
    desc_act: spec.descAct,
    sym: spec.sym,
    damp_percent: damp,
    true_sequential: true,
    static_groups: false,
    lm_head: opts.lmHead ?? false,
    checkpoint_format: "gptq",
    pack_dtype: "int32",
    meta: { quantizer: [opts.quantizer ?? "inlaid"] },
  };
}
