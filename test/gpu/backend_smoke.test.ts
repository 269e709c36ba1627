// Smoke test of the CUDA driver layer on a real GPU (vitest project "gpu"): device
// init, upload/read, NVRTC compile and cache, the launcher, cuBLASLt `linear` against
// the CPU backend, graph capture/replay against eager, and the error path. It needs
// none of ops.ts's kernels: it compiles its own small kernels. Skips with the reason
// when no CUDA device is usable.

import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { StepBatch, Tensor } from "../../src/backend/backend.js";
import { CpuBackend } from "../../src/backend/cpu/cpu_backend.js";
import { CudaBackend, CudaError, NvrtcCompileError } from "../../src/backend/cuda/cuda_backend.js";
import { cudaDriver } from "../../src/backend/cuda/ffi/driver.js";
import { buildKernels } from "../../src/backend/cuda/ffi/nvrtc.js";
import { KERNEL_FILES } from "../../src/backend/cuda/ops.js";
import type { CudaTensor } from "../../src/backend/cuda/tensor.js";
import { bf16ToF32, f32ToBf16 } from "../../src/backend/tensor.js";

const SMOKE_CU = `
#include <cuda_bf16.h>
// y[i] += a * x[i] for i < n.
extern "C" __global__ void smoke_axpy(float* y, const float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
// Scales the rows r < *live (of cap) of a bf16 [cap, cols] matrix by a: a kernel that,
// like the real ones, is launched over a capacity and reads the live count from memory.
extern "C" __global__ void smoke_scale_rows(__nv_bfloat16* y, const int* live, int cap, int cols, float a) {
  int r = blockIdx.x;
  if (r >= cap || r >= *live) return;
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    y[r * cols + c] = __float2bfloat16(__bfloat162float(y[r * cols + c]) * a);
}
// Writes through p: launched with p = 0 it faults (the sticky-error test).
extern "C" __global__ void smoke_fault(int* p) { p[threadIdx.x] = 1; }
`;

const reason = CudaBackend.unavailableReason();

/** Deterministic values in [-scale, scale), rounded to bf16 so both backends see the same inputs. */
function bf16Values(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s >>> 8) / 16777216 * 2 - 1) * scale;
  }
  return bf16ToF32(f32ToBf16(out));
}

function relErr(got: Float32Array, ref: Float32Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = got[i]! - ref[i]!;
    if (!Number.isFinite(got[i]!)) return Infinity;
    num += d * d;
    den += ref[i]! * ref[i]!;
  }
  return Math.sqrt(num / Math.max(den, 1e-30));
}

/** A decode-only step of `n` sequences (one token each), blocks per sequence B. */
function decodeStep(n: number, B = 4): StepBatch {
  return {
    numTokens: n, numSeqs: n,
    tokenIds: Int32Array.from({ length: n }, (_, i) => i + 1), positions: new Int32Array(n).fill(3),
    slotMapping: Int32Array.from({ length: n }, (_, i) => i * 16 + 3), loraSlots: new Int32Array(n).fill(-1),
    queryStart: Int32Array.from({ length: n + 1 }, (_, i) => i), contextLens: new Int32Array(n).fill(4),
    blockTables: Int32Array.from({ length: n * B }, (_, i) => (i % B === 0 ? i / B : -1)), maxBlocksPerSeq: B,
    sampleRows: Int32Array.from({ length: n }, (_, i) => i),
    sampling: {
      temperature: new Float32Array(n), topP: new Float32Array(n).fill(1), topK: new Int32Array(n),
      seeds: new Uint32Array(n), counters: new Uint32Array(n), numTopLogprobs: 0,
    },
  };
}

const ptr = (t: Tensor): bigint => (t as CudaTensor).ptr;

