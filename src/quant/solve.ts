// Solves every quantizable linear of a base model with GPTQ, one Hessian site at a
// time: each site's Hessian is built once (by the caller's `hessianOf`) and shared by
// the linears reading that input (q/k/v, gate/up).

import { toF32 } from "../backend/tensor.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { gptqQuantize, prepareHessian, type GptqOptions } from "./gptq.js";
import type { HessianSite } from "./hessian.js";
import type { QuantizedWeight, QuantSpec } from "./types.js";

/** Progress sink; the CLI's ProgressReporter has this shape. */
export interface QuantProgress {
  note(message: string): void;
  start(label: string, total: number, unit?: string): void;
  update(done: number): void;
  stop(): void;
}

export const SILENT: QuantProgress = { note() {}, start() {}, update() {}, stop() {} };

export interface LinearStats {
  readonly name: string;
  /** Damping that worked, as a fraction of mean(diag H). */
  readonly damp: number;
  readonly attempts: number;
  /** GPTQ's loss for this linear. */
  readonly loss: number;
  readonly deadColumns: number;
}

export interface SolvedModel {
  readonly weights: Map<string, QuantizedWeight>;
  readonly stats: LinearStats[];
}

/** Dense f32 weight [outDim, inDim] of `${module}.weight`. */
export function readDenseWeight(src: SafetensorsDir, module: string): { w: Float32Array; outDim: number; inDim: number } {
  const t = src.get(`${module}.weight`);
  if (t.shape.length !== 2) throw new Error(`${module}.weight is not a matrix`);
  return { w: toF32(t.data, t.dtype), outDim: t.shape[0]!, inDim: t.shape[1]! };
}

export function solveModel(
  baseDir: string,
  sites: readonly HessianSite[],
  hessianOf: (site: HessianSite) => ArrayLike<number>,
  spec: QuantSpec,
  opts: GptqOptions,
  progress: QuantProgress = SILENT,
  label = "solve",
): SolvedModel {
  const src = SafetensorsDir.open(baseDir);
  const weights = new Map<string, QuantizedWeight>();
  const stats: LinearStats[] = [];
  const layers = new Set(sites.map((s) => s.layer)).size;
  progress.start(label, layers, "layers");
  try {
    let doneLayers = 0;
    for (let i = 0; i < sites.length; i++) {
      const site = sites[i]!;
      // Damping, order and factor depend on H alone: once per site, shared by its linears.
      const prep = prepareHessian(hessianOf(site), site.inDim, spec.descAct, opts.percDamp);
      for (const name of site.linears) {
        const { w, outDim, inDim } = readDenseWeight(src, name);
        if (inDim !== site.inDim) throw new Error(`${name}.weight has ${inDim} inputs, its Hessian ${site.inDim}`);
        const r = gptqQuantize(w, outDim, inDim, prep, spec, opts);
        weights.set(name, r.weight);
        stats.push({ name, damp: r.damp, attempts: r.attempts, loss: r.loss, deadColumns: r.deadColumns });
      }
      if (i === sites.length - 1 || sites[i + 1]!.layer !== site.layer) progress.update(++doneLayers);
    }
  } finally {
    progress.stop();
    src.close();
  }
  return { weights, stats };
}
