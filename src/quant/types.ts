// What a quantized linear is, independent of how it is packed on disk or how it was
// solved. The solvers (rtn.ts, gptq.ts) produce a `QuantizedWeight`; the GPTQ layout
// (gptq_pack.ts) packs and unpacks it; loaders dequantize it (CPU) or hand it to a
// low-bit GEMM (CUDA).
//
// Orientation follows the GPTQ checkpoint layout, not the dense weight: index k runs
// over the linear's inputs (K = inDim) and n over its outputs (N = outDim), so a dense
// HF weight W[n, k] (shape [N, K]) is approximated by
//   W[n, k] ≈ scales[g(k), n] * (codes[k, n] - zeros[g(k), n]),   g(k) = gIdx[k].

export type QuantBits = 2 | 3 | 4 | 8;
export const QUANT_BITS: readonly QuantBits[] = [2, 3, 4, 8];

export interface QuantSpec {
  readonly bits: QuantBits;
  /** Inputs per quantization group; -1 = one group spanning all K inputs. */
  readonly groupSize: number;
  /** Symmetric: every zero point is 2^(bits-1). */
  readonly sym: boolean;
  /** Act-order (`desc_act`): columns were solved in order of decreasing Hessian diagonal,
   * so gIdx is not monotone. */
  readonly descAct: boolean;
}

/** One quantized linear, unpacked. */
export interface QuantizedWeight {
  readonly spec: QuantSpec;
  /** Inputs (the dense weight's columns). */
  readonly inDim: number;
  /** Outputs (the dense weight's rows). */
  readonly outDim: number;
  /** [inDim * outDim], index k * outDim + n; each value in [0, 2^bits). */
  readonly codes: Uint8Array;
  /** [numGroups * outDim], index g * outDim + n. */
  readonly scales: Float32Array;
  /** [numGroups * outDim], index g * outDim + n; each value in [0, 2^bits). */
  readonly zeros: Uint8Array;
  /** [inDim]: the group of input k. */
  readonly gIdx: Int32Array;
}

export function numGroups(inDim: number, groupSize: number): number {
  return groupSize === -1 ? 1 : Math.ceil(inDim / groupSize);
}

/** Dense W [outDim, inDim] (row-major, the HF orientation) from a quantized weight, in f32. */
export function dequantize(q: QuantizedWeight): Float32Array {
  const { inDim: K, outDim: N, codes, scales, zeros, gIdx } = q;
  const w = new Float32Array(N * K);
  for (let k = 0; k < K; k++) {
    const g = gIdx[k]! * N;
    const row = k * N;
    for (let n = 0; n < N; n++) w[n * K + k] = scales[g + n]! * (codes[row + n]! - zeros[g + n]!);
  }
  return w;
}
