// The driver side of the Launcher seam (launch.ts): resolves kernels by name in the
// loaded modules and launches them on the backend's stream.
//
// cuLaunchKernel takes `void **kernelParams`: an array whose i-th entry points at the
// i-th argument's value. Building that per launch in JS would allocate; instead one
// native block is allocated once:
//   [0, 8*MAX)        argument slots, 8 bytes each (a pointer, or a 4-byte i32/u32/f32)
//   [8*MAX, 16*MAX)   the pointer table: entry i = address of slot i, written once
// A launch writes its values into the slots through typed-array views over that
// block and passes the table's address. The driver copies the values during the call,
// so the block is reused by the next launch at once (and captured graphs keep their
// own copies of the values).
//
// Kernels named in `pdlKernels` go through cuLaunchKernelEx with programmatic stream
// serialization (sm_90+): they may start while the previous kernel on the stream is
// finishing, and wait for it inside (kernels/common.cuh pdl_wait says what keeps that
// safe). A second native block holds that launch's CUlaunchConfig and its one
// attribute, laid out as cuda.h declares them:
//   CUlaunchConfig (56 bytes): grid x/y/z, block x/y/z, sharedMemBytes (u32 at 0..24),
//     hStream (u64 at 32), attrs (pointer at 40), numAttrs (u32 at 48)
//   CUlaunchAttribute (72 bytes, at 56): id (u32 at 0), value (union at 8; here the int
//     programmaticStreamSerializationAllowed = 1)
//
// After a library's kernel (cuBLASLt: its launches carry no PDL attribute and never trigger
// early), a PDL kernel would start only once that kernel's last block exits, so whatever it
// does before its wait (a LoRA expand's slot lookup and B loads) adds to the step. A kernel
// named in `afterLibrary` (ops.ts EARLY_AFTER_LIBRARY; INLAID_GEMM_EARLY=0: none) captured
// right after one hangs off that kernel's launch-order port instead (ffi/driver.ts
// captureDependOnLaunchOrder): it may launch once every block of the GEMM has begun, does
// its pre-wait work alongside it, and its griddepcontrol.wait still waits for the GEMM to
// complete (noteUntriggered marks such a kernel; the fused low-bit GEMM, which never triggers
// early either, is marked only with INLAID_QGEMM_EARLY=1). It is launched without the PDL
// attribute: the edge alone makes it programmatic (with the attribute as well, the capture's
// own programmatic edge seems to win: on an H100 bench/kernels.ts o measured 5.79 / 5.48 us
// against 4.90 / 4.62 without it, at 4 / 1 outputs per thread, and 6.22 / 5.95 with the
// usual launch).

import koffi from "koffi";
import { CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, type CudaDriver } from "./ffi/driver.js";
import type { KernelImage } from "./ffi/nvrtc.js";
import type { Dim3, KernelArg, Launcher } from "./launch.js";

const MAX_ARGS = 64;
const CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;
const CONFIG_BYTES = 56;
const ATTR_BYTES = 72;
/** Default per-block dynamic shared memory; more needs cuFuncSetAttribute first. */
const DEFAULT_MAX_DYNAMIC_SMEM = 48 * 1024;

/** INLAID_GEMM_EARLY (header): on unless 0. */
export function gemmEarly(): boolean {
  return process.env.INLAID_GEMM_EARLY !== "0";
}

interface Kernel {
  readonly fn: bigint;
  /** Launched with programmatic stream serialization. */
  readonly pdl: boolean;
  /** Hung off a library kernel's launch-order port when captured right after one. */
  readonly early: boolean;
  /** Largest dynamic shared memory this function has been allowed so far. */
  smemLimit: number;
}

export class KernelLauncher implements Launcher {
  readonly #driver: CudaDriver;
  readonly #stream: bigint;
  readonly #modules: { file: string; mod: bigint }[] = [];
  readonly #kernels = new Map<string, Kernel>();
  readonly #block: unknown;
  readonly #table: bigint;
  readonly #slots64: BigUint64Array;
  readonly #slotsI32: Int32Array;
  readonly #slotsU32: Uint32Array;
  readonly #slotsF32: Float32Array;
  readonly #pdlKernels: ReadonlySet<string>;
  readonly #config: unknown;
  readonly #configAddr: bigint;
  readonly #configU32: Uint32Array;
  /** Launches issued (diagnostics: launches per step). */
  launches = 0;
  /** Launches captured on a library kernel's launch-order port (afterLibrary; diagnostics and tests). */
  launchOrderEdges = 0;
  readonly #afterLibrary: ReadonlySet<string>;
  #untriggeredLast = false;

