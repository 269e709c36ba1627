// Kernels are compiled at first use with NVRTC, for the device's own architecture,
// and cached on disk as CUBIN.
//
// Why NVRTC at first use rather than an nvcc fatbin built at install time:
// - Installing inlaid needs no CUDA toolkit (no nvcc, no headers, no host compiler):
//   npm install works the same on CPU-only machines, and on a GPU machine only the
//   driver and the NVRTC runtime library (libnvrtc.so.13, shipped with the toolkit
//   or as the pip/conda package nvidia-cuda-nvrtc) are needed.
// - The code is built for exactly the GPU it runs on (sm_90 on an H100; sm_90a can
//   be asked for), instead of a fatbin that must guess a list of architectures or
//   fall back to PTX JIT with its own slow first start.
// - The cost is paid once: a compiled kernel file takes ~90 ms; the CUBIN is cached
//   under a key that covers source, headers, options, arch and NVRTC version, so
//   later starts only read files, and any change to any input recompiles.

import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, isAbsolute, join } from "node:path";
import { fileURLToPath } from "node:url";
import koffi from "koffi";
import { CudaError, CudaLoadError, NvrtcCompileError } from "./errors.js";
import { kernelCacheDir, kernelCachePath, readCacheEntry, writeFileAtomic } from "./kernel_cache.js";
import { bind, openLibrary, toolkitLibDirs, type KoffiFn } from "./library.js";

const NVRTC_SUCCESS = 0;
const NVRTC_ERROR_COMPILATION = 6;

interface NvrtcFns {
  nvrtcGetErrorString: KoffiFn;
  nvrtcVersion: KoffiFn;
  nvrtcCreateProgram: KoffiFn;
  nvrtcDestroyProgram: KoffiFn;
  nvrtcCompileProgram: KoffiFn;
  nvrtcGetProgramLogSize: KoffiFn;
  nvrtcGetProgramLog: KoffiFn;
  nvrtcGetCUBINSize: KoffiFn;
  nvrtcGetCUBIN: KoffiFn;
}

export class Nvrtc {
  readonly path: string;
  readonly version: string;
  readonly #f: NvrtcFns;

  private constructor(path: string, f: NvrtcFns) {
    this.path = path;
    this.#f = f;
    const major = new Int32Array(1), minor = new Int32Array(1);
    this.#check("nvrtcVersion", f.nvrtcVersion(major, minor));
    this.version = `${major[0]}.${minor[0]}`;
  }

  /** Opens libnvrtc (INLAID_LIBNVRTC, the loader path, then CUDA_HOME and the usual toolkit folders). */
  static open(): Nvrtc {
    const { lib, path } = openLibrary(
      "libnvrtc (NVRTC, the CUDA runtime compiler: install the CUDA toolkit or the nvidia-cuda-nvrtc package, or set INLAID_LIBNVRTC)",
      ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
      toolkitLibDirs(),
      process.env.INLAID_LIBNVRTC,
    );
    preloadBuiltins(path);
    const b = (what: string, proto: string): KoffiFn => bind(lib, what, proto);
    return new Nvrtc(path, {
      nvrtcGetErrorString: b("nvrtcGetErrorString", "const char *nvrtcGetErrorString(int result)"),
      nvrtcVersion: b("nvrtcVersion", "int nvrtcVersion(void *major, void *minor)"),
      nvrtcCreateProgram: b("nvrtcCreateProgram",
        "int nvrtcCreateProgram(void *prog, const char *src, const char *name, int numHeaders, const char **headers, const char **includeNames)"),
      nvrtcDestroyProgram: b("nvrtcDestroyProgram", "int nvrtcDestroyProgram(void *prog)"),
      nvrtcCompileProgram: b("nvrtcCompileProgram", "int nvrtcCompileProgram(uint64_t prog, int numOptions, const char **options)"),
      nvrtcGetProgramLogSize: b("nvrtcGetProgramLogSize", "int nvrtcGetProgramLogSize(uint64_t prog, void *size)"),
      nvrtcGetProgramLog: b("nvrtcGetProgramLog", "int nvrtcGetProgramLog(uint64_t prog, void *log)"),
      nvrtcGetCUBINSize: b("nvrtcGetCUBINSize", "int nvrtcGetCUBINSize(uint64_t prog, void *size)"),
      nvrtcGetCUBIN: b("nvrtcGetCUBIN", "int nvrtcGetCUBIN(uint64_t prog, void *cubin)"),
    });
  }

