// Device timing shared by the kernel microbenchmarks (bench/kernels.ts, bench/quant_gemm.ts):
// per-call device time from CUDA-graph replays, and how many copies of an operand a
// benchmark cycles through so that each call reads it from HBM, as a real step does.

import type { Tensor } from "../src/backend/backend.js";
import type { CudaBackend } from "../src/backend/cuda/cuda_backend.js";

/** Times `reps` back-to-back calls of `body(i)` captured in one graph, replayed `iters` times. */
export type TimeCall = (key: string, body: (i: number) => void, out: Tensor) => number;

/** Device microseconds per call of `body(i)`, i = 0..reps-1 (no host launch cost included). */
export function graphTimer(gpu: CudaBackend, reps: number, iters: number): TimeCall {
  return (key, body, out) => {
    const fwd = (): Tensor => {
      for (let i = 0; i < reps; i++) body(i);
      return out;
    };
    gpu.replay(key, fwd); // eager (warms plans and scratch) + capture
    gpu.replay(key, fwd);
    const ms = gpu.timeMs(() => {
      for (let i = 0; i < iters; i++) gpu.replay(key, fwd);
    });
    return (ms * 1000) / (iters * reps);
  };
}

/** Copies of an operand of `bytes` to cycle through: together at least twice the L2 cache. */
export function copiesPastL2(l2Bytes: number, bytes: number): number {
  return Math.max(2, Math.ceil((2 * l2Bytes) / bytes));
}

/** Random bf16 weights [rows, cols] (std 0.02), in enough copies that cycling through them misses L2. */
export function weightCopies(gpu: CudaBackend, rows: number, cols: number): Tensor[] {
  return Array.from({ length: copiesPastL2(gpu.device.l2Bytes, rows * cols * 2) }, (_, i) => {
    const t = gpu.empty([rows, cols], "bf16");
    gpu.fillRandom(t, 1000 + i, 0.02);
    return t;
  });
}
