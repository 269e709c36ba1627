// cuBLASLt GEMMs for `linear`: out[n, N] = x[n, K] @ w[N, K]^T (+ bias), bf16 operands,
// fp32 accumulation (CUBLAS_COMPUTE_32F) and fp32 alpha/beta, output bf16 (hidden
// activations) or f32 (the lm_head's logits, written directly: cuBLASLt supports
// bf16 A/B with an f32 C/D under COMPUTE_32F, which saves a conversion kernel and
// keeps the logits' last rounding out of bf16).
//
// Row-major to column-major. cuBLAS is column-major: a row-major [r, c] matrix with
// row stride c is, byte for byte, a column-major [c, r] matrix with ld = c, i.e. its
// transpose. So:
//   w  row-major [N, K]  = col-major W^T [K, N], ld K  -> A, transa = T: op(A) = W   [N, K]
//   x  row-major [n, K]  = col-major X^T [K, n], ld K  -> B, transb = N: op(B) = X^T [K, n]
//   out row-major [n, N] = col-major out^T [N, n], ld N -> D = op(A) op(B) = W X^T = (X W^T)^T
// which is the "TN" GEMM cuBLAS runs fastest on Hopper. The bias epilogue adds a
// vector of length rows(D) = N broadcast over the n columns: one bias per output
// feature, as wanted. Its elements have D's type (bf16 bias with a bf16 output).
//
// A plan (matmul descriptor, three layouts, an algorithm) is made once per (n, N, K,
// output dtype, bias?) and reused; the workspace is allocated once by the backend. Every
// call passes the same algorithm for the same shape, so a captured CUDA graph and an
// eager run execute identical kernels.
//
// Choosing the algorithm. The heuristic's first answer is tuned for large GEMMs; at
// decode shapes (a few rows, so the GEMM is a weight stream) it may pick a tile that
// leaves SMs idle. So for up to TUNE_MAX_ROWS rows the plan times every candidate the
// heuristic offers (L2 flushed before each run, so the weight comes from HBM as it does
// in a real step, where the layers' weights far exceed L2) and keeps the fastest. On an
// H100 the first answer was already within 2-10% of the best at Llama-2-7B's decode
// shapes (bench/kernels.ts with and without INLAID_GEMM_TUNE=0); tuning costs a few ms
// per shape at warm-up. Tuning needs an eager stream: a plan first made while a graph is
// being captured takes the heuristic's first answer.

import { CudaError } from "./errors.js";
import { bind, openLibrary, toolkitLibDirs, type KoffiFn } from "./library.js";

export type CuPtr = bigint;

// cublas_api.h / cublasLt.h / library_types.h values (stable ABI).
const CUBLAS_STATUS_SUCCESS = 0;
const CUBLAS_COMPUTE_32F = 68;
const CUDA_R_32F = 0;
const CUDA_R_16BF = 14;
const CUBLAS_OP_N = 0;
const CUBLAS_OP_T = 1;
const CUBLASLT_MATMUL_DESC_TRANSA = 3;
const CUBLASLT_MATMUL_DESC_TRANSB = 4;
const CUBLASLT_MATMUL_DESC_EPILOGUE = 7;
const CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8;
const CUBLASLT_EPILOGUE_DEFAULT = 1;
const CUBLASLT_EPILOGUE_BIAS = 4;
const CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;
/** sizeof(cublasLtMatmulHeuristicResult_t): algo (uint64_t[8]), size_t workspaceSize, int state, float wavesCount, int reserved[4]. */
const HEURISTIC_RESULT_BYTES = 96;
const ALGO_BYTES = 64;
/** Candidates asked of the heuristic when tuning; rows up to which plans are tuned. */
const TUNE_CANDIDATES = 16;
const TUNE_MAX_ROWS = 256;
const TUNE_REPS = 5;

