// Rotary-embedding inverse frequencies, with the scalings config.ts accepts.
//
// Computed in float64 and rounded once to f32, so every backend uploads the same table.
// (transformers computes the base table in f32, so entries may differ from its by ~1 ulp.)

import type { ModelConfig } from "./config.js";

/** inv_freq[i] = 1 / theta^(2i / headDim) for i < headDim/2, then the config's scaling. */
export function ropeInvFreq(cfg: ModelConfig): Float32Array {
  const half = cfg.headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / cfg.ropeTheta ** ((2 * i) / cfg.headDim);

  const s = cfg.ropeScaling;
  switch (s.type) {
    case "none":
      break;
    case "linear":
      // Linear (position-interpolation) scaling divides positions by the factor,
      // which is the same as dividing every frequency by it.
      for (let i = 0; i < half; i++) inv[i]! /= s.factor;
      break;
    case "llama3": {
      // transformers' _compute_llama3_parameters: long wavelengths (low frequencies) are
      // slowed by `factor`, short ones kept, and the band between blended smoothly.
      const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      for (let i = 0; i < half; i++) {
        const f = inv[i]!;
        const wavelen = (2 * Math.PI) / f;
        if (wavelen < highFreqWavelen) continue;
        if (wavelen > lowFreqWavelen) {
          inv[i] = f / s.factor;
          continue;
        }
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        inv[i] = ((1 - smooth) * f) / s.factor + smooth * f;
      }
      break;
    }
    default:
      return s satisfies never;
  }
  return Float32Array.from(inv);
}
