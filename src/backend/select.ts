// Picks the backend for --device. The CUDA backend's module (and koffi with it) is
// imported only when CUDA is asked for or probed, so CPU-only runs never touch it;
// probing opens libcuda but never aborts: a missing driver just means "no CUDA".

import type { Backend } from "./backend.js";
import { CpuBackend } from "./cpu/cpu_backend.js";

export const DEVICES = ["auto", "cpu", "cuda"] as const;
export type DeviceName = (typeof DEVICES)[number];

async function cudaModule(): Promise<typeof import("./cuda/cuda_backend.js") | { error: string }> {
  try {
    return await import("./cuda/cuda_backend.js");
  } catch (e) {
    return { error: `the CUDA backend could not be loaded (${e instanceof Error ? e.message : String(e)})` };
  }
}

export async function createBackend(device: DeviceName): Promise<Backend> {
  switch (device) {
    case "cpu":
      return new CpuBackend();
    case "auto": {
      // CUDA when libcuda loads and a device exists, else the CPU reference backend.
      const m = await cudaModule();
      if ("error" in m || !m.CudaBackend.available()) return new CpuBackend();
      return m.CudaBackend.create();
    }
    case "cuda": {
      const m = await cudaModule();
      const reason = "error" in m ? m.error : m.CudaBackend.unavailableReason();
      if (reason !== null) throw new Error(`no CUDA device: ${reason}; use --device cpu`);
      return (m as Exclude<typeof m, { error: string }>).CudaBackend.create();
    }
    default:
      return device satisfies never;
  }
}
