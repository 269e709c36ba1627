import type { Backend, LoraStack, PreparedStep, Tensor } from "../backend/backend.js";
import type { Linear } from "../model/linear.js";

/** y = base(x) + s · B(A x), with (A, B, s) chosen per row by the step's LoRA slots. */
export class LoraLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;

  constructor(
    private readonly backend: Backend,
    readonly base: Linear,
    readonly stack: LoraStack,
  ) {
    this.inDim = base.inDim;
    this.outDim = base.outDim;
  }

  forward(out: Tensor, x: Tensor, step: PreparedStep): void {
    this.base.forward(out, x, step);
    this.backend.lora(out, x, this.stack, step);
  }
}
