// Quantized checkpoints on disk in the GPTQ layout: writing one from a base model and
// solved weights, reading its quantized weights back, and serving it as a TensorSource
// of dense tensors (the CPU path dequantizes at load).

import { copyFileSync, lstatSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import type { HostTensor } from "../backend/backend.js";
import { bytesPerElement, f32ToBf16, numel } from "../backend/tensor.js";
import { loadModelConfig } from "../model/config.js";
import { SafetensorsDir, writeSafetensors } from "../model/safetensors.js";
import type { TensorSource } from "../model/weights.js";
import { makeTempDirBeside, replaceDir, writeFileDurable } from "./durable.js";
import { gptqConfigJson, moduleSpec, readGptqConfig, type GptqConfig } from "./gptq_config.js";
import { packGptq, unpackGptq } from "./gptq_pack.js";
import { dequantize, numGroups, type QuantizedWeight, type QuantSpec } from "./types.js";

export { readQuantSpec } from "./gptq_config.js";

/** The tensors each quantized module is stored as, `${module}.${suffix}`. */
export const GPTQ_SUFFIXES = ["qweight", "qzeros", "scales", "g_idx"] as const;

/** The unquantized base's tensors as the writer reads them: a SafetensorsDir, or random
 * weights made on a backend for --load-format dummy (quant/layer_source.ts). */
export interface BaseTensors {
  names(): string[];
  has(name: string): boolean;
  info(name: string): { readonly shape: readonly number[]; readonly byteLength: number };
  get(name: string): HostTensor;
  close(): void;
}

export interface WriteQuantizedCheckpointOptions {
  /** The unquantized HF model the weights were solved from (non-quantized tensors and tokenizer files come from it). */
  readonly baseDir: string;
  /** Where the base's tensors come from instead of baseDir's safetensors (closed by the caller). */
  readonly baseTensors?: BaseTensors;
  readonly outDir: string;
  /** Every weight must carry this spec. */
  readonly spec: QuantSpec;
  /** HF module name (`model.layers.0.self_attn.q_proj`) -> its quantized weight. */
  readonly weights: ReadonlyMap<string, QuantizedWeight>;
  /** Adds files to the temp folder before it is synced and renamed into place (e.g. `mlgptq/`). */
  readonly extra?: (tmpDir: string) => void;
  /** Recorded as quantization_config.damp_percent (default 0.01, GPTQ's λ of 1%). */
  readonly dampPercent?: number;
  /** Shard size limit for the safetensors files (default 4 GiB). */
  readonly maxShardBytes?: number;
  readonly onProgress?: (message: string) => void;
}

/** A tensor to write, produced only when its shard is written. */
interface Pending {
  readonly name: string;
  readonly bytes: number;
  readonly make: () => HostTensor;
}

/** Files of a model folder that are weights (written anew) or pickles (never copied). */
function isWeightFile(name: string): boolean {
  return /\.(safetensors|bin|pt|pth|ckpt|pkl)$/.test(name) || name.endsWith(".safetensors.index.json") || name.endsWith(".bin.index.json");
}

function sameSpec(a: QuantSpec, b: QuantSpec): boolean {
  return a.bits === b.bits && a.groupSize === b.groupSize && a.sym === b.sym && a.descAct === b.descAct;
}

function specText(s: QuantSpec): string {
  return `${s.bits}-bit, group_size ${s.groupSize}, sym ${s.sym}, desc_act ${s.descAct}`;
}

function readConfigJson(dir: string): Record<string, unknown> {
  const path = join(dir, "config.json");
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new Error(`${path}: cannot read it as JSON (${(e as Error).message}); the base must be a Hugging Face model folder`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) throw new Error(`${path} must be a JSON object`);
  return json as Record<string, unknown>;
}

function packedTensors(name: string, q: QuantizedWeight): Pending[] {
  const { bits } = q.spec;
  const K = q.inDim, N = q.outDim, G = numGroups(K, q.spec.groupSize);
  // Packed once, when its shard is written, and dropped once all four are taken.
  let packed: ReturnType<typeof packGptq> | null = null;
  let taken = 0;
  const take = (s: (typeof GPTQ_SUFFIXES)[number]) => {
    packed ??= packGptq(q, "gptq");
    const t = packed[s];
    if (++taken === GPTQ_SUFFIXES.length) packed = null;
    return t;
  };
  const sizes: Record<(typeof GPTQ_SUFFIXES)[number], number> = {
    qweight: ((K * bits) / 32) * N * 4,
    qzeros: G * ((N * bits) / 32) * 4,
    scales: G * N * 2,
    g_idx: K * 4,
  };
  return GPTQ_SUFFIXES.map((s) => ({ name: `${name}.${s}`, bytes: sizes[s], make: () => take(s) }));
}

/**
 * Writes a GPTQ checkpoint that HF transformers, vLLM, AutoGPTQ/GPTQModel and Inlaid
 * load: config.json with quantization_config (classic "gptq" format), a matching
 * quantize_config.json, `${module}.qweight/.qzeros/.scales/.g_idx` for every quantized
 * module, every other tensor copied from the base unchanged, and the base's tokenizer
 * and generation files. Atomic: built in a temp folder beside outDir, `extra` adds to
 * it, everything is fsynced, then it replaces outDir in one rename. On any error the
 * temp folder is removed and an existing outDir is left as it was.
 */
export function writeQuantizedCheckpoint(opts: WriteQuantizedCheckpointOptions): void {
  const say = opts.onProgress ?? (() => {});
  const baseDir = resolve(opts.baseDir), outDir = resolve(opts.outDir);
  if (baseDir === outDir) throw new Error(`--out ${outDir} is the base model folder; write the quantized checkpoint to another folder`);
  const config = readConfigJson(baseDir);
  if (config["quantization_config"] !== undefined && config["quantization_config"] !== null) {
    throw new Error(`${baseDir} is already quantized (config.json has quantization_config); quantize from the unquantized model`);
  }
  const maxShard = opts.maxShardBytes ?? 4 * 2 ** 30;

  const base: BaseTensors = opts.baseTensors ?? SafetensorsDir.open(baseDir);
  let tmp: string | null = null;
  try {
    for (const [name, q] of opts.weights) {
      if (!sameSpec(q.spec, opts.spec)) throw new Error(`${name} was quantized ${specText(q.spec)}, but the checkpoint is ${specText(opts.spec)}; one checkpoint holds one spec`);
      if (!base.has(`${name}.weight`)) throw new Error(`${name}: the base model has no tensor ${name}.weight; module names must be HF names like model.layers.0.self_attn.q_proj`);
      const shape = base.info(`${name}.weight`).shape;
      if (shape.length !== 2 || shape[0] !== q.outDim || shape[1] !== q.inDim) {
        throw new Error(`${name}: quantized as [out ${q.outDim}, in ${q.inDim}] but the base's ${name}.weight is [${shape.join(", ")}]`);
      }
    }
    const pending: Pending[] = [];
    for (const t of base.names()) {
      const module = t.endsWith(".weight") ? t.slice(0, -".weight".length) : null;
      const q = module === null ? undefined : opts.weights.get(module);
      if (q) {
        pending.push(...packedTensors(module!, q));
      } else {
        const info = base.info(t);
        pending.push({ name: t, bytes: info.byteLength, make: () => base.get(t) });
      }
    }
    pending.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const shards: Pending[][] = [[]];
    let size = 0;
    for (const p of pending) {
      if (size > 0 && size + p.bytes > maxShard) {
        shards.push([]);
        size = 0;
      }
      shards[shards.length - 1]!.push(p);
      size += p.bytes;
    }

    tmp = makeTempDirBeside(outDir);
    const fileName = (i: number) =>
      shards.length === 1 ? "model.safetensors" : `model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`;
    const weightMap: Record<string, string> = {};
    let total = 0;
    for (const [i, shard] of shards.entries()) {
      const tensors: Record<string, HostTensor> = {};
      for (const p of shard) {
        const t = p.make();
        if (numel(t.shape) * bytesPerElement(t.dtype) !== p.bytes) throw new Error(`internal: ${p.name} has ${numel(t.shape) * bytesPerElement(t.dtype)} bytes, planned ${p.bytes}`);
        tensors[p.name] = t;
        weightMap[p.name] = fileName(i);
        total += p.bytes;
      }
      // transformers refuses safetensors files whose metadata lacks format "pt".
      writeSafetensors(join(tmp, fileName(i)), tensors, { format: "pt" });
      say(`wrote ${fileName(i)} (${shard.length} tensors)`);
    }
    if (shards.length > 1) {
      writeFileDurable(join(tmp, "model.safetensors.index.json"), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2) + "\n");
    }

    const qcfg = gptqConfigJson(opts.spec, { dampPercent: opts.dampPercent, lmHead: opts.weights.has("lm_head") });
    writeFileDurable(join(tmp, "config.json"), JSON.stringify({ ...config, quantization_config: qcfg }, null, 2) + "\n");
    // AutoGPTQ's from_quantized (and older vLLM) read this file rather than config.json.
    writeFileDurable(join(tmp, "quantize_config.json"), JSON.stringify(qcfg, null, 2) + "\n");
    for (const f of readdirSync(baseDir)) {
      if (f === "config.json" || f === "quantize_config.json" || isWeightFile(f)) continue;
      const src = join(baseDir, f);
      if (lstatSync(src).isFile()) copyFileSync(src, join(tmp, f));
    }
    opts.extra?.(tmp);
    replaceDir(tmp, outDir);
    tmp = null;
    say(`wrote ${outDir}`);
  } finally {
    if (!opts.baseTensors) base.close();
    if (tmp !== null) rmSync(tmp, { recursive: true, force: true });
  }
}

