// HF config.json -> a validated ModelConfig for the Llama family (llama, mistral, qwen2).
//
// Validated once, here: everything downstream (weights, the forward, the KV cache, the
// adapter loader) trusts these numbers. Defaults follow transformers' config classes
// where a field is missing; errors name the field and the file.

import { readFileSync } from "node:fs";
import { join } from "node:path";

export type Architecture = "llama" | "mistral" | "qwen2";

export type RopeScaling =
  | { readonly type: "none" }
  | { readonly type: "linear"; readonly factor: number }
  | {
      readonly type: "llama3";
      readonly factor: number;
      readonly lowFreqFactor: number;
      readonly highFreqFactor: number;
      readonly originalMaxPositionEmbeddings: number;
    };

export interface ModelConfig {
  readonly architecture: Architecture;
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly intermediateSize: number;
  readonly numLayers: number;
  readonly numHeads: number;
  readonly numKvHeads: number;
  readonly headDim: number;
  readonly rmsNormEps: number;
  readonly maxPositionEmbeddings: number;
  readonly tieWordEmbeddings: boolean;
  /** Bias on q/k/v: llama's attention_bias; always true for qwen2. */
  readonly qkvBias: boolean;
  /** Bias on o_proj: llama's attention_bias covers it too; qwen2 has none. */
  readonly oBias: boolean;
  readonly mlpBias: boolean;
  readonly ropeTheta: number;
  readonly ropeScaling: RopeScaling;
  /** Reported only (attention here is always full); mistral/qwen2 may set it. */
  readonly slidingWindow: number | null;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  /** The checkpoint's stated dtype (torch_dtype, or transformers-v5 `dtype`); bf16 when unstated. */
  readonly dtype: "f32" | "bf16" | "f16";
}

const MODEL_TYPES: Readonly<Record<string, Architecture>> = { llama: "llama", mistral: "mistral", qwen2: "qwen2" };
const ARCHITECTURES: Readonly<Record<string, Architecture>> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
  Qwen2ForCausalLM: "qwen2",
};

/** transformers' defaults for fields a config may leave out. */
const DEFAULT_MAX_POSITIONS: Readonly<Record<Architecture, number>> = { llama: 2048, mistral: 4096 * 32, qwen2: 32768 };

const DTYPES: Readonly<Record<string, ModelConfig["dtype"]>> = {
  float32: "f32",
  float: "f32",
  bfloat16: "bf16",
  float16: "f16",
  half: "f16",
};

const SUPPORTED_ROPE = ["default", "linear", "llama3"] as const;

export class ModelConfigError extends Error {
  constructor(
    readonly source: string,
    readonly field: string | null,
    message: string,
  ) {
    super(`${source}: ${message}`);
    this.name = "ModelConfigError";
  }
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Typed field access that turns every wrong value into an error naming the field. */
class Fields {
  constructor(
    readonly obj: Json,
    readonly source: string,
    /** Prefix for nested objects, e.g. "rope_scaling.". */
    readonly prefix = "",
  ) {}

  fail(field: string, message: string): ModelConfigError {
    return new ModelConfigError(this.source, this.prefix + field, message);
  }

  /** Absent and null both mean "not given" (HF writes null for unset optionals). */
  has(field: string): boolean {
    return this.obj[field] !== undefined && this.obj[field] !== null;
  }

  int(field: string, opts: { min?: number; def?: number } = {}): number {
    const v = this.obj[field];
    if (v === undefined || v === null) {
      if (opts.def !== undefined) return opts.def;
      throw this.fail(field, `${this.prefix}${field} is missing`);
    }
    if (typeof v !== "number" || !Number.isSafeInteger(v)) throw this.fail(field, `${this.prefix}${field} must be an integer, got ${JSON.stringify(v)}`);
    const min = opts.min ?? 1;
    if (v < min) throw this.fail(field, `${this.prefix}${field} must be >= ${min}, got ${v}`);
    return v;
  }

