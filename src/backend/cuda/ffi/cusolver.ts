// cuSOLVER (dense) over koffi: what the GPTQ solver needs to turn a damped Hessian
// into the factor it pushes errors with (quant/gpu_gptq_cuda.ts): a Cholesky
// factorization (potrf) that reports a non-positive-definite matrix through `info`
// instead of failing, and a triangular inverse (trtri) in place. Float64 only: on an
// H100 a 11008 x 11008 potrf + trtri in f64 takes milliseconds, and the CPU solver it
// must match is f64 (gptq.ts).
//
// cuSOLVER is column-major. Both routines here work on one triangle of a square
// matrix, so a symmetric row-major matrix can be passed as it is: its upper triangle
// is the column-major lower one. The caller owns all device memory (matrix, workspace,
// the device int `info`); calls are enqueued on the handle's stream.

import { CudaError } from "./errors.js";
import { bind, openLibrary, toolkitLibDirs, type KoffiFn } from "./library.js";

export type CuPtr = bigint;

// cublas_api.h / library_types.h values (stable ABI).
export const CUBLAS_FILL_MODE_LOWER = 0;
export const CUBLAS_FILL_MODE_UPPER = 1;
const CUBLAS_DIAG_NON_UNIT = 0;
const CUDA_R_64F = 1;
const CUSOLVER_STATUS_SUCCESS = 0;

const STATUS_NAMES: Record<number, string> = {
  1: "CUSOLVER_STATUS_NOT_INITIALIZED", 2: "CUSOLVER_STATUS_ALLOC_FAILED", 3: "CUSOLVER_STATUS_INVALID_VALUE",
  4: "CUSOLVER_STATUS_ARCH_MISMATCH", 5: "CUSOLVER_STATUS_MAPPING_ERROR", 6: "CUSOLVER_STATUS_EXECUTION_FAILED",
  7: "CUSOLVER_STATUS_INTERNAL_ERROR", 8: "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED", 9: "CUSOLVER_STATUS_NOT_SUPPORTED",
};

interface SolverFns {
  cusolverDnCreate: KoffiFn;
  cusolverDnDestroy: KoffiFn;
  cusolverDnSetStream: KoffiFn;
  cusolverGetVersion: KoffiFn;
  cusolverDnDpotrf_bufferSize: KoffiFn;
  cusolverDnDpotrf: KoffiFn;
  cusolverDnXtrtri_bufferSize: KoffiFn;
  cusolverDnXtrtri: KoffiFn;
}

export class CusolverDn {
  readonly path: string;
  /** cusolverGetVersion: major * 1000 + minor * 100 + patch. */
  readonly version: number;
  readonly #f: SolverFns;
  readonly #handle: bigint;
  #hostWork = new Uint8Array(0);
  // Reused output slots.
  readonly #out = new BigUint64Array(1);
  readonly #out2 = new BigUint64Array(1);
  readonly #i32 = new Int32Array(1);

