import type { Backend, LoraStack, PreparedStep, Tensor } from "../backend/backend.js";
import type { Linear } from "../model/linear.js";

/** y = base(x) + s · B(A x), with (A, B, s) chosen per row by the step's LoRA slots. */
export class LoraLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;

  /** The dense base weight the backend attached the stack to (backend.ts attachLoraStack), or null. */
  readonly attached: Tensor | null = null;

  constructor(
    private readonly backend: Backend,
    readonly base: Linear,
    readonly stack: LoraStack,
  ) {
    this.inDim = base.inDim;
    this.outDim = base.outDim;
    const w = base.denseWeight;
    if (w && backend.linearLora && backend.attachLoraStack?.(stack, w)) this.attached = w;
  }

  forward(out: Tensor, x: Tensor, step: PreparedStep): void {
    const b = this.backend;
    // One matmul for the base output and the shrink, where the backend set that up (backend.ts linearLora).
    if (this.attached && b.linearLora!(out, x, this.attached, this.stack, step)) return;
    // The base's own call with the LoRA term (a low-bit GEMM that also makes the shrink).
    if (this.base.forwardLora?.(out, x, this.stack, step)) return;
    if (this.base.canAccumulate && b.loraFirst?.(out, x, this.stack, step)) {
      // The LoRA term went first; the base matmul accumulates onto it (backend.ts loraFirst).
      this.base.forward(out, x, step, true);
      return;
    }
    this.base.forward(out, x, step);
    b.lora(out, x, this.stack, step);
  }
}