  /** A finite number > 0. */
  positive(field: string, def?: number): number {
    const v = this.obj[field];
    if (v === undefined || v === null) {
      if (def !== undefined) return def;
      throw this.fail(field, `${this.prefix}${field} is missing`);
    }
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw this.fail(field, `${this.prefix}${field} must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  }

  bool(field: string, def: boolean): boolean {
    const v = this.obj[field];
    if (v === undefined || v === null) return def;
    if (typeof v !== "boolean") throw this.fail(field, `${this.prefix}${field} must be true or false, got ${JSON.stringify(v)}`);
    return v;
  }

  str(field: string): string | null {
    const v = this.obj[field];
    if (v === undefined || v === null) return null;
    if (typeof v !== "string") throw this.fail(field, `${this.prefix}${field} must be a string, got ${JSON.stringify(v)}`);
    return v;
  }
}

function architectureOf(f: Fields): Architecture {
  const supported = Object.keys(MODEL_TYPES).join(", ");
  const modelType = f.str("model_type");
  if (modelType !== null) {
    const a = MODEL_TYPES[modelType];
    if (!a) throw f.fail("model_type", `model_type "${modelType}" is not supported; supported: ${supported}`);
    return a;
  }
  // Some hand-written configs omit model_type; architectures says the same thing.
  const archs = f.obj["architectures"];
  if (Array.isArray(archs)) {
    for (const name of archs) if (typeof name === "string" && ARCHITECTURES[name]) return ARCHITECTURES[name];
    throw f.fail("architectures", `architectures ${JSON.stringify(archs)} are not supported; supported: ${Object.keys(ARCHITECTURES).join(", ")}`);
  }
  throw f.fail("model_type", `model_type is missing; supported: ${supported}`);
}

/**
 * RoPE base and scaling. transformers v5 writes `rope_parameters` (theta and scaling in
 * one object); older configs write `rope_theta` plus an optional `rope_scaling`.
 */
function parseRope(f: Fields): { theta: number; scaling: RopeScaling } {
  let src: Fields | null = null;
  let theta: number;
  if (f.has("rope_parameters")) {
    const p = f.obj["rope_parameters"];
    if (!isObject(p)) throw f.fail("rope_parameters", "rope_parameters must be an object");
    const pf = new Fields(p, f.source, "rope_parameters.");
    // v5 keys rope_parameters by layer type for models that mix attention kinds; none of
    // the supported families do, so a nested form means a model we do not implement.
    if (!pf.has("rope_type") && !pf.has("rope_theta") && Object.values(p).some(isObject)) {
      throw f.fail("rope_parameters", `per-layer-type rope_parameters (${Object.keys(p).join(", ")}) are not supported`);
    }
    theta = pf.has("rope_theta") ? pf.positive("rope_theta") : f.positive("rope_theta", 10000);
    src = pf;
  } else {
    theta = f.positive("rope_theta", 10000);
    if (f.has("rope_scaling")) {
      const s = f.obj["rope_scaling"];
      if (!isObject(s)) throw f.fail("rope_scaling", "rope_scaling must be an object or null");
      src = new Fields(s, f.source, "rope_scaling.");
    }
  }
  if (src === null) return { theta, scaling: { type: "none" } };

  // Older configs spell the kind `type`, newer ones `rope_type`.
  const kindField = src.has("rope_type") ? "rope_type" : "type";
  const kind = src.str(kindField) ?? "default";
  switch (kind) {
    case "default":
      return { theta, scaling: { type: "none" } };
    case "linear":
      return { theta, scaling: { type: "linear", factor: src.positive("factor") } };
    case "llama3": {
      const lowFreqFactor = src.positive("low_freq_factor");
      const highFreqFactor = src.positive("high_freq_factor");
      if (highFreqFactor <= lowFreqFactor) {
        throw src.fail("high_freq_factor", `${src.prefix}high_freq_factor (${highFreqFactor}) must be greater than low_freq_factor (${lowFreqFactor})`);
      }
      return {
        theta,
        scaling: {
          type: "llama3",
          factor: src.positive("factor"),
          lowFreqFactor,
          highFreqFactor,
          originalMaxPositionEmbeddings: src.int("original_max_position_embeddings"),
        },
      };
    }
    default:
      throw src.fail(kindField, `rope type "${kind}" (${src.prefix}${kindField}) is not supported; supported: ${SUPPORTED_ROPE.join(", ")}`);
  }
}

function tokenId(f: Fields, field: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) throw f.fail(field, `${field} must be a token id (integer >= 0), got ${JSON.stringify(v)}`);
  return v;
}

/** Validates a parsed config.json; `source` names the file in error messages. */
export function parseModelConfig(json: unknown, source = "config.json"): ModelConfig {
  if (!isObject(json)) throw new ModelConfigError(source, null, "config.json must be a JSON object");
  const f = new Fields(json, source);
  const architecture = architectureOf(f);

  const hiddenAct = f.str("hidden_act") ?? "silu";
  if (hiddenAct !== "silu") throw f.fail("hidden_act", `hidden_act "${hiddenAct}" is not supported; only silu (SwiGLU MLP) is`);

  const vocabSize = f.int("vocab_size");
  const hiddenSize = f.int("hidden_size");
  const intermediateSize = f.int("intermediate_size");
  const numLayers = f.int("num_hidden_layers");
  const numHeads = f.int("num_attention_heads");
  const numKvHeads = f.int("num_key_value_heads", { def: numHeads });
  if (numHeads % numKvHeads !== 0) {
    throw f.fail("num_key_value_heads", `num_key_value_heads (${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }
  let headDim: number;
  if (f.has("head_dim")) {
    headDim = f.int("head_dim");
  } else {
    if (hiddenSize % numHeads !== 0) {
      throw f.fail("num_attention_heads", `num_attention_heads (${numHeads}) must divide hidden_size (${hiddenSize}) when head_dim is not given`);
    }
    headDim = hiddenSize / numHeads;
  }
  // Rotate-half RoPE pairs the two halves of each head.
  if (headDim % 2 !== 0) throw f.fail("head_dim", `head_dim (${headDim}) must be even for rotary embeddings`);
  if (f.has("partial_rotary_factor") && f.obj["partial_rotary_factor"] !== 1) {
    throw f.fail("partial_rotary_factor", `partial_rotary_factor ${JSON.stringify(f.obj["partial_rotary_factor"])} is not supported (only full rotary)`);
  }

  const { theta: ropeTheta, scaling: ropeScaling } = parseRope(f);

  let slidingWindow: number | null = null;
  if (architecture === "mistral") {
    // MistralConfig defaults sliding_window to 4096; configs write null to turn it off.
    slidingWindow = f.obj["sliding_window"] === undefined ? 4096 : f.has("sliding_window") ? f.int("sliding_window") : null;
  } else if (architecture === "qwen2") {
    // Qwen2 configs always carry a sliding_window value but only use it when use_sliding_window.
    slidingWindow = f.bool("use_sliding_window", false) && f.has("sliding_window") ? f.int("sliding_window") : null;
  }

  const attentionBias = architecture === "llama" ? f.bool("attention_bias", false) : false;

  const bos = json["bos_token_id"];
  const bosTokenId = bos === undefined || bos === null ? null : tokenId(f, "bos_token_id", bos);
  const eos = json["eos_token_id"];
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos.map((v) => tokenId(f, "eos_token_id", v)) : [tokenId(f, "eos_token_id", eos)];

  // transformers v5 renamed torch_dtype to dtype.
  const dtypeField = f.has("dtype") ? "dtype" : "torch_dtype";
  const dtypeName = f.str(dtypeField);
  let dtype: ModelConfig["dtype"] = "bf16";
  if (dtypeName !== null && dtypeName !== "auto") {
    const d = DTYPES[dtypeName];
    if (!d) throw f.fail(dtypeField, `${dtypeField} "${dtypeName}" is not supported; supported: float32, bfloat16, float16`);
    dtype = d;
  }

  return Object.freeze({
    architecture,
    vocabSize,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: f.positive("rms_norm_eps", 1e-6),
    maxPositionEmbeddings: f.int("max_position_embeddings", { def: DEFAULT_MAX_POSITIONS[architecture] }),
    tieWordEmbeddings: f.bool("tie_word_embeddings", false),
    qkvBias: architecture === "qwen2" ? true : attentionBias,
    oBias: attentionBias,
    mlpBias: architecture === "llama" ? f.bool("mlp_bias", false) : false,
    ropeTheta,
    ropeScaling: Object.freeze(ropeScaling),
    slidingWindow,
    bosTokenId,
    eosTokenIds: Object.freeze(eosTokenIds),
    dtype,
  });
}

/** Reads and validates `dir/config.json`. */
export function loadModelConfig(dir: string): ModelConfig {
  const path = join(dir, "config.json");
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new ModelConfigError(path, null, `cannot read it (${(e as Error).message}); --model must be a Hugging Face model folder`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ModelConfigError(path, null, `not valid JSON (${(e as Error).message})`);
  }
  return parseModelConfig(json, path);
}
