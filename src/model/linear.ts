// A linear layer as the model sees it: y = x W^T (+ b). Weight formats (dense now,
// quantized later) and LoRA are different implementations of this one interface,
// so the model code never knows which it is running.

import type { Backend, PreparedStep, Tensor } from "../backend/backend.js";

/** The seven projections of a Llama-family decoder layer (PEFT's target_modules names). */
export const PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;
export type Projection = (typeof PROJECTIONS)[number];

export interface Linear {
  readonly inDim: number;
  readonly outDim: number;
  /** out[n, outDim] = x[n, inDim] W^T (+ bias); overwrites out. */
  forward(out: Tensor, x: Tensor, step: PreparedStep): void;
}

export class DenseLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;
  constructor(
    private readonly backend: Backend,
    readonly weight: Tensor,
    readonly bias?: Tensor,
  ) {
    this.outDim = weight.shape[0]!;
    this.inDim = weight.shape[1]!;
  }

  forward(out: Tensor, x: Tensor, _step: PreparedStep): void {
    this.backend.linear(out, x, this.weight, this.bias);
  }
}

/** Lets a caller (the LoRA layer) decorate each projection when the model is built. */
export type LinearWrapper = (layer: number, proj: Projection, base: Linear) => Linear;