/** The quantized modules of an open checkpoint: every name with a `.qweight` tensor. */
function quantizedModules(st: SafetensorsDir): string[] {
  return st.names().filter((n) => n.endsWith(".qweight")).map((n) => n.slice(0, -".qweight".length));
}

function requireConfig(dir: string): GptqConfig {
  const cfg = readGptqConfig(dir);
  if (!cfg) throw new Error(`${dir} is not a quantized checkpoint: config.json has no quantization_config and there is no quantize_config.json`);
  return cfg;
}

function readModule(st: SafetensorsDir, cfg: GptqConfig, module: string): QuantizedWeight {
  const spec = moduleSpec(cfg, module);
  if (!spec) throw new Error(`${module} has a qweight, but ${cfg.source}'s dynamic rules exclude it from quantization; the checkpoint is inconsistent`);
  for (const s of ["qzeros", "scales"]) {
    if (!st.has(`${module}.${s}`)) throw new Error(`${st.path}: ${module} has a qweight but no ${s}; the checkpoint is incomplete`);
  }
  const gName = `${module}.g_idx`;
  return unpackGptq(
    { qweight: st.get(`${module}.qweight`), qzeros: st.get(`${module}.qzeros`), scales: st.get(`${module}.scales`), g_idx: st.has(gName) ? st.get(gName) : null },
    spec,
    cfg.format,
    `${st.path}: ${module}`,
  );
}

