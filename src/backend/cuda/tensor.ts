// A CUDA tensor: a device pointer, a shape and a dtype. Floats live on the device as
// bf16 (weights, activations) or f32 (residual stream, logits, RoPE frequencies);
// integers as i32.
//
// Views made by `rows(t, n)` share the base's storage and carry two row counts:
// `shape[0]` is the n the caller asked for (what `read` returns), and `capRows` is the
// number of rows kernels are launched over. For a step-sized view (n is the step's
// token or sample count) that is the bucket of n, and kernels read the live count from
// the step metadata, so its launch parameters depend only on the bucket, which is what
// a CUDA graph replay needs; `track` records which count it follows, so a replayed
// graph's output can be re-viewed at the current step's size. Other views have
// capRows = n.

import type { Tensor } from "../backend.js";
import { bytesPerElement, numel, type DType, type Shape } from "../tensor.js";

export type DeviceDType = "bf16" | "f32" | "i32";

/** Which per-step count a view's rows follow: token rows, sampled rows, or none (a fixed size). */
export type RowTrack = "tokens" | "sample" | "fixed";

export class CudaTensor implements Tensor {
  #freed = false;
  #ptr: bigint;

  constructor(
    /** The backend instance that made it (tensors never cross backends). */
    readonly owner: object,
    readonly shape: Shape,
    readonly dtype: DeviceDType,
    ptr: bigint,
    /** Rows kernels may touch: shape[0] for owned tensors, the bucket for views. */
    readonly capRows: number,
    readonly track: RowTrack = "fixed",
    /** The owning tensor for views, null for owned tensors. */
    readonly base: CudaTensor | null = null,
  ) {
    this.#ptr = ptr;
  }

  get ptr(): bigint {
    return this.#ptr;
  }

  /**
   * Moves an owned tensor's storage (its contents already copied to `ptr` by the
   * backend, which frees the old one). Only for weights before any graph is captured or
   * view made (cuda_backend.ts attachLoraStack): those would keep the old address.
   */
  relocate(ptr: bigint): void {
    if (this.base !== null) throw new Error("a view's storage cannot move");
    this.#ptr = ptr;
  }

  get isView(): boolean {
    return this.base !== null;
  }

  get rows(): number {
    return this.shape[0] ?? 1;
  }

  /** Elements per row (all dimensions after the first). */
  get cols(): number {
    const r = this.rows;
    return r === 0 ? numel(this.shape.slice(1)) : numel(this.shape) / r;
  }

  get bytes(): number {
    return numel(this.shape) * bytesPerElement(this.dtype);
  }

  get freed(): boolean {
    return this.base ? this.base.freed : this.#freed;
  }

  markFreed(): void {
    this.#freed = true;
  }
}

export function isDeviceDType(d: DType): d is DeviceDType {
  return d === "bf16" || d === "f32" || d === "i32";
}
