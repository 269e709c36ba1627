import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { kernelCacheDir, kernelCacheKey, kernelCachePath, readCacheEntry, writeFileAtomic, type KernelCacheInput } from "./kernel_cache.js";
import { nvrtcOptions } from "./nvrtc.js";

const base: KernelCacheInput = {
  file: "rmsnorm.cu",
  source: 'extern "C" __global__ void k() {}',
  headers: [["common.cuh", "#pragma once"], ["bf16.cuh", "// bf16 helpers"]],
  options: ["--gpu-architecture=sm_90", "-default-device", "-std=c++17"],
  nvrtcVersion: "13.0",
};

describe("kernel cache key", () => {
  it("is stable for the same inputs and ignores header order", () => {
    expect(kernelCacheKey(base)).toBe(kernelCacheKey({ ...base }));
    expect(kernelCacheKey({ ...base, headers: [...base.headers].reverse() })).toBe(kernelCacheKey(base));
    expect(kernelCacheKey(base)).toMatch(/^[0-9a-f]{64}$/);
  });

  it("changes with the source, any header, the options, the arch and the NVRTC version", () => {
    const k = kernelCacheKey(base);
    const variants: KernelCacheInput[] = [
      { ...base, source: base.source + " " },
      { ...base, headers: [["common.cuh", "#pragma once "], base.headers[1]!] },
      { ...base, headers: [base.headers[0]!] },
      { ...base, options: ["--gpu-architecture=sm_90a", ...base.options.slice(1)] },
      { ...base, options: [...base.options, "-lineinfo"] },
      { ...base, nvrtcVersion: "13.1" },
    ];
    const keys = variants.map(kernelCacheKey);
    for (const v of keys) expect(v).not.toBe(k);
    expect(new Set(keys).size).toBe(keys.length);
  });

  it("does not confuse inputs that concatenate to the same text", () => {
    const a = kernelCacheKey({ ...base, options: ["-DA", "B"] });
    const b = kernelCacheKey({ ...base, options: ["-DAB"] });
    expect(a).not.toBe(b);
  });

  it("names entries by file stem and key", () => {
    expect(kernelCachePath("/c", base)).toMatch(/^\/c\/rmsnorm-[0-9a-f]{40}\.cubin$/);
  });
});

describe("kernel cache folder and writes", () => {
  const dir = mkdtempSync(join(tmpdir(), "inlaid-kcache-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("lives under INLAID_CACHE_DIR, else XDG_CACHE_HOME, else ~/.cache", () => {
    expect(kernelCacheDir({ INLAID_CACHE_DIR: "/x" }, "/home/u")).toBe("/x/kernels");
    expect(kernelCacheDir({ XDG_CACHE_HOME: "/xdg" }, "/home/u")).toBe("/xdg/inlaid/kernels");
    expect(kernelCacheDir({}, "/home/u")).toBe("/home/u/.cache/inlaid/kernels");
  });

  it("writes atomically (no temp files left) and reads back; a missing entry reads as null", () => {
    const p = join(dir, "sub", "k.cubin");
    expect(readCacheEntry(p)).toBeNull();
    writeFileAtomic(p, new Uint8Array([1, 2, 3]));
    writeFileAtomic(p, new Uint8Array([4, 5, 6, 7]));
    expect(Array.from(readCacheEntry(p)!)).toEqual([4, 5, 6, 7]);
    expect(readdirSync(join(dir, "sub"))).toEqual(["k.cubin"]);
    expect(readFileSync(p).length).toBe(4);
  });
});

describe("NVRTC options", () => {
  it("target the device's real architecture with the default-device flag", () => {
    expect(nvrtcOptions("sm_90")).toEqual(["--gpu-architecture=sm_90", "-default-device", "-std=c++17", "-DINLAID_NVRTC=1"]);
    expect(nvrtcOptions("sm_90a", ["-lineinfo"])).toContain("-lineinfo");
    expect(() => nvrtcOptions("compute_90")).toThrow(/sm_90/);
  });
});
