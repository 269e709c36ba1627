// Round-to-nearest: every weight goes to the nearest grid point of its group, with no
// calibration data. The baseline the GPTQ-family methods must beat, and the fastest way
// to get a quantized checkpoint.

import type { ModelConfig } from "../model/config.js";
import type { TensorSource } from "../model/weights.js";
import { toF32 } from "../backend/tensor.js";
import { linearModules } from "./modules.js";
import { groupIndex, groupParams, maxCode, quantizeValue } from "./quantizer.js";
import { numGroups, type QuantizedWeight, type QuantSpec } from "./types.js";

export interface RtnOptions {
  /** Act-order: perm[i] is the input placed i-th when forming groups. Required when spec.descAct. */
  readonly perm?: ArrayLike<number>;
}

/** Quantizes a dense weight `w` [outDim, inDim] (HF orientation, row-major). */
export function quantizeRtn(w: Float32Array, outDim: number, inDim: number, spec: QuantSpec, opts: RtnOptions = {}): QuantizedWeight {
  const N = outDim, K = inDim;
  if (w.length !== N * K) throw new RangeError(`weight has ${w.length} values, expected outDim*inDim = ${N}*${K}`);
  if (spec.descAct && !opts.perm) {
    throw new RangeError("RTN has no activation statistics to order inputs by: pass opts.perm (e.g. by decreasing Hessian diagonal) or quantize without desc_act");
  }
  const gIdx = groupIndex(K, spec.groupSize, spec.descAct ? opts.perm : undefined);
  const G = numGroups(K, spec.groupSize);
  const lo = new Float64Array(G * N).fill(Infinity);
  const hi = new Float64Array(G * N).fill(-Infinity);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const i = gIdx[k]! * N + n, v = w[n * K + k]!;
      if (v < lo[i]!) lo[i] = v;
      if (v > hi[i]!) hi[i] = v;
    }
  }
  const scales = new Float32Array(G * N);
  const zeros = new Uint8Array(G * N);
  for (let i = 0; i < G * N; i++) {
    // A group can be empty only with act-order and a ragged last group; any params do.
    const p = lo[i]! <= hi[i]! ? groupParams(lo[i]!, hi[i]!, spec.bits, spec.sym) : groupParams(0, 0, spec.bits, spec.sym);
    scales[i] = p.scale;
    zeros[i] = p.zero;
  }
  const maxq = maxCode(spec.bits);
  const codes = new Uint8Array(K * N);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const i = gIdx[k]! * N + n;
      codes[k * N + n] = quantizeValue(w[n * K + k]!, scales[i]!, zeros[i]!, maxq);
    }
  }
  return { spec, inDim: K, outDim: N, codes, scales, zeros, gIdx };
}

/** RTN over every quantizable linear of a model (modules.ts), read from `src`. */
export function quantizeModelRtn(src: TensorSource, cfg: ModelConfig, spec: QuantSpec, onModule?: (name: string) => void): Map<string, QuantizedWeight> {
  const out = new Map<string, QuantizedWeight>();
  for (const m of linearModules(cfg)) {
    const t = src.get(`${m.name}.weight`);
    if (t.shape[0] !== m.outDim || t.shape[1] !== m.inDim) {
      throw new RangeError(`${m.name}.weight is [${t.shape.join(", ")}], config.json implies [${m.outDim}, ${m.inDim}]`);
    }
    out.set(m.name, quantizeRtn(toF32(t.data, t.dtype), m.outDim, m.inDim, spec));
    onModule?.(m.name);
  }
  return out;
}
