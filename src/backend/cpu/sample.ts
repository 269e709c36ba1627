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

/**
 * Greedy when temperature is 0. Otherwise: p_i = exp((l_i - max) / T); the keep set is
 * every token whose logit reaches the k-th largest logit (top-k) and whose p reaches
 * the smallest p inside the most likely set that covers top_p of the (top-k)
 * probability mass (top-p). A draw u in [0, sum of kept p) then scans the kept tokens
 * in vocabulary order. The GPU sampler implements exactly this, with thresholds found
 * by bisection, so both backends pick the same token from the same (seed, counter).
 */
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
  const order = topK(logits, V);
  const k = topKLimit > 0 ? Math.min(topKLimit, V) : V;
  const minLogit = logits[order[k - 1]!]!;
  const max = logits[order[0]!]!;
  const probs = new Float64Array(V);
  let massK = 0;
  for (let i = 0; i < V; i++) {
    if (logits[i]! < minLogit) continue;
    probs[i] = Math.exp((logits[i]! - max) / temperature);
    massK += probs[i]!;
  }
  let minProb = 0;
  if (topP < 1) {
    let cum = 0;
    for (const i of order) {
      if (logits[i]! < minLogit) break;
      cum += probs[i]!;
      minProb = probs[i]!;
      if (cum >= topP * massK) break;
    }
  }
  let kept = 0;
  for (let i = 0; i < V; i++) if (probs[i]! < minProb) probs[i] = 0;
  for (let i = 0; i < V; i++) kept += probs[i]!;
  const u = uniform(seed, counter) * kept;
  let cum = 0;
  let last = order[0]!;
  for (let i = 0; i < V; i++) {
    if (probs[i] === 0) continue;
    cum += probs[i]!;
    last = i;
    if (u < cum) return i;
  }
  return last;
}