  #errorName(rc: number): string {
    try {
      return (this.#f.nvrtcGetErrorString(rc) as string | null) ?? `nvrtcResult ${rc}`;
    } catch {
      return `nvrtcResult ${rc}`;
    }
  }

  /** The one place an nvrtcResult becomes an exception. */
  #check(call: string, rc: number, context?: string): void {
    if (rc !== NVRTC_SUCCESS) {
      const name = this.#errorName(rc);
      throw new CudaError("nvrtc", call, rc, name, name, context);
    }
  }

  /**
   * Compiles one translation unit to CUBIN. The compile itself runs on koffi's worker
   * thread (it takes tens of milliseconds per file), so several files compile in
   * parallel and the event loop stays free. A failed compile throws NvrtcCompileError
   * carrying NVRTC's log.
   */
  async compile(file: string, source: string, headers: readonly (readonly [string, string])[], options: readonly string[]): Promise<Uint8Array> {
    const progOut = new BigUint64Array(1);
    this.#check("nvrtcCreateProgram", this.#f.nvrtcCreateProgram(
      progOut, source, file, headers.length,
      headers.length > 0 ? headers.map((h) => h[1]) : null,
      headers.length > 0 ? headers.map((h) => h[0]) : null,
    ), file);
    const prog = progOut[0]!;
    try {
      const opts = [...options];
      const rc = await new Promise<number>((resolve, reject) => {
        this.#f.nvrtcCompileProgram.async(prog, opts.length, opts, (err: unknown, res: number) => {
          if (err) reject(err instanceof Error ? err : new Error(String(err)));
          else resolve(res);
        });
      });
      const log = this.#log(prog);
      if (rc === NVRTC_ERROR_COMPILATION) throw new NvrtcCompileError(file, rc, this.#errorName(rc), log);
      this.#check("nvrtcCompileProgram", rc, `${file}${log.trim() ? `:\n${log.trim()}` : ""}`);
      const size = new BigUint64Array(1);
      this.#check("nvrtcGetCUBINSize", this.#f.nvrtcGetCUBINSize(prog, size), file);
      const cubin = new Uint8Array(Number(size[0]!));
      if (cubin.length === 0) {
        throw new CudaError("nvrtc", "nvrtcGetCUBINSize", 0, "NO_CUBIN", `${file}: NVRTC produced no CUBIN; is --gpu-architecture a real architecture (sm_XX, not compute_XX)?`);
      }
      this.#check("nvrtcGetCUBIN", this.#f.nvrtcGetCUBIN(prog, cubin), file);
      return cubin;
    } finally {
      this.#f.nvrtcDestroyProgram(progOut);
    }
  }

  #log(prog: bigint): string {
    const size = new BigUint64Array(1);
    if (this.#f.nvrtcGetProgramLogSize(prog, size) !== NVRTC_SUCCESS) return "";
    const n = Number(size[0]!);
    if (n <= 1) return "";
    const buf = new Uint8Array(n);
    if (this.#f.nvrtcGetProgramLog(prog, buf) !== NVRTC_SUCCESS) return "";
    return Buffer.from(buf.subarray(0, n - 1)).toString("utf8");
  }
}

/**
 * NVRTC dlopens libnvrtc-builtins.so.<version> at its first compile by soname; when
 * libnvrtc was found in a folder that is not on the loader path, that lookup fails
 * ("failed to open libnvrtc-builtins"). Loading the builtins from the same folder
 * first makes the later dlopen find the already-loaded library.
 */
function preloadBuiltins(nvrtcPath: string): void {
  if (!isAbsolute(nvrtcPath)) return;
  const dir = dirname(nvrtcPath);
  try {
    for (const f of readdirSync(dir).filter((n) => /^libnvrtc-builtins\.so\.\d/.test(n)).sort().reverse()) {
      try {
        koffi.load(join(dir, f));
        return;
      } catch {
        // try the next one
      }
    }
  } catch {
    // unreadable folder: let NVRTC search on its own
  }
}

// ------------------------------------------------------------------ kernel sources and the cache

/** The folder holding the .cu files: INLAID_KERNELS_DIR, beside this module (src), or the source tree (dist). */
export function kernelsDir(): string {
  const candidates = [
    process.env.INLAID_KERNELS_DIR,
    fileURLToPath(new URL("../kernels/", import.meta.url)),
    // Built output (dist/backend/cuda/ffi) does not copy .cu files; read them from src.
    fileURLToPath(new URL("../../../../src/backend/cuda/kernels/", import.meta.url)),
  ].filter((d): d is string => !!d);
  for (const d of candidates) {
    if (existsSync(d)) return d;
  }
  throw new CudaLoadError("the CUDA kernel sources (.cu files) were not found; set INLAID_KERNELS_DIR", candidates);
}

