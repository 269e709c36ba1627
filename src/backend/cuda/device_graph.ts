// Device-side launch of captured graphs.
//
// cuGraphLaunch's host cost grows with the graph's nodes: a decode step's graph holds
// ~480 kernels, and launching it took 20-33 us of host time per step (bench/kernels.ts
// --only host), a large share of the step's host budget. A graph instantiated for device
// launch can instead be launched by a kernel: the host launches a one-node graph whose
// single thread calls cudaGraphLaunch on the step's graph, so the host pays for one
// node. The step graph runs as fire-and-forget work of that launcher (or as its tail
// launch), and the stream's order covers it either way (measured: device_graph's test).
//
// Needs the CUDA device runtime library (libcudadevrt.a, part of the toolkit) to link
// the launcher kernel; without it, or if a graph cannot be instantiated for device
// launch, the backend launches graphs from the host as before.

import { existsSync } from "node:fs";
import { join } from "node:path";
import koffi from "koffi";
import { CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH, type CudaDriver } from "./ffi/driver.js";
import { toolkitLibDirs } from "./ffi/library.js";
import { buildKernels } from "./ffi/nvrtc.js";

/** How the launcher kernel launches the step graph (cuda_device_runtime_api.h's stream values). */
export type DeviceLaunchMode = "fire-and-forget" | "tail";
const HOW: Record<DeviceLaunchMode, bigint> = { "fire-and-forget": 0x02n << 56n, tail: 0x01n << 56n };

/** libcudadevrt.a: INLAID_CUDADEVRT, else the toolkit's library folders; null when absent. */
export function findDeviceRuntime(env: NodeJS.ProcessEnv = process.env): string | null {
  if (env.INLAID_CUDADEVRT) return existsSync(env.INLAID_CUDADEVRT) ? env.INLAID_CUDADEVRT : null;
  for (const d of toolkitLibDirs()) {
    const p = join(d, "libcudadevrt.a");
    if (existsSync(p)) return p;
  }
  return null;
}

export class DeviceGraphLauncher {
  readonly mode: DeviceLaunchMode;
  readonly #d: CudaDriver;
  readonly #stream: bigint;
  readonly #mod: bigint;
  readonly #fn: bigint;
  // cuLaunchKernel's kernelParams: two 8-byte argument slots, then the table pointing at them.
  readonly #block: unknown;
  readonly #slots: BigUint64Array;
  readonly #table: bigint;

  private constructor(d: CudaDriver, stream: bigint, mod: bigint, fn: bigint, mode: DeviceLaunchMode) {
    this.#d = d;
    this.#stream = stream;
    this.#mod = mod;
    this.#fn = fn;
    this.mode = mode;
    this.#block = koffi.alloc("uint8_t", 32);
    const base = koffi.address(this.#block);
    const buf = koffi.view(this.#block, 32);
    this.#slots = new BigUint64Array(buf, 0, 2);
    const table = new BigUint64Array(buf, 16, 2);
    table[0] = base;
    table[1] = base + 8n;
    this.#table = base + 16n;
  }

  /**
   * Links the launcher kernel for `arch` (its relocatable CUBIN comes from the kernel
   * cache, compiled at first use like every kernel); throws saying what is missing.
   */
  static async create(d: CudaDriver, stream: bigint, arch: string, mode: DeviceLaunchMode, cacheDir?: string): Promise<DeviceGraphLauncher> {
    const devrt = findDeviceRuntime();
    if (!devrt) throw new Error("libcudadevrt.a (the CUDA device runtime) was not found; set INLAID_CUDADEVRT or CUDA_HOME");
    const file = "graph_launch.cu";
    const [cubin] = await buildKernels({ files: [file], arch, extraOptions: ["-rdc=true"], ...(cacheDir ? { cacheDir } : {}) });
    const image = d.linkWithLibrary(cubin!.image, file, devrt);
    const mod = d.moduleLoadData(image, file);
    const fn = d.moduleGetFunction(mod, "graph_launch");
    if (fn === null) {
      d.moduleUnload(mod);
      throw new Error(`${file}: no graph_launch kernel after linking`);
    }
    return new DeviceGraphLauncher(d, stream, mod, fn, mode);
  }

  /**
   * Instantiates `graph` for device launch and uploads it, then captures the one-node
   * host graph that launches it. Throws when the graph cannot be launched from the
   * device (the caller then instantiates it for the host).
   */
  instantiate(graph: bigint): { exec: bigint; launcher: bigint } {
    const d = this.#d;
    const exec = d.graphInstantiate(graph, CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH);
    try {
      d.graphUpload(exec, this.#stream);
      this.#slots[0] = exec;
      this.#slots[1] = HOW[this.mode];
      d.streamBeginCapture(this.#stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
      try {
        d.launchKernel(this.#fn, 1, 1, 1, 1, 1, 1, 0, this.#stream, this.#table, "graph_launch");
      } catch (e) {
        d.graphDestroy(d.streamEndCapture(this.#stream));
        throw e;
      }
      const lg = d.streamEndCapture(this.#stream);
      try {
        const launcher = d.graphInstantiate(lg);
        d.graphUpload(launcher, this.#stream);
        return { exec, launcher };
      } finally {
        d.graphDestroy(lg);
      }
    } catch (e) {
      d.graphExecDestroy(exec);
      throw e;
    }
  }

  dispose(): void {
    try {
      this.#d.moduleUnload(this.#mod);
    } catch {
      // context already gone
    }
    koffi.free(this.#block);
  }
}
