// Quantized linears served quantized: a `Linear` over a backend's low-bit weight
// (Backend.uploadQuantized / linearQuantized), and the stacking of a fused group's members
// (q/k/v, gate/up) into one quantized weight along the outputs, as the dense loader stacks
// their rows (model/weights.ts).

import type { Backend, LoraStack, PreparedStep, QuantizedTensor, Tensor } from "../backend/backend.js";
import type { Linear } from "../model/linear.js";
import { numGroups, type QuantizedWeight } from "./types.js";

/** y = x dequantize(W)^T (+ b) with W kept quantized on the backend. */
export class QuantLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;

  constructor(
    private readonly backend: Backend,
    readonly weight: QuantizedTensor,
    readonly bias?: Tensor,
  ) {
    if (!backend.linearQuantized) throw new Error(`the ${backend.name} backend has no low-bit linear (linearQuantized)`);
    this.inDim = weight.inDim;
    this.outDim = weight.outDim;
  }

  forward(out: Tensor, x: Tensor, _step: PreparedStep): void {
    this.backend.linearQuantized!(out, x, this.weight, this.bias);
  }

  forwardLora(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): boolean {
    return this.backend.linearQuantizedLora?.(out, x, this.weight, stack, step, this.bias) ?? false;
  }
}

/** Members of a fused group that cannot share one quantized weight; the message says why. */
export class QuantStackError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QuantStackError";
  }
}

/**
 * One quantized weight whose outputs are the members' outputs in order (W = [W_0; W_1; ...]
 * by rows). The members read the same input, so they must agree on everything that runs
 * along the inputs: bit width, group size and g_idx (with act-order the kernels reorder
 * the input once for the whole group). Symmetric if every member is.
 */
export function stackQuantized(members: readonly QuantizedWeight[]): QuantizedWeight {
  const first = members[0];
  if (!first) throw new QuantStackError("nothing to stack");
  if (members.length === 1) return first;
  const K = first.inDim, { bits, groupSize } = first.spec;
  for (const [i, m] of members.entries()) {
    if (m.inDim !== K) throw new QuantStackError(`member ${i} has ${m.inDim} inputs, member 0 has ${K}`);
    if (m.spec.bits !== bits || m.spec.groupSize !== groupSize) {
      throw new QuantStackError(`member ${i} is ${m.spec.bits}-bit with group size ${m.spec.groupSize}, member 0 ${bits}-bit with ${groupSize}`);
    }
    for (let k = 0; k < K; k++) {
      if (m.gIdx[k] !== first.gIdx[k]) throw new QuantStackError(`member ${i}'s g_idx differs from member 0's at input ${k} (${m.gIdx[k]} vs ${first.gIdx[k]})`);
    }
  }
  const N = members.reduce((a, m) => a + m.outDim, 0);
  const G = numGroups(K, groupSize);
  const codes = new Uint8Array(K * N);
  const scales = new Float32Array(G * N);
  const zeros = new Uint8Array(G * N);
  let n0 = 0;
  for (const m of members) {
    const n = m.outDim;
    for (let k = 0; k < K; k++) codes.set(m.codes.subarray(k * n, (k + 1) * n), k * N + n0);
    for (let g = 0; g < G; g++) {
      scales.set(m.scales.subarray(g * n, (g + 1) * n), g * N + n0);
      zeros.set(m.zeros.subarray(g * n, (g + 1) * n), g * N + n0);
    }
    n0 += n;
  }
  const spec = { bits, groupSize, sym: members.every((m) => m.spec.sym), descAct: members.some((m) => m.spec.descAct) };
  return { spec, inDim: K, outDim: N, codes, scales, zeros, gIdx: first.gIdx };
}