/** What tuning needs from the backend that owns the stream. */
export interface GemmTuner {
  /** False while a graph is being captured (nothing may be timed or synchronized). */
  canTune(): boolean;
  /** Device milliseconds of the work `run` issues. */
  timeMs(run: () => void): number;
  /** Evicts the L2 cache (e.g. by writing a buffer larger than it). */
  flushL2(): void;
  /** Called once per tuned plan, for diagnostics. */
  onTuned?(what: string, chosenUs: number, firstUs: number, candidates: number): void;
}

export type GemmOutDtype = "bf16" | "f32";

/**
 * Times `count` candidates, each the best of `reps` runs with L2 flushed before every run
 * (as in a real step, where the layers' weights far exceed L2), and returns each one's
 * microseconds and the fastest's index. `run(i)` issues candidate i and returns false when
 * it cannot run (its timing stops there; one that never ran counts as Infinity).
 */
export function timeCandidates(tuner: GemmTuner, count: number, run: (i: number) => boolean, reps = TUNE_REPS): { us: number[]; choice: number } {
  const us: number[] = [];
  for (let i = 0; i < count; i++) {
    let best = Infinity;
    for (let r = 0; r < reps; r++) {
      tuner.flushL2();
      let ok = true;
      const ms = tuner.timeMs(() => {
        ok = run(i);
      });
      if (!ok) break;
      best = Math.min(best, ms * 1000);
    }
    us.push(best);
  }
  let choice = 0;
  for (let i = 1; i < count; i++) if (us[i]! < us[choice]!) choice = i;
  return { us, choice };
}

interface LtFns {
  cublasLtCreate: KoffiFn;
  cublasLtDestroy: KoffiFn;
  cublasLtGetVersion: KoffiFn;
  cublasLtGetStatusName: KoffiFn | null;
  cublasLtGetStatusString: KoffiFn | null;
  cublasLtMatmulDescCreate: KoffiFn;
  cublasLtMatmulDescDestroy: KoffiFn;
  cublasLtMatmulDescSetAttribute: KoffiFn;
  cublasLtMatrixLayoutCreate: KoffiFn;
  cublasLtMatrixLayoutDestroy: KoffiFn;
  cublasLtMatmulPreferenceCreate: KoffiFn;
  cublasLtMatmulPreferenceDestroy: KoffiFn;
  cublasLtMatmulPreferenceSetAttribute: KoffiFn;
  cublasLtMatmulAlgoGetHeuristic: KoffiFn;
  cublasLtMatmul: KoffiFn;
}

interface Plan {
  readonly desc: bigint;
  readonly a: bigint;
  readonly b: bigint;
  readonly d: bigint;
  /** The chosen cublasLtMatmulAlgo_t (first 64 bytes of the heuristic result). */
  readonly algo: Uint8Array;
  readonly hasBias: boolean;
  /** Which heuristic candidate was chosen (0 = the heuristic's first), and how many there were. */
  readonly choice: number;
  readonly candidates: number;
}

const STATUS_NAMES: Record<number, string> = {
  1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
  8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
  14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
};

function planKey(n: number, N: number, K: number, out: GemmOutDtype, bias: CuPtr, ldOut: number): string {
  return `${n},${N},${K},${out},${bias !== 0n ? 1 : 0}${ldOut !== N ? `,ld${ldOut}` : ""}`;
}

export class CublasLt {
  readonly path: string;
  readonly version: number;
  readonly #f: LtFns;
  readonly #handle: bigint;
  readonly #stream: bigint;
  readonly #workspace: CuPtr;
  readonly #workspaceBytes: number;
  readonly #pref: bigint;
  readonly #plans = new Map<string, Plan>();
  #tuner: GemmTuner | null = null;
  // Reused argument buffers.
  readonly #out = new BigUint64Array(1);
  readonly #i32 = new Int32Array(1);
  readonly #u32 = new Uint32Array(1);
  readonly #u64 = new BigUint64Array(1);
  readonly #alpha = new Float32Array([1]);
  readonly #beta = new Float32Array([0]);
  readonly #one = new Float32Array([1]);
  readonly #gramAlpha = new Float32Array([1]);

