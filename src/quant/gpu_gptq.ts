// One interface for "GPTQ of one linear", so the model-level drivers (the 7B
// layer-streamed quantizer, incremental re-quantization) do not care where the solve
// runs. The CPU solver is gptqQuantize itself (float64, the reference); the CUDA solver
// (gpu_gptq_cuda.ts) is float64 too and repeats its elementwise steps exactly; only the
// summation order of the Cholesky, the inverse and the lazy update differ, so its codes
// match the CPU's (none differed in the GPU test's 9.5M) and losses agree to ~1e-14.
// Both read h as gptq.ts does (its diagonal and upper triangle decide the result).

import type { CudaBackend } from "../backend/cuda/cuda_backend.js";
import { gptqQuantize, type GptqOptions, type GptqResult } from "./gptq.js";
import type { QuantSpec } from "./types.js";

export interface GptqSolver {
  /** GPTQ of one linear: w [N, K] row-major f32 (host), h [K, K] f32 (host, symmetric), same semantics and result as gptqQuantize in src/quant/gptq.ts. */
  solve(w: Float32Array, N: number, K: number, h: Float32Array, spec: QuantSpec, opts?: GptqOptions): GptqResult;
  dispose(): void;
}

/** The float64 reference solver (gptqQuantize); holds nothing, dispose() is a no-op. */
export function cpuGptqSolver(): GptqSolver {
  return {
    solve: (w, N, K, h, spec, opts) => gptqQuantize(w, N, K, h, spec, opts),
    dispose() {},
  };
}

/**
 * The GPTQ solver on the GPU: cuSOLVER for the damped inverse factor, one kernel per
 * 128-column block for the column loop, a DGEMM for the lazy update. It runs on
 * `backend`'s device and context (default: device INLAID_CUDA_DEVICE or 0) with its own
 * stream, kernels and library handles, and keeps ~2 GB of device buffers at Llama-2-7B
 * shapes until dispose(). Solves one linear in 50-260 ms on an H100 (gpu_gptq_cuda.ts).
 */
export async function cudaGptqSolver(backend?: CudaBackend): Promise<GptqSolver> {
  const { CudaGptqSolver } = await import("./gpu_gptq_cuda.js");
  return CudaGptqSolver.create(backend);
}
