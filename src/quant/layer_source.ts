// The unquantized base one decoder layer at a time, for layer-streamed quantization
// (stream_capture.ts, DESIGN §4: "stream one unquantized layer from host memory"): only
// the layer being captured and solved is resident on the backend, so a 7B base needs one
// layer's 0.4 GB of device memory instead of 13 GB.
//
// Two sources:
//   checkpoint  a Hugging Face folder: a layer's tensors are read from its safetensors
//               (fused groups stacked on the host, as loadLlamaWeights does) and uploaded;
//               a linear's dense weight for the solver is read again in its stored dtype.
//   dummy       random weights (--load-format dummy): made on the backend with the seeds
//               loadLlamaWeights(DUMMY) gives the same tensors (a test holds the two
//               together), so a layer is the same whenever it is made; the writer reads
//               the non-quantized ones (embedding, norms, lm_head) back through `tensors()`.

import type { Backend, HostTensor, Tensor } from "../backend/backend.js";
import { f32ToBf16 } from "../backend/tensor.js";
import type { ModelConfig } from "../model/config.js";
import { GROUP_NAMES, LINEAR_GROUPS, type LinearGroup, type Projection } from "../model/linear.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { groupDims, projDims, projRows, type LayerWeights } from "../model/weights.js";
import type { BaseTensors } from "./checkpoint.js";
import { moduleName } from "./hessian.js";
import { readDenseWeight } from "./solve.js";

export interface LayerSource {
  readonly config: ModelConfig;
  /** The token embedding [vocab, hidden] on the backend (the caller frees it). */
  embed(): Tensor;
  /** Layer `l`'s weights on the backend, in loadLlamaWeights's form (free with freeLayer). */
  layer(l: number): LayerWeights;
  freeLayer(lw: LayerWeights): void;
  /** Dense weight [outDim, inDim] f32 (HF orientation) of one projection of layer `l`,
   * whose weights `resident` (from layer(l)) are on the backend. */
  weight(l: number, proj: Projection, resident: LayerWeights): Float32Array;
  /** Every tensor of the base, for the checkpoint writer (non-quantized ones are copied). */
  tensors(): BaseTensors;
  close(): void;
}

function hasBias(cfg: ModelConfig, g: LinearGroup): boolean {
  if (g === "qkv_proj") return cfg.qkvBias;
  if (g === "o_proj") return cfg.oBias;
  return cfg.mlpBias;
}

const SUBLAYER_NORMS = ["input_layernorm", "post_attention_layernorm"] as const;

/** Frees what layer() uploaded (norms, fused weights, biases). */
function freeLayerWeights(backend: Backend, lw: LayerWeights): void {
  backend.free(lw.inputNorm);
  backend.free(lw.postAttnNorm);
  for (const g of GROUP_NAMES) {
    if (lw.proj[g]) backend.free(lw.proj[g]);
    if (lw.bias[g]) backend.free(lw.bias[g]);
  }
}

/** Host tensors stacked along dimension 0 (one dtype). */
function stackRows(parts: readonly HostTensor[]): HostTensor {
  if (parts.length === 1) return parts[0]!;
  const first = parts[0]!;
  const total = parts.reduce((a, t) => a + t.data.length, 0);
  const data = new (first.data.constructor as new (n: number) => HostTensor["data"])(total);
  let at = 0;
  for (const t of parts) {
    if (t.dtype !== first.dtype) throw new Error(`fused members stored as ${first.dtype} and ${t.dtype}; fused loading needs one dtype`);
    data.set(t.data as never, at);
    at += t.data.length;
  }
  const rows = parts.reduce((a, t) => a + t.shape[0]!, 0);
  return { shape: first.shape.length === 2 ? [rows, first.shape[1]!] : [rows], dtype: first.dtype, data };
}

const tensorName = (l: number, p: Projection, what: "weight" | "bias"): string => `${moduleName(l, p)}.${what}`;

/** A Hugging Face checkpoint folder, one layer at a time. */
export class CheckpointLayers implements LayerSource {
  readonly #src: SafetensorsDir;

  constructor(
    readonly backend: Backend,
    readonly config: ModelConfig,
    dir: string,
  ) {
    this.#src = SafetensorsDir.open(dir);
  }

  #read(name: string): HostTensor {
    if (!this.#src.has(name)) throw new Error(`checkpoint has no tensor ${name}; is this a ${this.config.architecture} model?`);
    return this.#src.get(name);
  }