  private constructor(path: string, f: LtFns, stream: bigint, workspace: CuPtr, workspaceBytes: number) {
    this.path = path;
    this.#f = f;
    this.#stream = stream;
    this.#workspace = workspace;
    this.#workspaceBytes = workspaceBytes;
    this.version = Number(f.cublasLtGetVersion());
    this.#check("cublasLtCreate", f.cublasLtCreate(this.#out));
    this.#handle = this.#out[0]!;
    this.#check("cublasLtMatmulPreferenceCreate", f.cublasLtMatmulPreferenceCreate(this.#out));
    this.#pref = this.#out[0]!;
    this.#u64[0] = BigInt(workspaceBytes);
    this.#check("cublasLtMatmulPreferenceSetAttribute",
      f.cublasLtMatmulPreferenceSetAttribute(this.#pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, this.#u64, 8));
  }

  /**
   * Opens libcublasLt and creates a handle bound to `stream` (the CUDA context must be
   * current). `workspace` is device memory of `workspaceBytes`, owned by the caller.
   */
  static open(stream: bigint, workspace: CuPtr, workspaceBytes: number): CublasLt {
    const { lib, path } = openLibrary(
      "libcublasLt (cuBLASLt: install the CUDA toolkit or the nvidia-cublas package, or set INLAID_LIBCUBLASLT)",
      ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
      toolkitLibDirs(),
      process.env.INLAID_LIBCUBLASLT,
    );
    const b = (what: string, proto: string): KoffiFn => bind(lib, what, proto);
    const optional = (proto: string): KoffiFn | null => {
      try {
        return lib.func(proto);
      } catch {
        return null;
      }
    };
    const f: LtFns = {
      cublasLtCreate: b("cublasLtCreate", "int cublasLtCreate(void *handle)"),
      cublasLtDestroy: b("cublasLtDestroy", "int cublasLtDestroy(uint64_t handle)"),
      cublasLtGetVersion: b("cublasLtGetVersion", "size_t cublasLtGetVersion()"),
      cublasLtGetStatusName: optional("const char *cublasLtGetStatusName(int status)"),
      cublasLtGetStatusString: optional("const char *cublasLtGetStatusString(int status)"),
      cublasLtMatmulDescCreate: b("cublasLtMatmulDescCreate", "int cublasLtMatmulDescCreate(void *desc, int computeType, int scaleType)"),
      cublasLtMatmulDescDestroy: b("cublasLtMatmulDescDestroy", "int cublasLtMatmulDescDestroy(uint64_t desc)"),
      cublasLtMatmulDescSetAttribute: b("cublasLtMatmulDescSetAttribute",
        "int cublasLtMatmulDescSetAttribute(uint64_t desc, int attr, const void *buf, size_t size)"),
      cublasLtMatrixLayoutCreate: b("cublasLtMatrixLayoutCreate",
        "int cublasLtMatrixLayoutCreate(void *layout, int type, uint64_t rows, uint64_t cols, int64_t ld)"),
      cublasLtMatrixLayoutDestroy: b("cublasLtMatrixLayoutDestroy", "int cublasLtMatrixLayoutDestroy(uint64_t layout)"),
      cublasLtMatmulPreferenceCreate: b("cublasLtMatmulPreferenceCreate", "int cublasLtMatmulPreferenceCreate(void *pref)"),
      cublasLtMatmulPreferenceDestroy: b("cublasLtMatmulPreferenceDestroy", "int cublasLtMatmulPreferenceDestroy(uint64_t pref)"),
      cublasLtMatmulPreferenceSetAttribute: b("cublasLtMatmulPreferenceSetAttribute",
        "int cublasLtMatmulPreferenceSetAttribute(uint64_t pref, int attr, const void *buf, size_t size)"),
      cublasLtMatmulAlgoGetHeuristic: b("cublasLtMatmulAlgoGetHeuristic",
        "int cublasLtMatmulAlgoGetHeuristic(uint64_t handle, uint64_t desc, uint64_t a, uint64_t b, uint64_t c, uint64_t d, " +
          "uint64_t pref, int requested, void *results, void *returned)"),
      cublasLtMatmul: b("cublasLtMatmul",
        "int cublasLtMatmul(uint64_t handle, uint64_t desc, const void *alpha, uint64_t A, uint64_t Adesc, uint64_t B, uint64_t Bdesc, " +
          "const void *beta, uint64_t C, uint64_t Cdesc, uint64_t D, uint64_t Ddesc, const void *algo, uint64_t workspace, size_t workspaceBytes, uint64_t stream)"),
    };
    return new CublasLt(path, f, stream, workspace, workspaceBytes);
  }

  /** The one place a cublasStatus_t becomes an exception. */
  #check(call: string, rc: number, context?: string): void {
    if (rc === CUBLAS_STATUS_SUCCESS) return;
    let name = STATUS_NAMES[rc] ?? `cublasStatus ${rc}`;
    let desc = name;
    try {
      name = (this.#f.cublasLtGetStatusName?.(rc) as string | null) ?? name;
      desc = (this.#f.cublasLtGetStatusString?.(rc) as string | null) ?? desc;
    } catch {
      // keep the table's name
    }
    throw new CudaError("cublasLt", call, rc, name, desc, context);
  }

  #layout(type: number, rows: number, cols: number, ld: number): bigint {
    this.#check("cublasLtMatrixLayoutCreate", this.#f.cublasLtMatrixLayoutCreate(this.#out, type, rows, cols, ld), `${rows}x${cols} ld ${ld}`);
    return this.#out[0]!;
  }

  #setDesc(desc: bigint, attr: number, value: Int32Array | Uint32Array | BigUint64Array): void {
    this.#check("cublasLtMatmulDescSetAttribute", this.#f.cublasLtMatmulDescSetAttribute(desc, attr, value, value.byteLength), `attribute ${attr}`);
  }