  constructor(
    driver: CudaDriver,
    stream: bigint,
    images: readonly KernelImage[],
    readonly maxSharedOptin: number,
    /** Kernels to launch with programmatic dependent launch (empty: none). */
    pdlKernels: ReadonlySet<string> = new Set(),
    /** PDL kernels to hang off a library kernel's launch-order port (header). */
    afterLibrary: ReadonlySet<string> = new Set(),
  ) {
    this.#afterLibrary = afterLibrary;
    this.#driver = driver;
    this.#stream = stream;
    this.#pdlKernels = pdlKernels;
    try {
      for (const img of images) this.#modules.push({ file: img.file, mod: driver.moduleLoadData(img.image, img.file) });
    } catch (e) {
      this.dispose();
      throw e;
    }
    this.#block = koffi.alloc("uint8_t", 16 * MAX_ARGS);
    const base = koffi.address(this.#block);
    const buf = koffi.view(this.#block, 16 * MAX_ARGS);
    this.#slots64 = new BigUint64Array(buf, 0, MAX_ARGS);
    this.#slotsI32 = new Int32Array(buf, 0, 2 * MAX_ARGS);
    this.#slotsU32 = new Uint32Array(buf, 0, 2 * MAX_ARGS);
    this.#slotsF32 = new Float32Array(buf, 0, 2 * MAX_ARGS);
    const table = new BigUint64Array(buf, 8 * MAX_ARGS, MAX_ARGS);
    for (let i = 0; i < MAX_ARGS; i++) table[i] = base + BigInt(8 * i);
    this.#table = base + BigInt(8 * MAX_ARGS);

    this.#config = koffi.alloc("uint8_t", CONFIG_BYTES + ATTR_BYTES);
    this.#configAddr = koffi.address(this.#config);
    const cfg = koffi.view(this.#config, CONFIG_BYTES + ATTR_BYTES);
    new Uint8Array(cfg).fill(0);
    this.#configU32 = new Uint32Array(cfg, 0, CONFIG_BYTES / 4);
    const c64 = new BigUint64Array(cfg, 0, CONFIG_BYTES / 8);
    c64[4] = stream;
    c64[5] = this.#configAddr + BigInt(CONFIG_BYTES);
    this.#configU32[12] = 1;
    const attr = new Uint32Array(cfg, CONFIG_BYTES, ATTR_BYTES / 4);
    attr[0] = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr[2] = 1;
  }

  /** Kernel files loaded, in order. */
  get files(): string[] {
    return this.#modules.map((m) => m.file);
  }

  /**
   * The backend calls this, while capturing a graph, after enqueueing a kernel that never
   * triggers its dependents early: a library's (cuBLASLt), or with INLAID_QGEMM_EARLY the
   * fused low-bit GEMM (kernels/common.cuh pdl_wait<false>).
   */
  noteUntriggered(): void {
    this.#untriggeredLast = this.#afterLibrary.size > 0;
  }

  /** Whether some loaded module defines `name`. */
  has(name: string): boolean {
    return this.#find(name) !== null;
  }

  #find(name: string): Kernel | null {
    const k = this.#kernels.get(name);
    if (k) return k;
    for (const m of this.#modules) {
      const fn = this.#driver.moduleGetFunction(m.mod, name);
      if (fn !== null) {
        const pdl = this.#pdlKernels.has(name);
        const kernel = { fn, pdl, early: pdl && this.#afterLibrary.has(name), smemLimit: DEFAULT_MAX_DYNAMIC_SMEM };
        this.#kernels.set(name, kernel);
        return kernel;
      }
    }
    return null;
  }

  launch(name: string, grid: Dim3, block: Dim3, sharedBytes: number, args: readonly KernelArg[]): void {
    const k = this.#kernels.get(name) ?? this.#find(name);
    if (!k) {
      throw new Error(`CUDA kernel '${name}' is not defined in any loaded module (${this.files.join(", ") || "none loaded"}); is it extern "C"?`);
    }
    if (args.length > MAX_ARGS) throw new Error(`kernel '${name}': ${args.length} arguments > ${MAX_ARGS}`);
    if (sharedBytes > k.smemLimit) {
      if (sharedBytes > this.maxSharedOptin) {
        throw new Error(`kernel '${name}' asks for ${sharedBytes} bytes of shared memory; the device allows ${this.maxSharedOptin} per block`);
      }
      this.#driver.funcSetAttribute(k.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, sharedBytes, name);
      k.smemLimit = sharedBytes;
    }
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if ("ptr" in a) this.#slots64[i] = a.ptr;
      else if ("i32" in a) this.#slotsI32[2 * i] = a.i32;
      else if ("f32" in a) this.#slotsF32[2 * i] = a.f32;
      else this.#slotsU32[2 * i] = a.u32;
    }
    this.launches++;
    const afterUntriggered = this.#untriggeredLast;
    this.#untriggeredLast = false;
    const hung = k.early && afterUntriggered && this.#driver.captureDependOnLaunchOrder(this.#stream);
    if (hung) this.launchOrderEdges++;
    if (k.pdl && !hung) {
      const c = this.#configU32;
      c[0] = grid[0];
      c[1] = grid[1];
      c[2] = grid[2];
      c[3] = block[0];
      c[4] = block[1];
      c[5] = block[2];
      c[6] = sharedBytes;
      this.#driver.launchKernelEx(this.#configAddr, k.fn, this.#table, name);
    } else {
      this.#driver.launchKernel(k.fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], sharedBytes, this.#stream, this.#table, name);
    }
  }

  dispose(): void {
    for (const m of this.#modules.splice(0)) {
      try {
        this.#driver.moduleUnload(m.mod);
      } catch {
        // context already gone
      }
    }
    this.#kernels.clear();
    if (this.#block) koffi.free(this.#block);
    if (this.#config) koffi.free(this.#config);
  }
}
