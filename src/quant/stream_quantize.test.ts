// The layer-streamed quantizer end to end on the CPU backend (the CUDA run is
// test/gpu/quantize_gpu.test.ts): incremental == full byte for byte, cached per-task
// Hessians give the same checkpoint, and the checkpoint is a complete GPTQ folder.

import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { CpuBackend } from "../backend/cpu/cpu_backend.js";
import { SafetensorsFile } from "../model/safetensors.js";
import { readQuantizedWeights } from "./checkpoint.js";
import { cpuGptqSolver } from "./gpu_gptq.js";
import type { QuantTask } from "./methods.js";
import type { Manifest } from "./mlgptq_dir.js";
import { quantizeIncrementalOnDevice, quantizeOnDevice } from "./stream_quantize.js";

const DEMO = join(import.meta.dirname, "..", "..", "examples", "demo");
const BASE = join(DEMO, "base");
const task = (name: string): QuantTask => ({ name, adapterDir: join(DEMO, "adapters", name), calibPath: join(DEMO, "data", name, "calib.jsonl") });
const spec = { bits: 4, groupSize: 64, sym: false, descAct: false } as const;

function sameFile(a: string, b: string): boolean {
  return readFileSync(a).equals(readFileSync(b));
}

describe("quantizeOnDevice on the CPU backend (demo)", () => {
  it("{reverse, sort} then --from {caesar} equals all three at once; a second run from the work folder equals the first", () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-stream-quantize-"));
    const common = { backend: new CpuBackend(), solver: cpuGptqSolver(), method: "mlgptq" as const, spec, calibLimit: 3, stepTokens: 128 };
    const notes: string[] = [];
    const progress = { note: (m: string) => void notes.push(m), start() {}, update() {}, stop() {} };
    const all = join(dir, "all"), first = join(dir, "first"), inc = join(dir, "inc"), again = join(dir, "again");
    const r = quantizeOnDevice({ ...common, baseDir: BASE, outDir: all, tasks: [task("reverse"), task("sort"), task("caesar")], workDir: join(dir, "work"), keepWork: true, progress });
    expect(r.device).toBe("stream-cpu");
    expect(r.stats.length).toBe(42);
    expect(r.peakExtraBytes).toBeNull(); // the CPU backend has no memoryInfo
    expect(notes.filter((n) => n.includes("capturing Hessians on stream-cpu")).length).toBe(3);

    quantizeOnDevice({ ...common, baseDir: BASE, outDir: first, tasks: [task("reverse"), task("sort")] });
    notes.length = 0;
    quantizeIncrementalOnDevice({ backend: common.backend, solver: common.solver, fromDir: first, outDir: inc, tasks: [task("caesar")], progress });
    expect(notes.some((n) => n.includes("2 task(s) cached (reverse, sort), adding caesar"))).toBe(true);
    expect(notes.some((n) => n.includes("not byte-identical"))).toBe(false);
    expect(sameFile(join(all, "model.safetensors"), join(inc, "model.safetensors"))).toBe(true);
    expect(sameFile(join(all, "mlgptq", "hessians.safetensors"), join(inc, "mlgptq", "hessians.safetensors"))).toBe(true);

    notes.length = 0;
    quantizeOnDevice({ ...common, baseDir: BASE, outDir: again, tasks: [task("reverse"), task("sort"), task("caesar")], workDir: join(dir, "work"), progress });
    expect(notes.filter((n) => n.includes("Hessians from the work folder")).length).toBe(3);
    expect(sameFile(join(all, "model.safetensors"), join(again, "model.safetensors"))).toBe(true);

    const m = JSON.parse(readFileSync(join(inc, "mlgptq", "manifest.json"), "utf8")) as Manifest;
    expect(m.tasks.map((t) => t.name)).toEqual(["reverse", "sort", "caesar"]);
    expect(m.calibration.device).toBe("stream-cpu");
    expect(m.calibration.step_tokens).toBe(128);
    const q = readQuantizedWeights(all);
    expect(q.size).toBe(42);
    expect(q.get("model.layers.5.mlp.down_proj")!.spec).toEqual(spec);
  }, 300_000);

  it("sum mode (per-task Hessians too big to keep: summed on the backend) is incremental == full and agrees with per-task folding", () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-stream-quantize-"));
    const common = { backend: new CpuBackend(), solver: cpuGptqSolver(), method: "mlgptq" as const, spec, calibLimit: 2, stepTokens: 128, baseDir: BASE };
    const three = [task("reverse"), task("sort"), task("mirror")];
    quantizeOnDevice({ ...common, outDir: join(dir, "all"), tasks: three, cacheLimitBytes: 0 });
    quantizeOnDevice({ ...common, outDir: join(dir, "first"), tasks: three.slice(0, 2), cacheLimitBytes: 0 });
    quantizeIncrementalOnDevice({ backend: common.backend, solver: common.solver, fromDir: join(dir, "first"), outDir: join(dir, "inc"), tasks: three.slice(2), cacheLimitBytes: 0 });
    expect(sameFile(join(dir, "all", "model.safetensors"), join(dir, "inc", "model.safetensors"))).toBe(true);
    expect(sameFile(join(dir, "all", "mlgptq", "hessians.safetensors"), join(dir, "inc", "mlgptq", "hessians.safetensors"))).toBe(true);

    // The per-task path (cached Hessians, folded on the host) sums in another order: same state to f32 rounding.
    quantizeOnDevice({ ...common, outDir: join(dir, "folded"), tasks: three });
    const a = SafetensorsFile.open(join(dir, "all", "mlgptq", "hessians.safetensors"));
    const b = SafetensorsFile.open(join(dir, "folded", "mlgptq", "hessians.safetensors"));
    let worst = 0;
    for (const name of b.names()) {
      const x = a.get(name).data as Float32Array, y = b.get(name).data as Float32Array;
      let d = 0, n = 0;
      for (let i = 0; i < y.length; i++) {
        d = Math.max(d, Math.abs(x[i]! - y[i]!));
        n = Math.max(n, Math.abs(y[i]!));
      }
      worst = Math.max(worst, d / n);
    }
    a.close();
    b.close();
    expect(worst).toBeGreaterThan(0); // really another path
    expect(worst).toBeLessThan(1e-5);
  }, 300_000);
});