/** Every quantized module of a GPTQ checkpoint, unpacked. */
export function readQuantizedWeights(dir: string): Map<string, QuantizedWeight> {
  const cfg = requireConfig(dir);
  const st = SafetensorsDir.open(dir);
  try {
    const out = new Map<string, QuantizedWeight>();
    for (const m of quantizedModules(st)) out.set(m, readModule(st, cfg, m));
    return out;
  } finally {
    st.close();
  }
}

/**
 * A GPTQ checkpoint seen as a dense one: `${module}.weight` of every quantized module
 * is its dequantized weight [outDim, inDim] (bf16, or f32 when config.json's dtype is
 * float32); the packed tensors stay readable under their own names; every other tensor
 * passes through.
 */
export class QuantizedSource implements TensorSource {
  readonly path: string;
  readonly config: GptqConfig;
  readonly #st: SafetensorsDir;
  readonly #modules: ReadonlySet<string>;
  readonly #dtype: "bf16" | "f32";

  private constructor(path: string, config: GptqConfig, st: SafetensorsDir, dtype: "bf16" | "f32") {
    this.path = path;
    this.config = config;
    this.#st = st;
    this.#modules = new Set(quantizedModules(st));
    this.#dtype = dtype;
  }

  static open(dir: string): QuantizedSource {
    const cfg = requireConfig(dir);
    const dtype = loadModelConfig(dir).dtype === "f32" ? "f32" : "bf16";
    return new QuantizedSource(dir, cfg, SafetensorsDir.open(dir), dtype);
  }

  /** The modules stored quantized. */
  modules(): string[] {
    return [...this.#modules].sort();
  }

  /** Tensor names as a dense checkpoint would have them (`.weight` in place of the packed four), sorted. */
  names(): string[] {
    const out = this.#st.names().filter((n) => !this.#packedName(n));
    for (const m of this.#modules) out.push(`${m}.weight`);
    return out.sort();
  }

  has(name: string): boolean {
    return this.#st.has(name) || this.#quantizedWeightOf(name) !== null;
  }

  get(name: string): HostTensor {
    const m = this.#quantizedWeightOf(name);
    if (m === null || this.#st.has(name)) return this.#st.get(name);
    const q = readModule(this.#st, this.config, m);
    const w = dequantize(q);
    const shape = [q.outDim, q.inDim];
    return this.#dtype === "f32" ? { shape, dtype: "f32", data: w } : { shape, dtype: "bf16", data: f32ToBf16(w) };
  }

  close(): void {
    this.#st.close();
  }

  #quantizedWeightOf(name: string): string | null {
    if (!name.endsWith(".weight")) return null;
    const m = name.slice(0, -".weight".length);
    return this.#modules.has(m) ? m : null;
  }

  #packedName(name: string): boolean {
    const dot = name.lastIndexOf(".");
    return dot > 0 && (GPTQ_SUFFIXES as readonly string[]).includes(name.slice(dot + 1)) && this.#modules.has(name.slice(0, dot));
  }
}

/** Opens a GPTQ checkpoint as a dense TensorSource (see QuantizedSource). */
export function openQuantizedSource(dir: string): QuantizedSource {
  return QuantizedSource.open(dir);
}
