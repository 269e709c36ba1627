// Causal GQA attention over a paged KV cache, on the CPU. The reference for every
// other backend's attention kernels.

import type { StepBatch } from "../backend.js";

export interface PagedLayer {
  /** [numBlocks, blockSize, numKvHeads, headDim] each. */
  readonly k: Float32Array;
  readonly v: Float32Array;
}

/** Writes each token's k/v rows into its cache slot (slot -1: no write). */
export function writeKv(layer: PagedLayer, k: Float32Array, v: Float32Array, rowWidth: number, batch: StepBatch): void {
  for (let t = 0; t < batch.numTokens; t++) {
    const slot = batch.slotMapping[t]!;
    if (slot < 0) continue;
    layer.k.set(k.subarray(t * rowWidth, (t + 1) * rowWidth), slot * rowWidth);
    layer.v.set(v.subarray(t * rowWidth, (t + 1) * rowWidth), slot * rowWidth);
  }
}

/**
 * out[t, h] = sum_j softmax_j(q[t, h] . K[j, h/g] * scale) V[j, h/g] over the
 * sequence's positions j <= positions[t], read through its block table.
 */
export function pagedAttention(
  out: Float32Array,
  q: Float32Array,
  layer: PagedLayer,
  numHeads: number,
  numKvHeads: number,
  headDim: number,
  blockSize: number,
  scale: number,
  batch: StepBatch,
): void {
  const group = numHeads / numKvHeads;
  const kvWidth = numKvHeads * headDim;
  const qWidth = numHeads * headDim;
  let scores = new Float64Array(256);
  const acc = new Float64Array(headDim);
  for (let s = 0; s < batch.numSeqs; s++) {
    const table = batch.blockTables.subarray(s * batch.maxBlocksPerSeq, (s + 1) * batch.maxBlocksPerSeq);
    for (let t = batch.queryStart[s]!; t < batch.queryStart[s + 1]!; t++) {
      const ctx = batch.positions[t]! + 1;
      if (scores.length < ctx) scores = new Float64Array(ctx * 2);
      for (let h = 0; h < numHeads; h++) {
        const qo = t * qWidth + h * headDim;
        const kvh = Math.floor(h / group);
        let max = -Infinity;
        for (let j = 0; j < ctx; j++) {
          const slot = table[Math.floor(j / blockSize)]! * blockSize + (j % blockSize);
          const ko = slot * kvWidth + kvh * headDim;
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += q[qo + d]! * layer.k[ko + d]!;
          dot *= scale;
          scores[j] = dot;
          if (dot > max) max = dot;
        }
        let sum = 0;
        for (let j = 0; j < ctx; j++) {
          const e = Math.exp(scores[j]! - max);
          scores[j] = e;
          sum += e;
        }
        acc.fill(0);
        for (let j = 0; j < ctx; j++) {
          const slot = table[Math.floor(j / blockSize)]! * blockSize + (j % blockSize);
          const vo = slot * kvWidth + kvh * headDim;
          const p = scores[j]!;
          for (let d = 0; d < headDim; d++) acc[d] += p * layer.v[vo + d]!;
        }
        for (let d = 0; d < headDim; d++) out[qo + d] = acc[d]! / sum;
      }
    }
  }
}
