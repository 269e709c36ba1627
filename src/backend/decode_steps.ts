// Multi-step decoding (Backend.decodeSteps): what the step after a decode step is, once
// each sequence has sampled its token. The CPU backend runs it on the host; the CUDA
// backend's advance_decode_step kernel (cuda/kernels/step.cu) does the same to the step's
// metadata on the device, and a GPU test compares the two.

import type { StepBatch } from "./backend.js";

/** Whether `batch` is a decode-only step as decodeSteps takes it: one token per sequence, row i sampled as i. */
export function isDecodeOnly(batch: StepBatch): boolean {
  const S = batch.numSeqs;
  if (batch.numTokens !== S || batch.sampleRows.length !== S) return false;
  for (let i = 0; i < S; i++) if (batch.sampleRows[i] !== i || batch.queryStart[i + 1]! - batch.queryStart[i]! !== 1) return false;
  return true;
}

/**
 * The decode step that follows `batch` when sequence i has sampled tokens[i]: that token
 * is its input, at the next position (its context one longer), written to the KV slot the
 * block table gives for that position, and its next draw uses the next counter. Adapters,
 * sampling parameters and block tables stay. Throws when a block table has no block for the
 * new position (the caller reserves blocks for every step first).
 */
export function nextDecodeBatch(batch: StepBatch, tokens: Int32Array, blockSize: number): StepBatch {
  if (!isDecodeOnly(batch)) throw new Error("nextDecodeBatch: the step is not decode-only (one token per sequence, each sampled)");
  const S = batch.numSeqs, B = batch.maxBlocksPerSeq;
  if (tokens.length < S) throw new Error(`nextDecodeBatch: ${tokens.length} tokens for ${S} sequences`);
  const positions = new Int32Array(S), slotMapping = new Int32Array(S), contextLens = new Int32Array(S), counters = new Uint32Array(S);
  for (let i = 0; i < S; i++) {
    const p = batch.positions[i]! + 1;
    const j = Math.floor(p / blockSize);
    const block = j < B ? batch.blockTables[i * B + j]! : -1;
    if (block < 0) throw new Error(`nextDecodeBatch: sequence ${i} has no KV block for position ${p}; reserve blocks for every step`);
    positions[i] = p;
    slotMapping[i] = block * blockSize + (p % blockSize);
    contextLens[i] = batch.contextLens[i]! + 1;
    counters[i] = batch.sampling.counters[i]! + 1;
  }
  return {
    ...batch,
    tokenIds: tokens.slice(0, S),
    positions, slotMapping, contextLens,
    sampling: { ...batch.sampling, counters },
  };
}