  /** Enables per-shape algorithm tuning (see the header); plans made before keep their choice. */
  setTuner(tuner: GemmTuner | null): void {
    this.#tuner = tuner;
  }

  /** Whether the next matmul of this shape would tune its plan (it has none yet, and tuning is on). */
  wouldTune(n: number, N: number, K: number, out: GemmOutDtype, bias: CuPtr, ldOut = N): boolean {
    const t = this.#tuner;
    return !this.#plans.has(planKey(n, N, K, out, bias, ldOut)) && t !== null && n <= TUNE_MAX_ROWS && t.canTune();
  }

  #plan(n: number, N: number, K: number, out: GemmOutDtype, bias: CuPtr, ptrs: { out: CuPtr; x: CuPtr; w: CuPtr }, ldOut: number): Plan {
    const key = planKey(n, N, K, out, bias, ldOut);
    const cached = this.#plans.get(key);
    if (cached) return cached;
    const what = `linear n=${n} N=${N} K=${K} out=${out}${bias !== 0n ? " +bias" : ""}${ldOut !== N ? ` ldOut=${ldOut}` : ""}`;
    this.#check("cublasLtMatmulDescCreate", this.#f.cublasLtMatmulDescCreate(this.#out, CUBLAS_COMPUTE_32F, CUDA_R_32F), what);
    const desc = this.#out[0]!;
    this.#i32[0] = CUBLAS_OP_T;
    this.#setDesc(desc, CUBLASLT_MATMUL_DESC_TRANSA, this.#i32);
    this.#i32[0] = CUBLAS_OP_N;
    this.#setDesc(desc, CUBLASLT_MATMUL_DESC_TRANSB, this.#i32);
    this.#u32[0] = bias !== 0n ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    this.#setDesc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, this.#u32);
    if (bias !== 0n) {
      this.#u64[0] = bias;
      this.#setDesc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, this.#u64);
    }
    const a = this.#layout(CUDA_R_16BF, K, N, K);
    const b = this.#layout(CUDA_R_16BF, K, n, K);
    const d = this.#layout(out === "f32" ? CUDA_R_32F : CUDA_R_16BF, N, n, ldOut);
    const tuner = this.#tuner;
    const tune = tuner !== null && n <= TUNE_MAX_ROWS && tuner.canTune() && ptrs.out !== 0n;
    const want = tune ? TUNE_CANDIDATES : 1;
    const results = new Uint8Array(HEURISTIC_RESULT_BYTES * want);
    const count = new Int32Array(1);
    this.#check("cublasLtMatmulAlgoGetHeuristic",
      this.#f.cublasLtMatmulAlgoGetHeuristic(this.#handle, desc, a, b, d, d, this.#pref, want, results, count), what);
    const found = count[0]!;
    if (found < 1) {
      throw new CudaError("cublasLt", "cublasLtMatmulAlgoGetHeuristic", 15, "CUBLAS_STATUS_NOT_SUPPORTED",
        `no cuBLASLt algorithm for ${what} within a ${this.#workspaceBytes}-byte workspace`);
    }
    const algoAt = (i: number): Uint8Array => results.slice(i * HEURISTIC_RESULT_BYTES, i * HEURISTIC_RESULT_BYTES + ALGO_BYTES);
    let choice = 0;
    if (tune && found > 1) {
      // A candidate the library cannot run here fails its run and is never chosen.
      const t = timeCandidates(tuner, found, (i) => this.#f.cublasLtMatmul(this.#handle, desc, this.#alpha, ptrs.w, a, ptrs.x, b,
        this.#beta, ptrs.out, d, ptrs.out, d, algoAt(i), this.#workspace, this.#workspaceBytes, this.#stream) === CUBLAS_STATUS_SUCCESS);
      choice = t.choice;
      tuner.onTuned?.(what, t.us[choice]!, t.us[0]!, found);
    }
    const plan: Plan = { desc, a, b, d, algo: algoAt(choice), hasBias: bias !== 0n, choice, candidates: found };
    this.#plans.set(key, plan);
    return plan;
  }

