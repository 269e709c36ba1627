import type { Tensor } from "../backend.js";
import type { DType, Shape } from "../tensor.js";
import { numel } from "../tensor.js";

/** A CPU tensor: host memory, f32 for every float dtype, i32 for integers. */
export class CpuTensor implements Tensor {
  constructor(
    readonly shape: Shape,
    readonly dtype: DType,
    readonly data: Float32Array | Int32Array,
    /** Views (rows of another tensor) share storage and are not freed. */
    readonly isView = false,
  ) {
    if (data.length !== numel(shape)) {
      throw new Error(`CpuTensor: shape [${shape.join(", ")}] needs ${numel(shape)} elements, data has ${data.length}`);
    }
  }

  get f32(): Float32Array {
    if (!(this.data instanceof Float32Array)) throw new Error(`expected a float tensor, got ${this.dtype}`);
    return this.data;
  }

  get i32(): Int32Array {
    if (!(this.data instanceof Int32Array)) throw new Error(`expected an i32 tensor, got ${this.dtype}`);
    return this.data;
  }
}

export function cpu(t: Tensor): CpuTensor {
  if (!(t instanceof CpuTensor)) throw new Error("tensor does not belong to the CPU backend");
  return t;
}

/** Rows and columns of a 2-D (or [rows, ...]) tensor. */
export function dims2(t: Tensor): [number, number] {
  const rows = t.shape[0] ?? 1;
  return [rows, rows === 0 ? 0 : numel(t.shape) / rows];
}
