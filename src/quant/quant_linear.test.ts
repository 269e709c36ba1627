import { describe, expect, it } from "vitest";
import { CpuBackend } from "../backend/cpu/cpu_backend.js";
import type { PreparedStep } from "../backend/backend.js";
import { DenseLinear } from "../model/linear.js";
import { QuantLinear, QuantStackError, stackQuantized } from "./quant_linear.js";
import { quantizeRtn } from "./rtn.js";
import { dequantize, type QuantizedWeight, type QuantSpec } from "./types.js";

const step = {} as PreparedStep; // linears do not read the step

function rand(seed: number): () => number {
  let s = (seed * 2654435761 + 3) >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

/** RTN of a seeded [N, K] weight; with act-order, the input order comes from `permSeed`. */
function rtnTestWeight(spec: QuantSpec, K: number, N: number, seed: number, permSeed: number): QuantizedWeight {
  const r = rand(seed);
  const w = Float32Array.from({ length: N * K }, () => (r() * 2 - 1) * 0.05);
  if (!spec.descAct) return quantizeRtn(w, N, K, spec);
  const p = rand(permSeed);
  const perm = Int32Array.from({ length: K }, (_, i) => i);
  for (let i = K - 1; i > 0; i--) {
    const j = Math.floor(p() * (i + 1));
    [perm[i], perm[j]] = [perm[j]!, perm[i]!];
  }
  return quantizeRtn(w, N, K, spec, { perm });
}

describe("QuantLinear and stackQuantized", () => {
  it("stacks members along the outputs: the dequantized rows of each member, in order", () => {
    const spec = { bits: 4 as const, groupSize: 32, sym: false, descAct: true };
    const a = rtnTestWeight(spec, 64, 32, 1, 9), b = rtnTestWeight(spec, 64, 96, 2, 9);
    const s = stackQuantized([a, b]);
    expect(s.outDim).toBe(128);
    expect(s.gIdx).toEqual(a.gIdx);
    expect(dequantize(s)).toEqual(Float32Array.from([...dequantize(a), ...dequantize(b)]));
    expect(s.spec.sym).toBe(false);
    expect(stackQuantized([a])).toBe(a);
  });

  it("refuses members that cannot share one weight, naming the difference", () => {
    const spec = { bits: 4 as const, groupSize: 32, sym: true, descAct: true };
    const a = rtnTestWeight(spec, 64, 32, 1, 9), b = rtnTestWeight(spec, 64, 32, 2, 10);
    expect(() => stackQuantized([a, b])).toThrow(QuantStackError);
    expect(() => stackQuantized([a, b])).toThrow(/g_idx differs/);
    const c = rtnTestWeight({ ...spec, bits: 3 }, 64, 32, 3, 9);
    expect(() => stackQuantized([a, c])).toThrow(/3-bit/);
  });

  it("on the CPU backend equals the dense linear of the dequantized weight (with bias)", () => {
    const cpu = new CpuBackend();
    const q = rtnTestWeight({ bits: 3, groupSize: 64, sym: false, descAct: true }, 128, 64, 4, 11);
    const x = Float32Array.from({ length: 5 * 128 }, (_, i) => Math.sin(i * 0.37));
    const bias = cpu.upload({ shape: [64], dtype: "f32", data: Float32Array.from({ length: 64 }, (_, i) => i / 64) }, "f32");
    const xt = cpu.upload({ shape: [5, 128], dtype: "f32", data: x });
    const o1 = cpu.empty([5, 64], "f32"), o2 = cpu.empty([5, 64], "f32");
    new QuantLinear(cpu, cpu.uploadQuantized(q), bias).forward(o1, xt, step);
    new DenseLinear(cpu, cpu.upload({ shape: [64, 128], dtype: "f32", data: dequantize(q) }), bias).forward(o2, xt, step);
    expect(cpu.read(o1)).toEqual(cpu.read(o2));
  });
});
