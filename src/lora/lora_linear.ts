import type { Backend, LoraStack, PreparedStep, Tensor } from "../backend/backend.js";
import { DenseLinear, type Linear } from "../model/linear.js";

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
    // A backend that can overlap the LoRA term with a dense GEMM gets both at once.
    if (this.backend.linearLora && this.base instanceof DenseLinear) {
      this.backend.linearLora(out, x, this.base.weight, this.base.bias, this.stack, step);
      return;
    }
    this.base.forward(out, x, step);
    this.backend.lora(out, x, this.stack, step);
  }
}