  /**
   * out[n, N] = x[n, K] @ w[N, K]^T (+ bias[N]); x and w bf16, out bf16 or f32, bias
   * of out's dtype (0n for none). Enqueued on the handle's stream; graph-capturable.
   * ldOut: out's row stride in elements (default N; larger writes N columns of a wider matrix).
   * acc: out += ... instead (beta 1), onto a LoRA term written first.
   */
  matmul(out: CuPtr, outDtype: GemmOutDtype, x: CuPtr, w: CuPtr, n: number, N: number, K: number, bias: CuPtr = 0n, ldOut = N,
    acc: { tuneOut: CuPtr } | null = null): void {
    if (n === 0) return;
    // Tuning runs candidates with beta 0: for an accumulating call they write into
    // `tuneOut` (n x ldOut of out's dtype), or tuning is skipped, so out's old values survive.
    const tuneTo = acc ? acc.tuneOut : out;
    const p = this.#plan(n, N, K, outDtype, bias, { out: tuneTo, x, w }, ldOut);
    if (p.hasBias) {
      // The descriptor is shared by every layer of this shape; the bias differs per layer.
      this.#u64[0] = bias;
      this.#setDesc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, this.#u64);
    }
    const beta = acc ? this.#one : this.#beta;
    const rc = this.#f.cublasLtMatmul(this.#handle, p.desc, this.#alpha, w, p.a, x, p.b, beta, out, p.d, out, p.d,
      p.algo, this.#workspace, this.#workspaceBytes, this.#stream) as number;
    if (rc !== CUBLAS_STATUS_SUCCESS) this.#check("cublasLtMatmul", rc, `n=${n} N=${N} K=${K} out=${outDtype}${acc ? " accumulate" : ""}`);
    this.onEnqueue?.();
  }