  private constructor(path: string, f: SolverFns, stream: bigint) {
    this.path = path;
    this.#f = f;
    this.#check("cusolverGetVersion", f.cusolverGetVersion(this.#i32));
    this.version = this.#i32[0]!;
    this.#check("cusolverDnCreate", f.cusolverDnCreate(this.#out));
    this.#handle = this.#out[0]!;
    try {
      this.#check("cusolverDnSetStream", f.cusolverDnSetStream(this.#handle, stream));
    } catch (e) {
      f.cusolverDnDestroy(this.#handle);
      throw e;
    }
  }

  /** Opens libcusolver and creates a handle bound to `stream` (the CUDA context must be current). */
  static open(stream: bigint): CusolverDn {
    const { lib, path } = openLibrary(
      "libcusolver (cuSOLVER: install the CUDA toolkit or the nvidia-cusolver package, or set INLAID_LIBCUSOLVER)",
      ["libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"],
      toolkitLibDirs(),
      process.env.INLAID_LIBCUSOLVER,
    );
    const b = (what: string, ...protos: string[]): KoffiFn => bind(lib, what, ...protos);
    const f: SolverFns = {
      cusolverDnCreate: b("cusolverDnCreate", "int cusolverDnCreate(void *handle)"),
      cusolverDnDestroy: b("cusolverDnDestroy", "int cusolverDnDestroy(uint64_t handle)"),
      cusolverDnSetStream: b("cusolverDnSetStream", "int cusolverDnSetStream(uint64_t handle, uint64_t stream)"),
      cusolverGetVersion: b("cusolverGetVersion", "int cusolverGetVersion(void *version)"),
      cusolverDnDpotrf_bufferSize: b("cusolverDnDpotrf_bufferSize",
        "int cusolverDnDpotrf_bufferSize(uint64_t handle, int uplo, int n, uint64_t A, int lda, void *lwork)"),
      cusolverDnDpotrf: b("cusolverDnDpotrf",
        "int cusolverDnDpotrf(uint64_t handle, int uplo, int n, uint64_t A, int lda, uint64_t work, int lwork, uint64_t info)"),
      cusolverDnXtrtri_bufferSize: b("cusolverDnXtrtri_bufferSize (cuSOLVER 11.2 or newer)",
        "int cusolverDnXtrtri_bufferSize(uint64_t handle, int uplo, int diag, int64_t n, int dataTypeA, uint64_t A, int64_t lda, " +
          "void *deviceBytes, void *hostBytes)"),
      cusolverDnXtrtri: b("cusolverDnXtrtri (cuSOLVER 11.2 or newer)",
        "int cusolverDnXtrtri(uint64_t handle, int uplo, int diag, int64_t n, int dataTypeA, uint64_t A, int64_t lda, " +
          "uint64_t deviceWork, size_t deviceBytes, void *hostWork, size_t hostBytes, uint64_t info)"),
    };
    return new CusolverDn(path, f, stream);
  }

  /** The one place a cusolverStatus_t becomes an exception. */
  #check(call: string, rc: number, context?: string): void {
    if (rc === CUSOLVER_STATUS_SUCCESS) return;
    const name = STATUS_NAMES[rc] ?? `cusolverStatus ${rc}`;
    throw new CudaError("cusolver", call, rc, name, name, context);
  }

  /** Device bytes of workspace dpotrf needs for an n x n matrix. */
  dpotrfWorkspaceBytes(uplo: number, n: number, a: CuPtr): number {
    this.#check("cusolverDnDpotrf_bufferSize", this.#f.cusolverDnDpotrf_bufferSize(this.#handle, uplo, n, a, n, this.#i32), `n=${n}`);
    return this.#i32[0]! * 8;
  }

  /**
   * Cholesky in place of the column-major n x n f64 matrix `a` (ld n): with uplo LOWER,
   * L with A = L L^T in the lower triangle (the other triangle is left as it was).
   * *info (device int) becomes 0, or i > 0 when the leading i x i minor is not positive
   * definite (the factorization stops there).
   */
  dpotrf(uplo: number, n: number, a: CuPtr, work: CuPtr, workBytes: number, info: CuPtr): void {
    this.#check("cusolverDnDpotrf", this.#f.cusolverDnDpotrf(this.#handle, uplo, n, a, n, work, Math.floor(workBytes / 8), info), `n=${n}`);
  }

  /** Device and host bytes of workspace dtrtri needs for an n x n matrix. */
  dtrtriWorkspaceBytes(uplo: number, n: number, a: CuPtr): { device: number; host: number } {
    this.#check("cusolverDnXtrtri_bufferSize",
      this.#f.cusolverDnXtrtri_bufferSize(this.#handle, uplo, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_64F, a, n, this.#out, this.#out2), `n=${n}`);
    return { device: Number(this.#out[0]!), host: Number(this.#out2[0]!) };
  }

  /**
   * Inverse in place of the triangular (uplo) column-major n x n f64 matrix `a`
   * (non-unit diagonal); *info becomes i > 0 when a[i-1, i-1] is 0. The host workspace is
   * kept by this object.
   */
  dtrtri(uplo: number, n: number, a: CuPtr, work: CuPtr, workBytes: number, info: CuPtr): void {
    const { host } = this.dtrtriWorkspaceBytes(uplo, n, a);
    if (this.#hostWork.length < host) this.#hostWork = new Uint8Array(host);
    this.#check("cusolverDnXtrtri",
      this.#f.cusolverDnXtrtri(this.#handle, uplo, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_64F, a, n, work, workBytes, this.#hostWork, this.#hostWork.length, info),
      `n=${n}`);
  }

  dispose(): void {
    this.#f.cusolverDnDestroy(this.#handle);
  }
}
