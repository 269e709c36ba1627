// Typed errors for everything that crosses the FFI boundary. Native calls return
// status codes; the bindings turn a failing status into one of these (never an
// abort), so a bad launch or an out-of-memory surfaces as a catchable error with
// the call that failed, the numeric status and the library's own name for it.

export type CudaLibrary = "cuda" | "nvrtc" | "cublasLt" | "cublas" | "cusolver";

export class CudaError extends Error {
  /** The C function that failed, e.g. "cuMemAlloc_v2". */
  readonly call: string;
  /** The numeric status it returned (CUresult, nvrtcResult, cublasStatus_t or cusolverStatus_t). */
  readonly code: number;
  /** The library's symbolic name for `code`, e.g. "CUDA_ERROR_OUT_OF_MEMORY". */
  override readonly name: string;
  readonly library: CudaLibrary;

  constructor(library: CudaLibrary, call: string, code: number, name: string, description: string, context?: string) {
    super(`${call} failed: ${name} (${code}): ${description}${context ? ` [${context}]` : ""}`);
    this.library = library;
    this.call = call;
    this.code = code;
    this.name = name;
  }
}

/** NVRTC rejected a kernel source; `log` is the compiler's own output. */
export class NvrtcCompileError extends CudaError {
  readonly file: string;
  readonly log: string;

  constructor(file: string, code: number, name: string, log: string) {
    super("nvrtc", "nvrtcCompileProgram", code, name, `${file} did not compile:\n${log.trim()}`);
    this.file = file;
    this.log = log;
  }
}

/** A CUDA library or symbol could not be found; says where it looked. */
export class CudaLoadError extends Error {
  override readonly name = "CudaLoadError";
  constructor(message: string, readonly tried: readonly string[] = []) {
    super(tried.length > 0 ? `${message} (tried: ${tried.join(", ")})` : message);
  }
}

/** Runs one teardown call, ignoring its error: a dispose frees what it can and goes on. */
export function quietly(f: () => void): void {
  try {
    f();
  } catch {
    // tearing down: keep going
  }
}
