// Token selection on the CPU: greedy, or temperature / top-k / top-p with a
// counter-based draw (src/backend/rng.ts). The reference for GPU sampling.

import { uniform } from "../rng.js";

export interface RowChoice {
  token: number;
  logprob: number;
}

/** log-softmax of the raw logits (what OpenAI-style logprobs report). */
export function logSoftmax(logits: Float32Array): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i]! - lse;
  return out;
}

/** Index of the largest value; ties go to the lowest index. */
export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

/** The k largest entries, best first (ties: lower index first). */
export function topK(x: ArrayLike<number>, k: number): number[] {
  const idx = Array.from({ length: x.length }, (_, i) => i);
  idx.sort((a, b) => x[b]! - x[a]! || a - b);
  return idx.slice(0, k);
}

export function sampleRow(
  logits: Float32Array,
  temperature: number,
  topP: number,
  topKLimit: number,
  seed: number,
  counter: number,
): number {
  if (temperature <= 0) return argmax(logits);
  const V = logits.length;
  // Candidates sorted by logit, then cut by top-k and top-p.
  const order = topK(logits, V);
  let keep = topKLimit > 0 ? Math.min(topKLimit, V) : V;
  const max = logits[order[0]!]!;
  const probs = new Float64Array(keep);
  let sum = 0;
  for (let i = 0; i < keep; i++) {
    const p = Math.exp((logits[order[i]!]! - max) / temperature);
    probs[i] = p;
    sum += p;
  }
  if (topP < 1) {
    let cum = 0;
    for (let i = 0; i < keep; i++) {
      cum += probs[i]! / sum;
      if (cum >= topP) {
        keep = i + 1;
        break;
      }
    }
    sum = 0;
    for (let i = 0; i < keep; i++) sum += probs[i]!;
  }
  const u = uniform(seed, counter) * sum;
  let cum = 0;
  for (let i = 0; i < keep; i++) {
    cum += probs[i]!;
    if (u < cum) return order[i]!;
  }
  return order[keep - 1]!;
}