  embed(): Tensor {
    return this.backend.upload(this.#read("model.embed_tokens.weight"));
  }

  layer(l: number): LayerWeights {
    const b = this.backend;
    const proj: Partial<Record<LinearGroup, Tensor>> = {};
    const bias: Partial<Record<LinearGroup, Tensor>> = {};
    for (const g of GROUP_NAMES) {
      const members = LINEAR_GROUPS[g] as readonly Projection[];
      proj[g] = b.upload(stackRows(members.map((p) => this.#read(tensorName(l, p, "weight")))));
      // Biases are added to f32 matmul outputs (backend.ts), so they are stored in f32.
      if (hasBias(this.config, g)) bias[g] = b.upload(stackRows(members.map((p) => this.#read(tensorName(l, p, "bias")))), "f32");
    }
    const [inputNorm, postAttnNorm] = SUBLAYER_NORMS.map((n) => b.upload(this.#read(`model.layers.${l}.${n}.weight`)));
    return { inputNorm: inputNorm!, postAttnNorm: postAttnNorm!, proj, bias };
  }

  freeLayer(lw: LayerWeights): void {
    freeLayerWeights(this.backend, lw);
  }

  weight(l: number, proj: Projection): Float32Array {
    return readDenseWeight(this.#src, moduleName(l, proj)).w;
  }

  tensors(): BaseTensors {
    const src = this.#src;
    // The writer must not close the folder this source still reads.
    return { names: () => src.names(), has: (n) => src.has(n), info: (n) => src.info(n), get: (n) => src.get(n), close() {} };
  }

  close(): void {
    this.#src.close();
  }
}

/** Seeds loadLlamaWeights(DUMMY) gives each random tensor: one per tensor in its load
 * order (embedding; per layer and group the fused weight, then its bias; lm_head), none
 * for norms (which are ones). */
export interface DummySeeds {
  readonly embed: number;
  readonly proj: readonly Readonly<Record<LinearGroup, number>>[];
  readonly bias: readonly Readonly<Partial<Record<LinearGroup, number>>>[];
  /** 0 when the head is the embedding (tied). */
  readonly lmHead: number;
}

export function dummySeeds(cfg: ModelConfig): DummySeeds {
  let seed = 0;
  const embed = ++seed;
  const proj: Record<LinearGroup, number>[] = [];
  const bias: Partial<Record<LinearGroup, number>>[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = {} as Record<LinearGroup, number>;
    const bb: Partial<Record<LinearGroup, number>> = {};
    for (const g of GROUP_NAMES) {
      p[g] = ++seed;
      if (hasBias(cfg, g)) bb[g] = ++seed;
    }
    proj.push(p);
    bias.push(bb);
  }
  return { embed, proj, bias, lmHead: cfg.tieWordEmbeddings ? 0 : ++seed };
}

/** Standard deviation of loadLlamaWeights's random matrices and biases. */
const DUMMY_STD = 0.02;

/** Random weights of a config's shapes (--load-format dummy), made on the backend. */
export class DummyLayers implements LayerSource {
  readonly seeds: DummySeeds;
  readonly #dtype: "f32" | "bf16";
  /** The last fused weight read back: q/k/v (gate/up) are solved one after another, and a 7B
   * gate/up read is 0.36 GB of f32. */
  #lastRead: { tensor: Tensor; host: Float32Array } | null = null;

  constructor(
    readonly backend: Backend,
    readonly config: ModelConfig,
  ) {
    this.seeds = dummySeeds(config);
    this.#dtype = config.dtype === "f32" ? "f32" : "bf16";
  }

  #random(shape: readonly number[], seed: number, dtype: "f32" | "bf16" = this.#dtype): Tensor {
    const t = this.backend.empty(shape, dtype);
    this.backend.fillRandom(t, seed, DUMMY_STD);
    return t;
  }

  #ones(n: number): Tensor {
    return this.backend.upload({ shape: [n], dtype: "f32", data: new Float32Array(n).fill(1) });
  }

  embed(): Tensor {
    return this.#random([this.config.vocabSize, this.config.hiddenSize], this.seeds.embed);
  }

  layer(l: number): LayerWeights {
    const proj: Partial<Record<LinearGroup, Tensor>> = {};
    const bias: Partial<Record<LinearGroup, Tensor>> = {};
    for (const g of GROUP_NAMES) {
      const { inDim, outDims } = groupDims(this.config, g);
      const rows = outDims.reduce((a, b) => a + b, 0);
      proj[g] = this.#random([rows, inDim], this.seeds.proj[l]![g]);
      const bs = this.seeds.bias[l]![g];
      if (bs !== undefined) bias[g] = this.#random([rows], bs, "f32");
    }
    const H = this.config.hiddenSize;
    return { inputNorm: this.#ones(H), postAttnNorm: this.#ones(H), proj, bias };
  }

  freeLayer(lw: LayerWeights): void {
    this.#lastRead = null;
    freeLayerWeights(this.backend, lw);
  }

  weight(l: number, proj: Projection, resident: LayerWeights): Float32Array {
    const { group, rowStart, rows } = projRows(this.config, proj);
    const t = resident.proj[group];
    if (!t) throw new Error(`layer ${l}'s ${group} weight is not resident`);
    const inDim = projDims(this.config, proj).inDim;
    if (this.#lastRead?.tensor !== t) this.#lastRead = { tensor: t, host: this.backend.read(t) as Float32Array };
    return this.#lastRead.host.slice(rowStart * inDim, (rowStart + rows) * inDim);
  }

  tensors(): BaseTensors {
    return new DummyTensors(this);
  }

  close(): void {}

  /** One random base tensor by HF name, read back to the host in the stored dtype. */
  hostTensor(name: string): HostTensor {
    const cfg = this.config;
    const info = dummyInfo(cfg, name);
    if (!info) throw new Error(`a ${cfg.architecture} base has no tensor ${name}`);
    const toHost = (t: Tensor, dtype: "f32" | "bf16", rowStart = 0, rowCount = info.shape[0]!): HostTensor => {
      const cols = info.shape.length === 2 ? info.shape[1]! : 1;
      const f = (this.backend.read(t) as Float32Array).subarray(rowStart * cols, (rowStart + rowCount) * cols);
      this.backend.free(t);
      return dtype === "f32" ? { shape: info.shape, dtype, data: f.slice() } : { shape: info.shape, dtype, data: f32ToBf16(f) };
    };
    if (info.kind === "norm") return { shape: info.shape, dtype: this.#dtype, data: this.#dtype === "f32" ? new Float32Array(info.shape[0]!).fill(1) : f32ToBf16(new Float32Array(info.shape[0]!).fill(1)) };
    if (info.kind === "embed") return toHost(this.embed(), this.#dtype);
    if (info.kind === "lm_head") return toHost(this.#random([cfg.vocabSize, cfg.hiddenSize], this.seeds.lmHead), this.#dtype);
    // A member of a fused group: made whole (its seed covers the group), its rows cut out.
    const { group, rowStart, rows } = projRows(cfg, info.proj!);
    const { inDim, outDims } = groupDims(cfg, group);
    const total = outDims.reduce((a, b) => a + b, 0);
    if (info.kind === "bias") return toHost(this.#random([total], this.seeds.bias[info.layer!]![group]!, "f32"), "f32", rowStart, rows);
    return toHost(this.#random([total, inDim], this.seeds.proj[info.layer!]![group]), this.#dtype, rowStart, rows);
  }
}

interface DummyInfo {
  readonly kind: "embed" | "lm_head" | "norm" | "weight" | "bias";
  readonly shape: readonly number[];
  readonly layer?: number;
  readonly proj?: Projection;
}

/** Every tensor name of a dummy base, in loadLlamaWeights's order. */
function dummyNames(cfg: ModelConfig): string[] {
  const names = ["model.embed_tokens.weight"];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const g of GROUP_NAMES) {
      for (const p of LINEAR_GROUPS[g] as readonly Projection[]) {
        names.push(tensorName(l, p, "weight"));
        if (hasBias(cfg, g)) names.push(tensorName(l, p, "bias"));
      }
    }
    for (const n of SUBLAYER_NORMS) names.push(`model.layers.${l}.${n}.weight`);
  }
  names.push("model.norm.weight");
  if (!cfg.tieWordEmbeddings) names.push("lm_head.weight");
  return names;
}

function dummyInfo(cfg: ModelConfig, name: string): DummyInfo | null {
  const H = cfg.hiddenSize;
  if (name === "model.embed_tokens.weight") return { kind: "embed", shape: [cfg.vocabSize, H] };
  if (name === "lm_head.weight") return cfg.tieWordEmbeddings ? null : { kind: "lm_head", shape: [cfg.vocabSize, H] };
  if (name === "model.norm.weight") return { kind: "norm", shape: [H] };
  const m = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$/.exec(name);
  if (m) {
    const layer = Number(m[1]), proj = m[2] as Projection, what = m[3] as "weight" | "bias";
    if (layer >= cfg.numLayers || !(proj in projRowsGroup)) return null;
    if (moduleName(layer, proj) + `.${what}` !== name) return null;
    if (what === "bias" && !hasBias(cfg, projRowsGroup[proj])) return null;
    const { inDim, outDim } = projDims(cfg, proj);
    return what === "weight" ? { kind: "weight", shape: [outDim, inDim], layer, proj } : { kind: "bias", shape: [outDim], layer, proj };
  }
  const n = /^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$/.exec(name);
  if (n && Number(n[1]) < cfg.numLayers) return { kind: "norm", shape: [H] };
  return null;
}

/** The group of each projection (for name parsing). */
const projRowsGroup: Readonly<Record<Projection, LinearGroup>> = Object.fromEntries(
  GROUP_NAMES.flatMap((g) => (LINEAR_GROUPS[g] as readonly Projection[]).map((p) => [p, g])),
) as Record<Projection, LinearGroup>;

/** A dummy base as the checkpoint writer reads it: names, shapes, and tensors made on demand. */
class DummyTensors implements BaseTensors {
  constructor(readonly layers: DummyLayers) {}

  names(): string[] {
    return dummyNames(this.layers.config);
  }

  has(name: string): boolean {
    return dummyInfo(this.layers.config, name) !== null;
  }

  info(name: string): { shape: readonly number[]; byteLength: number } {
    const cfg = this.layers.config;
    const i = dummyInfo(cfg, name);
    if (!i) throw new Error(`a ${cfg.architecture} base has no tensor ${name}`);
    const bytes = i.kind === "bias" || cfg.dtype === "f32" ? 4 : 2;
    return { shape: i.shape, byteLength: i.shape.reduce((a, b) => a * b, 1) * bytes };
  }

  get(name: string): HostTensor {
    return this.layers.hostTensor(name);
  }

  close(): void {}
}
