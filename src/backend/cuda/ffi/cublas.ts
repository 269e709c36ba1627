// cuBLAS (the classic API) over koffi, for the one GEMM the GPTQ solver needs in f64:
// the lazy block update W[later] -= U[block, later]^T E (quant/gpu_gptq_cuda.ts).
// cuBLASLt (cublaslt.ts) serves the model's bf16 linears; this handle is separate
// and bound to the solver's own stream. cuBLAS gives bitwise-identical results from
// run to run on the same GPU model, which incremental quantization relies on.

import { CudaError } from "./errors.js";
import { bind, openLibrary, toolkitLibDirs, type KoffiFn } from "./library.js";

export type CuPtr = bigint;

export const CUBLAS_OP_N = 0;
export const CUBLAS_OP_T = 1;
const CUBLAS_STATUS_SUCCESS = 0;

const STATUS_NAMES: Record<number, string> = {
  1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
  8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
  14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
};

interface BlasFns {
  cublasCreate: KoffiFn;
  cublasDestroy: KoffiFn;
  cublasSetStream: KoffiFn;
  cublasDgemm: KoffiFn;
}

export class Cublas {
  readonly path: string;
  readonly #f: BlasFns;
  readonly #handle: bigint;
  readonly #out = new BigUint64Array(1);
  readonly #alpha = new Float64Array(1);
  readonly #beta = new Float64Array(1);

  private constructor(path: string, f: BlasFns, stream: bigint) {
    this.path = path;
    this.#f = f;
    this.#check("cublasCreate_v2", f.cublasCreate(this.#out));
    this.#handle = this.#out[0]!;
    try {
      this.#check("cublasSetStream_v2", f.cublasSetStream(this.#handle, stream));
    } catch (e) {
      f.cublasDestroy(this.#handle);
      throw e;
    }
  }

  /** Opens libcublas and creates a handle bound to `stream` (the CUDA context must be current). */
  static open(stream: bigint): Cublas {
    const { lib, path } = openLibrary(
      "libcublas (cuBLAS: install the CUDA toolkit or the nvidia-cublas package, or set INLAID_LIBCUBLAS)",
      ["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
      toolkitLibDirs(),
      process.env.INLAID_LIBCUBLAS,
    );
    const b = (what: string, ...protos: string[]): KoffiFn => bind(lib, what, ...protos);
    const f: BlasFns = {
      cublasCreate: b("cublasCreate", "int cublasCreate_v2(void *handle)"),
      cublasDestroy: b("cublasDestroy", "int cublasDestroy_v2(uint64_t handle)"),
      cublasSetStream: b("cublasSetStream", "int cublasSetStream_v2(uint64_t handle, uint64_t stream)"),
      cublasDgemm: b("cublasDgemm",
        "int cublasDgemm_v2(uint64_t handle, int transa, int transb, int m, int n, int k, const double *alpha, " +
          "uint64_t A, int lda, uint64_t B, int ldb, const double *beta, uint64_t C, int ldc)"),
    };
    return new Cublas(path, f, stream);
  }

  #check(call: string, rc: number, context?: string): void {
    if (rc === CUBLAS_STATUS_SUCCESS) return;
    const name = STATUS_NAMES[rc] ?? `cublasStatus ${rc}`;
    throw new CudaError("cublas", call, rc, name, name, context);
  }

  /**
   * Column-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, f64 (cublasDgemm,
   * host-side alpha/beta). Enqueued on the handle's stream.
   */
  dgemm(transa: number, transb: number, m: number, n: number, k: number, alpha: number,
    a: CuPtr, lda: number, b: CuPtr, ldb: number, beta: number, c: CuPtr, ldc: number): void {
    if (m === 0 || n === 0) return;
    this.#alpha[0] = alpha;
    this.#beta[0] = beta;
    this.#check("cublasDgemm_v2",
      this.#f.cublasDgemm(this.#handle, transa, transb, m, n, k, this.#alpha, a, lda, b, ldb, this.#beta, c, ldc),
      `m=${m} n=${n} k=${k}`);
  }

  dispose(): void {
    this.#f.cublasDestroy(this.#handle);
  }
}
