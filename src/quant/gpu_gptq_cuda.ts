// The CUDA GPTQ solver (gpu_gptq.ts's cudaGptqSolver). Being built: until it lands,
// creating one says so instead of solving on the CPU behind the caller's back.

import type { CudaBackend } from "../backend/cuda/cuda_backend.js";
import type { GptqSolver } from "./gpu_gptq.js";

export class CudaGptqSolver {
  static async create(_backend?: CudaBackend): Promise<GptqSolver> {
    throw new Error("the CUDA GPTQ solver is not built yet; use cpuGptqSolver() meanwhile");
  }
}
