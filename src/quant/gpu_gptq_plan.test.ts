// The CUDA solver's host half must decide exactly what gptqQuantize decides from the
// Hessian's diagonal: dead inputs, solving order (ties included), group maps and g_idx.
// The damping base (mean diagonal) is checked through its effect: the GPU test compares
// damping and attempts with the CPU solver's.

import { describe, expect, it } from "vitest";
import { gptqProblem } from "../../test/helpers/gptq_problems.js";
import { GptqError, gptqQuantize, prepareHessian } from "./gptq.js";
import { cpuGptqSolver } from "./gpu_gptq.js";
import { gptqPlan } from "./gpu_gptq_plan.js";
import type { QuantSpec } from "./types.js";

const spec = (o: Partial<QuantSpec>): QuantSpec => ({ bits: 4, groupSize: 32, sym: false, descAct: true, ...o });

describe("gptqPlan (the CUDA solver's host half)", () => {
  it("dead inputs and the act-order permutation equal prepareHessian's, ties included", () => {
    const { h, K } = gptqProblem(96, 8, 3, { dead: [5, 40] });
    // Ties: copy one diagonal onto two other inputs.
    h[10 * K + 10] = h[20 * K + 20]!;
    h[70 * K + 70] = h[20 * K + 20]!;
    for (const descAct of [false, true]) {
      const p = gptqPlan(h, K, spec({ descAct }));
      const ref = prepareHessian(h, K, descAct);
      expect(p.dead).toEqual(ref.dead);
      expect(p.deadColumns).toBe(2);
      expect(p.perm).toEqual(ref.perm);
    }
  });

  for (const [groupSize, staticGroups, descAct] of [[-1, false, true], [32, false, true], [32, true, true], [24, false, false], [128, true, false]] as const) {
    it(`groups and g_idx equal gptqQuantize's (group ${groupSize}, static ${staticGroups}, act-order ${descAct})`, () => {
      const { w, h, N, K } = gptqProblem(100, 4, 11);
      const s = spec({ groupSize, descAct });
      const p = gptqPlan(h, K, s, staticGroups);
      const ref = gptqQuantize(w, N, K, h, s, { staticGroups });
      expect(p.gIdx).toEqual(ref.weight.gIdx);
      expect(p.numGroups * N).toBe(ref.weight.scales.length);
      expect(p.groups).toBe(groupSize === -1 ? "one" : staticGroups ? "static" : "dynamic");
      // groupOf[i] is the group of the i-th solved input, i.e. g_idx in solving order.
      for (let i = 0; i < K; i++) expect(p.groupOf[i]).toBe(ref.weight.gIdx[ref.perm[i]!]);
    });
  }

  it("refuses what prepareHessian refuses, with the same errors", () => {
    const { h, K } = gptqProblem(16, 2, 5);
    expect(() => gptqPlan(h.subarray(1), K, spec({}))).toThrow(/Hessian has 255 values, expected 16 x 16/);
    h[3 * K + 3] = Infinity;
    expect(() => gptqPlan(h, K, spec({}))).toThrow(GptqError);
    expect(() => prepareHessian(h, K, true)).toThrow(GptqError);
  });

  it("cpuGptqSolver is gptqQuantize", () => {
    const { w, h, N, K } = gptqProblem(64, 16, 2);
    const s = spec({ bits: 3 });
    const a = cpuGptqSolver().solve(w, N, K, h, s, { blockSize: 32 });
    const b = gptqQuantize(w, N, K, h, s, { blockSize: 32 });
    expect(a.weight.codes).toEqual(b.weight.codes);
    expect(a.loss).toBe(b.loss);
  });
});
