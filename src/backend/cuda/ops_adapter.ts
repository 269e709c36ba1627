// Loads the kernel engineer's ops module (ops.ts: `KERNEL_FILES` and `CudaOps`, which
// implements DeviceOps) for the backend. The import is dynamic so that the driver layer
// builds, typechecks and runs without ops.ts, and so that a missing or broken ops
// module turns into ops that fail with the reason while the driver layer, cuBLASLt
// `linear`, memory and graphs keep working (the smoke test relies on that).
// Once ops.ts is committed, a static import would do (and typecheck the constructor).

import { unavailableOps, type DeviceOps } from "./device_ops.js";
import type { Launcher } from "./launch.js";

/** Specifier kept in a variable: TypeScript then does not resolve it at build time. */
const OPS_MODULE: string = "./ops.js";

const OPS_METHODS: readonly (keyof DeviceOps)[] = [
  "embedding", "rmsnorm", "addRmsnorm", "lora", "rope", "attention", "attentionScratchBytes", "siluMul", "gatherRows", "sample",
  "sampleScratchBytes",
];

/** What CudaOps learns about the device (sizes persistent grids). */
export interface OpsDeviceInfo {
  readonly smCount: number;
}

interface OpsModule {
  readonly KERNEL_FILES?: readonly string[];
  readonly CudaOps?: new (launcher: Launcher, device?: OpsDeviceInfo) => Partial<DeviceOps>;
}

export interface LoadedOpsModule {
  /** Kernel files to compile (relative to the kernels folder), empty when unavailable. */
  readonly kernelFiles: readonly string[];
  /** Makes the ops once the kernels are loaded into `launcher`. */
  readonly make: (launcher: Launcher, device: OpsDeviceInfo) => DeviceOps;
  /** Why the kernels are unavailable, or null. */
  readonly unavailable: string | null;
}

export async function loadOpsModule(): Promise<LoadedOpsModule> {
  let mod: OpsModule;
  try {
    mod = (await import(OPS_MODULE)) as OpsModule;
  } catch (e) {
    const reason = `the kernel module src/backend/cuda/ops.ts could not be loaded (${e instanceof Error ? e.message : String(e)})`;
    return { kernelFiles: [], make: () => unavailableOps(reason), unavailable: reason };
  }
  const Ops = mod.CudaOps;
  if (!Ops || !Array.isArray(mod.KERNEL_FILES)) {
    const reason = "ops.ts does not export CudaOps and KERNEL_FILES";
    return { kernelFiles: [], make: () => unavailableOps(reason), unavailable: reason };
  }
  return {
    kernelFiles: mod.KERNEL_FILES,
    unavailable: null,
    make: (launcher, device) => {
      const impl = new Ops(launcher, device);
      const missing = unavailableOps("not implemented by CudaOps in ops.ts");
      const ops = {} as Record<keyof DeviceOps, unknown>;
      for (const m of OPS_METHODS) {
        const f = impl[m];
        ops[m] = typeof f === "function" ? (f as (...a: unknown[]) => unknown).bind(impl) : missing[m];
      }
      // Optional ops stay absent when ops.ts lacks them (the backend has a fallback).
      if (typeof impl.fillRandom === "function") ops.fillRandom = impl.fillRandom.bind(impl);
      return ops as unknown as DeviceOps;
    },
  };
}
