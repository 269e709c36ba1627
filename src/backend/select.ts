// Picks the backend for --device.

import type { Backend } from "./backend.js";
import { CpuBackend } from "./cpu/cpu_backend.js";

export const DEVICES = ["auto", "cpu", "cuda"] as const;
export type DeviceName = (typeof DEVICES)[number];

export async function createBackend(device: DeviceName): Promise<Backend> {
  switch (device) {
    case "auto":
    case "cpu":
      return new CpuBackend();
    case "cuda":
      throw new Error("the CUDA backend is not built yet; use --device cpu");
    default:
      return device satisfies never;
  }
}
