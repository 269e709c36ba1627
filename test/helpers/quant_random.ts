// Random GPTQ-quantized weights for the low-bit kernel tests (CPU emulation and GPU):
// codes uniform over the bit width, fp16-exact scales, zero points uniform in [1, 2^bits - 1]
// (or 2^(bits-1) when symmetric), and with act-order a seeded solving order.

import { f16ToF32, f32ToF16 } from "../../src/backend/tensor.js";
import { groupIndex } from "../../src/quant/quantizer.js";
import { numGroups, type QuantizedWeight, type QuantSpec } from "../../src/quant/types.js";

export function seededRandom(seed: number): () => number {
  let s = (seed * 2654435761 + 1) >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

export function seededPerm(n: number, r: () => number): Int32Array {
  const a = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

export function randomQuantized(spec: QuantSpec, K: number, N: number, seed: number): QuantizedWeight {
  const r = seededRandom(seed);
  const G = numGroups(K, spec.groupSize);
  const maxq = (1 << spec.bits) - 1;
  const codes = Uint8Array.from({ length: K * N }, () => Math.floor(r() * (maxq + 1)));
  const scales = f16ToF32(f32ToF16(Float32Array.from({ length: G * N }, () => 0.002 + 0.05 * r())));
  const zeros = Uint8Array.from({ length: G * N }, () => (spec.sym ? 1 << (spec.bits - 1) : 1 + Math.floor(r() * maxq)));
  const gIdx = groupIndex(K, spec.groupSize, spec.descAct ? seededPerm(K, r) : undefined);
  return { spec, inDim: K, outDim: N, codes, scales, zeros, gIdx };
}