describe.skipIf(reason !== null)(`CUDA backend smoke${reason ? ` (skipped: ${reason})` : ""}`, () => {
  let dir: string;
  let cacheDir: string;
  let b: CudaBackend;
  const cpu = new CpuBackend();

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "inlaid-smoke-"));
    cacheDir = join(dir, "cache");
    writeFileSync(join(dir, "smoke.cu"), SMOKE_CU);
    b = await CudaBackend.create({ kernelFiles: ["smoke.cu"], kernelsDir: dir, cacheDir });
  });
  afterAll(() => {
    b?.dispose();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("initializes the device", () => {
    const d = b.device;
    console.log(`device ${d.ordinal}: ${d.name}, sm_${d.computeCapability.join("")}, ${d.smCount} SMs, driver ${d.driverVersion}, arch ${d.arch}`);
    expect(b.name).toBe("cuda");
    expect(b.activationDtype).toBe("bf16");
    expect(d.smCount).toBeGreaterThan(0);
    expect(d.arch).toMatch(/^sm_\d+/);
    const m = b.memoryInfo();
    expect(m.total).toBeGreaterThan(0);
    expect(m.free).toBeGreaterThan(0);
    expect(m.free).toBeLessThanOrEqual(m.total);
  });

  it("round-trips uploads: f32 -> bf16 rounds to nearest even, f32 and i32 are exact, views read their rows", () => {
    const x = new Float32Array([1, 1.00390625, 1.005859375, Math.PI, -2.5, 1e-3, 65504, -0, 3.3895314e38]);
    const t = b.upload({ shape: [3, 3], dtype: "f32", data: x });
    expect(t.dtype).toBe("bf16");
    expect(Array.from(b.read(t))).toEqual(Array.from(bf16ToF32(f32ToBf16(x))));
    const t32 = b.upload({ shape: [9], dtype: "f32", data: x }, "f32");
    expect(Array.from(b.read(t32))).toEqual(Array.from(x));
    const bits = f32ToBf16(x);
    expect(Array.from(b.read(b.upload({ shape: [9], dtype: "bf16", data: bits })))).toEqual(Array.from(bf16ToF32(bits)));
    const ids = Int32Array.from([0, -1, 2 ** 31 - 1, -(2 ** 31), 7]);
    expect(Array.from(b.read(b.upload({ shape: [5], dtype: "i32", data: ids })))).toEqual(Array.from(ids));
    const v = b.rows(t, 2);
    expect(v.shape).toEqual([2, 3]);
    expect(Array.from(b.read(v))).toEqual(Array.from(bf16ToF32(f32ToBf16(x))).slice(0, 6));
    const z = b.empty([4, 5], "f32");
    expect(Array.from(b.read(z))).toEqual(new Array(20).fill(0));
    for (const u of [t, t32, z]) b.free(u);
  });

  it("compiles with NVRTC once, then hits the on-disk cache; compile errors carry NVRTC's log", async () => {
    expect(b.kernelImages.map((k) => [k.file, k.cached])).toEqual([["smoke.cu", false]]);
    const again = await CudaBackend.create({ kernelFiles: ["smoke.cu"], kernelsDir: dir, cacheDir });
    try {
      expect(again.kernelImages.map((k) => [k.file, k.cached])).toEqual([["smoke.cu", true]]);
      console.log(`smoke.cu: compile ${b.kernelImages[0]!.ms.toFixed(1)} ms, cached load ${again.kernelImages[0]!.ms.toFixed(1)} ms`);
      expect(again.launcher.has("smoke_axpy")).toBe(true);
    } finally {
      again.dispose();
    }
    writeFileSync(join(dir, "broken.cu"), 'extern "C" __global__ void broken(int* p) { p[0] = undefined_name; }\n');
    const err = await buildKernels({ files: ["broken.cu"], dir, cacheDir, arch: b.device.arch }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NvrtcCompileError);
    expect((err as NvrtcCompileError).log).toMatch(/undefined_name/);
    expect((err as NvrtcCompileError).file).toBe("broken.cu");
  });

  it("compiles ops.ts's kernel files for this device", async () => {
    const images = await buildKernels({ files: KERNEL_FILES, arch: b.device.arch, cacheDir });
    expect(images.map((i) => i.file)).toEqual([...KERNEL_FILES]);
    for (const i of images) {
      expect(i.image.length).toBeGreaterThan(0);
      console.log(`${i.file}: ${i.cached ? "cached" : "compiled"} in ${i.ms.toFixed(0)} ms`);
    }
  });

  it("launches kernels with pointer, f32 and i32 arguments", () => {
    const y = b.upload({ shape: [1000], dtype: "f32", data: Float32Array.from({ length: 1000 }, (_, i) => i) }, "f32");
    const x = b.upload({ shape: [1000], dtype: "f32", data: new Float32Array(1000).fill(2) }, "f32");
    b.launcher.launch("smoke_axpy", [4, 1, 1], [256, 1, 1], 0, [{ ptr: ptr(y) }, { ptr: ptr(x) }, { f32: 0.5 }, { i32: 999 }]);
    const out = b.read(y) as Float32Array;
    expect(out[0]).toBe(1);
    expect(out[998]).toBe(999);
    expect(out[999]).toBe(999); // i >= n untouched
    b.free(y);
    b.free(x);
  });

  const shapes: [number, number, number, boolean, "bf16" | "f32"][] = [
    // n, K, N, bias, out dtype
    [1, 256, 512, false, "bf16"],
    [5, 256, 768, true, "bf16"],
    [64, 1024, 4096, false, "bf16"],
    [300, 4096, 1024, true, "bf16"],
    [7, 512, 32000, false, "f32"],
    [33, 2048, 256, false, "f32"],
    // The model's projections since matmul outputs are f32: bf16 x / w, f32 out and an f32
    // bias through the epilogue (Qwen2's q/k/v bias), at decode and prefill row counts.
    [1, 896, 128, true, "f32"],
    [300, 4096, 1024, true, "f32"],
  ];
  for (const [n, K, N, withBias, out] of shapes) {
    it(`cuBLASLt linear n=${n} K=${K} N=${N}${withBias ? " +bias" : ""} -> ${out} matches the CPU backend`, () => {
      const xs = bf16Values(n * K, n * 7 + K), ws = bf16Values(N * K, N + 3, 0.05), bs = bf16Values(N, 11);
      const co = cpu.empty([n, N], "f32");
      cpu.linear(co, cpu.upload({ shape: [n, K], dtype: "f32", data: xs }), cpu.upload({ shape: [N, K], dtype: "f32", data: ws }),
        withBias ? cpu.upload({ shape: [N], dtype: "f32", data: bs }) : undefined);
      const ref = cpu.read(co) as Float32Array;
      // Through a view of a larger buffer, as the model calls it.
      const X = b.upload({ shape: [n + 9, K], dtype: "f32", data: new Float32Array((n + 9) * K).fill(0).map((_, i) => (i < n * K ? xs[i]! : 0)) });
      const W = b.upload({ shape: [N, K], dtype: "f32", data: ws });
      const bias = withBias ? b.upload({ shape: [N], dtype: "f32", data: bs }, out) : undefined;
      const O = b.empty([n + 9, N], out);
      const o = b.rows(O, n);
      b.linear(o, b.rows(X, n), W, bias);
      const got = b.read(o) as Float32Array;
      const err = relErr(got, ref);
      // bf16 output: one rounding of each element (2^-9 relative); f32 output: only fp32 summation order.
      expect(err).toBeLessThan(out === "bf16" ? 5e-3 : 1e-4);
      for (const t of [X, W, O, ...(bias ? [bias] : [])]) b.free(t);
    });
  }

  it("replays a captured graph with new metadata and matches eager execution bit for bit", () => {
    const K = 256, N = 384, cap = 16;
    const X = b.upload({ shape: [cap, K], dtype: "f32", data: bf16Values(cap * K, 5) });
    const W1 = b.upload({ shape: [N, K], dtype: "f32", data: bf16Values(N * K, 6, 0.05) });
    const W2 = b.upload({ shape: [N, N], dtype: "f32", data: bf16Values(N * N, 7, 0.05) });
    const bias = b.upload({ shape: [N], dtype: "f32", data: bf16Values(N, 8) });
    const H = b.empty([cap, N], "bf16");
    const O = b.empty([cap, N], "f32");
    // linear -> a kernel that reads the live token count from the step's metadata -> linear.
    const forward = (n: number, counts: bigint) => (): Tensor => {
      const h = b.rows(H, n) as CudaTensor;
      b.linear(h, b.rows(X, n), W1, bias);
      b.launcher.launch("smoke_scale_rows", [h.capRows, 1, 1], [128, 1, 1], 0,
        [{ ptr: h.ptr }, { ptr: counts }, { i32: h.capRows }, { i32: N }, { f32: -0.5 }]);
      const o = b.rows(O, n);
      b.linear(o, h, W2);
      return o;
    };
    const run = (n: number, graph: boolean): { out: Float32Array; hidden: Float32Array } => {
      b.prepare(decodeStep(n));
      const counts = b.deviceStep!.counts;
      const out = graph ? b.replay("decode:smoke", forward(n, counts)) : forward(n, counts)();
      expect(out.shape).toEqual([n, N]);
      return { out: b.read(out) as Float32Array, hidden: b.read(b.rows(H, 8)) as Float32Array };
    };
    const before = b.graphCount;
    const first = run(5, true); // eager warm-up, then capture (bucket 8)
    expect(b.graphCount).toBe(before + 1);
    const t0 = performance.now();
    const replayed = run(7, true); // same bucket: a replay
    const hostMs = performance.now() - t0;
    expect(b.graphCount).toBe(before + 1);
    const eager = run(7, false);
    expect(Array.from(replayed.out)).toEqual(Array.from(eager.out));
    expect(Array.from(first.out)).toEqual(Array.from(run(5, false).out));
    // The replayed kernel read the new live count (7): rows 0..6 scaled, padding row 7 not.
    const full = run(8, false);
    const row = (m: Float32Array, r: number) => Array.from(m.subarray(r * N, (r + 1) * N));
    expect(row(replayed.hidden, 6)).toEqual(row(full.hidden, 6));
    expect(row(replayed.hidden, 7)).toEqual(row(full.hidden, 7).map((v) => -2 * v + 0));
    console.log(`prepare + replay + read of a 3-node graph: ${hostMs.toFixed(3)} ms host wall time`);
    for (const t of [X, W1, W2, bias, H, O]) b.free(t);
    expect(b.graphCount).toBe(0); // freeing device memory drops graphs that may point at it
  });

  it("launches replayed graphs from the device (graphLaunch: device) with the same results as eager runs", async () => {
    const dv = await CudaBackend.create({ kernelFiles: ["smoke.cu"], kernelsDir: dir, cacheDir, graphLaunch: "device" });
    try {
      const K = 256, N = 384, cap = 16;
      const X = dv.upload({ shape: [cap, K], dtype: "f32", data: bf16Values(cap * K, 15) });
      const W = dv.upload({ shape: [N, K], dtype: "f32", data: bf16Values(N * K, 16, 0.05) });
      const H = dv.empty([cap, N], "bf16");
      const O = dv.empty([cap, N], "f32");
      // A cuBLASLt GEMM, then 100 kernels that read the live count (a ~100-node graph,
      // where the host's launch cost shows).
      const fwd = (n: number) => (): Tensor => {
        const h = dv.rows(H, n) as CudaTensor;
        dv.linear(h, dv.rows(X, n), W);
        for (let i = 0; i < 100; i++) {
          dv.launcher.launch("smoke_scale_rows", [h.capRows, 1, 1], [128, 1, 1], 0,
            [{ ptr: h.ptr }, { ptr: dv.deviceStep!.counts }, { i32: h.capRows }, { i32: N }, { f32: i % 2 === 0 ? -0.5 : -2 }]);
        }
        return h;
      };
      const run = (n: number, graph: boolean): Float32Array => {
        dv.prepare(decodeStep(n));
        const out = graph ? dv.replay("decode:device", fwd(n)) : fwd(n)();
        return dv.read(out) as Float32Array;
      };
      run(5, true); // eager + capture, instantiated for device launch
      expect(dv.graphCount).toBe(1);
      expect(dv.graphLaunch).toBe("device"); // not fallen back to host launch
      const launchUs: number[] = [];
      for (const n of [7, 6, 8, 5]) {
        dv.prepare(decodeStep(n));
        const t0 = performance.now();
        const out = dv.replay("decode:device", fwd(n));
        launchUs.push((performance.now() - t0) * 1000);
        const replayed = Array.from(dv.read(out) as Float32Array);
        expect(replayed).toEqual(Array.from(run(n, false)));
      }
      launchUs.sort((a, c) => a - c);
      console.log(`device-launched graph of ~102 nodes: host launch ${launchUs[1]!.toFixed(1)}-${launchUs[3]!.toFixed(1)} us`);
      for (const t of [X, W, H, O]) dv.free(t);
    } finally {
      dv.dispose();
    }
  });

  it("keeps prepare() cheap: one packed upload per step", () => {
    const steps = Array.from({ length: 64 }, (_, i) => decodeStep(1 + (i % 32)));
    b.prepare(decodeStep(32)); // sizes the metadata buffers before timing
    const t0 = performance.now();
    for (let r = 0; r < 10; r++) for (const s of steps) b.prepare(s);
    b.synchronize();
    const us = ((performance.now() - t0) * 1000) / (10 * steps.length);
    console.log(`prepare(): ${us.toFixed(1)} us per decode step (host, incl. the H2D enqueue)`);
    expect(us).toBeLessThan(100);
  });

  it("turns bad calls into CudaError and keeps working", () => {
    const y = b.upload({ shape: [4], dtype: "f32", data: new Float32Array(4) }, "f32");
    let err: unknown;
    try {
      b.launcher.launch("smoke_axpy", [1, 1, 1], [4096, 1, 1], 0, [{ ptr: ptr(y) }, { ptr: ptr(y) }, { f32: 1 }, { i32: 4 }]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CudaError);
    expect((err as CudaError).call).toBe("cuLaunchKernel");
    expect((err as CudaError).name).toMatch(/^CUDA_ERROR_/);
    expect((err as CudaError).code).toBeGreaterThan(0);

    let err2: unknown;
    try {
      cudaDriver().memcpyDtoH(new Uint8Array(16), 0x10n, 16);
    } catch (e) {
      err2 = e;
    }
    expect(err2).toBeInstanceOf(CudaError);
    expect((err2 as CudaError).call).toBe("cuMemcpyDtoH_v2");

    let err3: unknown;
    try {
      cudaDriver().memAlloc(2 ** 50);
    } catch (e) {
      err3 = e;
    }
    expect(err3).toBeInstanceOf(CudaError);
    expect((err3 as CudaError).name).toBe("CUDA_ERROR_OUT_OF_MEMORY");

    // The backend is still usable.
    expect(Array.from(b.read(y))).toEqual([0, 0, 0, 0]);
    b.free(y);
  });

  // Last: a kernel fault poisons the CUDA context for the rest of the process.
  it("reports a kernel fault as CudaError and then refuses further work", () => {
    b.launcher.launch("smoke_fault", [1, 1, 1], [32, 1, 1], 0, [{ ptr: 0n }]);
    let err: unknown;
    try {
      b.synchronize();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CudaError);
    expect((err as CudaError).name).toMatch(/ILLEGAL_ADDRESS|LAUNCH_FAILED/);
    expect(() => b.memoryInfo()).toThrow(/unusable/);
  });
});
