// CPU checks of the device graph launch's setup (device_graph.ts): where the device
// runtime library is looked for. The launch itself is tested on the GPU
// (test/gpu/backend_smoke.test.ts).
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { findDeviceRuntime } from "./device_graph.js";

describe("findDeviceRuntime", () => {
  const dir = mkdtempSync(join(tmpdir(), "inlaid-devrt-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("takes INLAID_CUDADEVRT when the file exists", () => {
    const lib = join(dir, "libcudadevrt.a");
    writeFileSync(lib, "!<arch>\n");
    expect(findDeviceRuntime({ INLAID_CUDADEVRT: lib })).toBe(lib);
  });

  it("gives null for an INLAID_CUDADEVRT that does not exist (no silent fallback to another copy)", () => {
    expect(findDeviceRuntime({ INLAID_CUDADEVRT: join(dir, "missing.a") })).toBeNull();
  });

  it("finds the library in CUDA_HOME's lib64", () => {
    const home = join(dir, "cuda");
    const lib64 = join(home, "lib64");
    mkdirSync(lib64, { recursive: true });
    writeFileSync(join(lib64, "libcudadevrt.a"), "!<arch>\n");
    const saved = process.env.CUDA_HOME;
    process.env.CUDA_HOME = home;
    try {
      expect(findDeviceRuntime({})).toBe(join(lib64, "libcudadevrt.a"));
    } finally {
      if (saved === undefined) delete process.env.CUDA_HOME;
      else process.env.CUDA_HOME = saved;
    }
  });
});