/** Include paths for toolkits whose NVRTC lacks built-in cuda_bf16.h (tried only after a missing-header failure). */
function toolkitIncludeDirs(): string[] {
  const dirs: string[] = [];
  for (const v of ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]) {
    const root = process.env[v];
    if (root) dirs.push(join(root, "include"), join(root, "targets", "x86_64-linux", "include"));
  }
  dirs.push("/usr/local/cuda/include", "/usr/local/cuda/targets/x86_64-linux/include");
  return [...new Set(dirs)].filter((d) => existsSync(join(d, "cuda_bf16.h")));
}

export interface KernelImage {
  readonly file: string;
  readonly image: Uint8Array;
  /** True when read from the on-disk cache (no compile). */
  readonly cached: boolean;
  /** Wall time to produce the image (read or compile). */
  readonly ms: number;
}

export interface BuildKernelsOptions {
  /** File names relative to `dir` (ops.ts's KERNEL_FILES), or absolute paths. */
  readonly files: readonly string[];
  /** e.g. "sm_90" or "sm_90a". */
  readonly arch: string;
  readonly dir?: string;
  readonly cacheDir?: string;
  /** Options beyond the defaults (defines, -lineinfo, ...). */
  readonly extraOptions?: readonly string[];
}

/** The options every kernel is compiled with. */
export function nvrtcOptions(arch: string, extra: readonly string[] = []): string[] {
  if (!/^sm_\d+[a-z]?$/.test(arch)) throw new Error(`kernel arch must look like sm_90 or sm_90a (got ${arch})`);
  return [`--gpu-architecture=${arch}`, "-default-device", "-std=c++17", "-DINLAID_NVRTC=1", ...extra];
}

/**
 * Produces a CUBIN per kernel file: from the cache when the key matches, else by
 * compiling (all misses in parallel) and writing the cache atomically. Headers
 * (*.cuh, *.h) in the kernels folder are handed to NVRTC in memory and are part of
 * every key, so editing a shared header recompiles its users.
 */
export async function buildKernels(opts: BuildKernelsOptions): Promise<KernelImage[]> {
  const dir = opts.dir ?? kernelsDir();
  const cacheDir = opts.cacheDir ?? kernelCacheDir();
  const headers: [string, string][] = readdirSync(dir)
    .filter((n) => /\.(cuh|h|hpp)$/.test(n))
    .sort()
    .map((n) => [n, readFileSync(join(dir, n), "utf8")]);
  const options = nvrtcOptions(opts.arch, opts.extraOptions);
  let nvrtc: Nvrtc | null = null;
  const compiler = (): Nvrtc => (nvrtc ??= Nvrtc.open());
  const version = compiler().version;
  let cacheWritable = true;

  return Promise.all(opts.files.map(async (f): Promise<KernelImage> => {
    const t0 = performance.now();
    const path = isAbsolute(f) ? f : join(dir, f);
    const source = readFileSync(path, "utf8");
    const input = { file: f, source, headers, options, nvrtcVersion: version };
    const entry = kernelCachePath(cacheDir, input);
    const hit = readCacheEntry(entry);
    if (hit) return { file: f, image: hit, cached: true, ms: performance.now() - t0 };

    let image: Uint8Array;
    try {
      image = await compiler().compile(f, source, headers, options);
    } catch (e) {
      // Older NVRTC releases lack built-in CUDA headers: retry with the toolkit's include folder.
      const includes = toolkitIncludeDirs();
      const missingHeader = e instanceof NvrtcCompileError && /cannot open source file|could not open|file not found/i.test(e.log);
      if (!missingHeader || includes.length === 0) throw e;
      image = await compiler().compile(f, source, headers, [...options, ...includes.map((d) => `-I${d}`)]);
    }
    if (cacheWritable) {
      try {
        writeFileAtomic(entry, image);
      } catch (e) {
        cacheWritable = false;
        process.emitWarning(`inlaid: cannot write the kernel cache at ${cacheDir} (${e instanceof Error ? e.message : e}); kernels will be recompiled next start`);
      }
    }
    return { file: f, image, cached: false, ms: performance.now() - t0 };
  }));
}
