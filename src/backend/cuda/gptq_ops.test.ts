// CPU checks of the GPTQ solver's kernel seam: every launch gptq_ops.ts makes names a
// kernel that kernels/gptq.cu defines, with the argument kinds it declares, and grid
// shapes the hardware accepts at Llama-sized shapes. The numerics are checked against
// the CPU solver on the GPU machine (test/gpu/gptq.test.ts).

import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { GptqOps, GPTQ_MAX_BLOCK, f64Halves, gptqKernelNames } from "./gptq_ops.js";
import type { Dim3, KernelArg, Launcher } from "./launch.js";
import { KERNEL_FILES } from "./ops.js";

type Kind = "ptr" | "i32" | "u32" | "f32";

function kernelsOf(file: string): Map<string, Kind[]> {
  const text = readFileSync(file, "utf8");
  const out = new Map<string, Kind[]>();
  const re = /extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)*(\w+)\s*\(([^)]*)\)/g;
  for (const m of text.matchAll(re)) {
    out.set(m[1]!, m[2]!.split(",").map((p) => p.trim()).filter((p) => p).map((p): Kind =>
      p.includes("*") ? "ptr" : /\bfloat\b/.test(p) ? "f32" : /\bunsigned\b/.test(p) ? "u32" : "i32"));
  }
  return out;
}

interface Launch { name: string; grid: Dim3; block: Dim3; args: readonly KernelArg[] }

class Recorder implements Launcher {
  readonly launches: Launch[] = [];
  launch(name: string, grid: Dim3, block: Dim3, _smem: number, args: readonly KernelArg[]): void {
    this.launches.push({ name, grid, block, args });
  }
}

const kindOf = (a: KernelArg): Kind => ("ptr" in a ? "ptr" : "i32" in a ? "i32" : "u32" in a ? "u32" : "f32");

describe("GPTQ kernel seam (CPU checks)", () => {
  const file = KERNEL_FILES.find((f) => f.endsWith("/gptq.cu"))!;
  const kernels = kernelsOf(file);

  it("gptq.cu is compiled by the driver layer and defines every kernel gptq_ops.ts launches", () => {
    expect(file).toBeDefined();
    expect(gptqKernelNames().filter((n) => !kernels.has(n))).toEqual([]);
  });

  for (const [K, N] of [[256, 704], [4096, 4096], [11008, 4096], [4096, 11008], [130, 33]] as const) {
    it(`launches match the kernels' signatures and grid limits at K=${K} N=${N}`, () => {
      const rec = new Recorder();
      const ops = new GptqOps(rec);
      ops.dampedHessian(1n, 2n, 3n, K, 0.01);
      ops.factorOk(1n, 2n, K);
      ops.reverseUpper(1n, K);
      ops.loadWeight(1n, 2n, 3n, 4n, N, K);
      ops.groupParams(1n, 2n, 3n, 4n, 5n, N, K, K, 4, false);
      ops.groupParams(1n, 2n, 3n, 4n, 5n, N, K, 32, 3, true);
      const args = { W: 1n, U: 2n, E: 3n, codes: 4n, scales: 5n, zeros: 6n, perm: 7n, groupOf: 8n, loss: 9n, status: 10n, K, N, dynamicGroupSize: 128, bits: 4, sym: false };
      ops.block(args, 0, Math.min(GPTQ_MAX_BLOCK, K));
      expect(new Set(rec.launches.map((l) => l.name))).toEqual(new Set(gptqKernelNames()));
      for (const l of rec.launches) {
        expect(l.args.map(kindOf), l.name).toEqual(kernels.get(l.name));
        expect(l.grid[0]).toBeLessThan(2 ** 31);
        expect(l.grid[1]).toBeLessThanOrEqual(65535);
        expect(l.block[0] * l.block[1] * l.block[2]).toBeLessThanOrEqual(1024);
      }
      // gptq_block keeps 8 warps (its shared tile and row striding assume them).
      expect(rec.launches.find((l) => l.name === "gptq_block")!.block).toEqual([256, 1, 1]);
    });
  }

  it("refuses blocks the shared tile cannot hold", () => {
    const ops = new GptqOps(new Recorder());
    const args = { W: 1n, U: 2n, E: 3n, codes: 4n, scales: 5n, zeros: 6n, perm: 7n, groupOf: 8n, loss: 9n, status: 10n, K: 512, N: 64, dynamicGroupSize: 0, bits: 4, sym: true };
    expect(() => ops.block(args, 0, GPTQ_MAX_BLOCK + 1)).toThrow(/1\.\.128 columns/);
    expect(() => ops.block(args, 5, 5)).toThrow(/1\.\.128 columns/);
  });

  it("f64Halves splits a double into the words __hiloint2double joins", () => {
    for (const x of [0, 1, 0.01 * 3.7, -2.5e-300, 123456.789]) {
      const { hi, lo } = f64Halves(x);
      const v = new DataView(new ArrayBuffer(8));
      v.setUint32(4, hi, true);
      v.setUint32(0, lo, true);
      expect(v.getFloat64(0, true)).toBe(x);
      expect(hi).toBeGreaterThanOrEqual(0);
      expect(hi).toBeLessThan(2 ** 32);
    }
  });
});
