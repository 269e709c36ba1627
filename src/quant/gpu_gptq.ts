// One interface for "GPTQ of one linear", so the model-level drivers (the 7B
// layer-streamed quantizer, incremental re-quantization) do not care where the solve
// runs. The CPU solver is gptqQuantize itself (float64, the reference); the CUDA solver
// gives the same result up to f32 rounding (see cudaGptqSolver for what differs and
// by how much).

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
 * 128-column block for the column loop, a GEMM for the lazy update. `backend` shares
 * its context and stream; without one a backend is opened for the solver alone (and
 * closed by dispose()).
 */
export async function cudaGptqSolver(backend?: CudaBackend): Promise<GptqSolver> {
  const { CudaGptqSolver } = await import("./gpu_gptq_cuda.js");
  return CudaGptqSolver.create(backend);
}
