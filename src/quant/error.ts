// How far a quantized linear's output moves on a calibration set:
// tr((W - Ŵ) H (W - Ŵ)^T) = (2/n) ||(W - Ŵ) X||_F^2 for H = (2/n) X X^T.
// The GPTQ family minimizes exactly this per layer, so it is the measure used to
// compare methods and aggregates layer by layer on each task's own activations.

import { dequantize, type QuantizedWeight } from "./types.js";

/** tr(D H D^T) for D = w - dequantize(q); w: [N, K] (HF orientation), h: [K, K]. */
export function outputError(w: Float32Array, q: QuantizedWeight | Float32Array, h: ArrayLike<number>): number {
  const deq = q instanceof Float32Array ? q : dequantize(q);
  const K = Math.round(Math.sqrt(h.length));
  const N = w.length / K;
  if (K * K !== h.length || deq.length !== w.length || !Number.isInteger(N)) {
    throw new RangeError(`outputError: weight of ${w.length} values and Hessian of ${h.length} do not match`);
  }
  const d = new Float64Array(K);
  const hd = new Float64Array(K);
  let total = 0;
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) d[k] = w[n * K + k]! - deq[n * K + k]!;
    for (let i = 0; i < K; i++) {
      let s = 0;
      for (let j = 0; j < K; j++) s += h[i * K + j]! * d[j]!;
      hd[i] = s;
    }
    for (let i = 0; i < K; i++) total += d[i]! * hd[i]!;
  }
  return total;
}