  /**
   * out[K, K] (f32) = alpha x^T x (+ out when `accumulate`), x [n, K] row-major bf16: the Gram
   * matrix of n activation rows, for calibration Hessians (quant/stream_capture.ts).
   * In cuBLAS terms x is col-major X^T [K, n] (ld K), so D = A op(B) with A = X^T (N) and
   * B = X^T transposed (T): D = X^T X, symmetric, so its layout needs no transpose. beta 1
   * adds into out, which is how chunks of calibration tokens sum without a scratch copy.
   */
  gram(out: CuPtr, x: CuPtr, n: number, K: number, accumulate: boolean, alpha = 1): void {
    if (n === 0) {
      if (!accumulate) throw new Error("gram of 0 rows without accumulate would leave out unwritten; zero it instead");
      return;
    }
    const key = `gram,${n},${K}`;
    let p = this.#plans.get(key);
    if (!p) {
      const what = `gram n=${n} K=${K}`;
      this.#check("cublasLtMatmulDescCreate", this.#f.cublasLtMatmulDescCreate(this.#out, CUBLAS_COMPUTE_32F, CUDA_R_32F), what);
      const desc = this.#out[0]!;
      this.#i32[0] = CUBLAS_OP_N;
      this.#setDesc(desc, CUBLASLT_MATMUL_DESC_TRANSA, this.#i32);
      this.#i32[0] = CUBLAS_OP_T;
      this.#setDesc(desc, CUBLASLT_MATMUL_DESC_TRANSB, this.#i32);
      const a = this.#layout(CUDA_R_16BF, K, n, K);
      const b = this.#layout(CUDA_R_16BF, K, n, K);
      const d = this.#layout(CUDA_R_32F, K, K, K);
      const results = new Uint8Array(HEURISTIC_RESULT_BYTES);
      const count = new Int32Array(1);
      this.#check("cublasLtMatmulAlgoGetHeuristic",
        this.#f.cublasLtMatmulAlgoGetHeuristic(this.#handle, desc, a, b, d, d, this.#pref, 1, results, count), what);
      if (count[0]! < 1) {
        throw new CudaError("cublasLt", "cublasLtMatmulAlgoGetHeuristic", 15, "CUBLAS_STATUS_NOT_SUPPORTED",
          `no cuBLASLt algorithm for ${what} within a ${this.#workspaceBytes}-byte workspace`);
      }
      p = { desc, a, b, d, algo: results.slice(0, ALGO_BYTES), hasBias: false, choice: 0, candidates: count[0]! };
      this.#plans.set(key, p);
    }
    // Host pointer mode: cuBLASLt reads alpha and beta when called, so one buffer serves every call.
    this.#gramAlpha[0] = alpha;
    const rc = this.#f.cublasLtMatmul(this.#handle, p.desc, this.#gramAlpha, x, p.a, x, p.b, accumulate ? this.#one : this.#beta, out, p.d, out, p.d,
      p.algo, this.#workspace, this.#workspaceBytes, this.#stream) as number;
    if (rc !== CUBLAS_STATUS_SUCCESS) this.#check("cublasLtMatmul", rc, `gram n=${n} K=${K}`);
    this.onEnqueue?.();
  }

  /** Called after each matmul is enqueued (the backend tells its launcher: launcher.ts noteUntriggered). */
  onEnqueue: (() => void) | null = null;

  /** Number of cached plans (for tests and diagnostics). */
  get planCount(): number {
    return this.#plans.size;
  }

  dispose(): void {
    for (const p of this.#plans.values()) {
      this.#f.cublasLtMatrixLayoutDestroy(p.a);
      this.#f.cublasLtMatrixLayoutDestroy(p.b);
      this.#f.cublasLtMatrixLayoutDestroy(p.d);
      this.#f.cublasLtMatmulDescDestroy(p.desc);
    }
    this.#plans.clear();
    this.#f.cublasLtMatmulPreferenceDestroy(this.#pref);
    this.#f.cublasLtDestroy(this.#handle);
  }
}
