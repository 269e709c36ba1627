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
    const b = this.backend;
    if (this.base.canAccumulate && b.loraFirst) {
      // The LoRA term first, the base matmul accumulating onto it (backend.ts loraFirst).
      const wrote = b.loraFirst(out, x, this.stack, step);
      this.base.forward(out, x, step, wrote);
      return;
    }
    this.base.forward(out, x, step);
    b.lora(out, x, this.stack, step);
  }
}
