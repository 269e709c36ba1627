// A linear layer as the model sees it: y = x W^T (+ b). Weight formats (dense now,
// quantized later) and LoRA are different implementations of this one interface,
// so the model code never knows which it is running.

import type { Backend, LoraStack, PreparedStep, Tensor } from "../backend/backend.js";

/** The seven projections of a Llama-family decoder layer (PEFT's target_modules names). */
export const PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;
export type Projection = (typeof PROJECTIONS)[number];

export interface Linear {
  readonly inDim: number;
  readonly outDim: number;
  /** out[n, outDim] = x[n, inDim] W^T (+ bias); overwrites out, or with `accumulate` (only
   * where `canAccumulate`) adds onto it. */
  forward(out: Tensor, x: Tensor, step: PreparedStep, accumulate?: boolean): void;
  /** Whether forward takes `accumulate` (LoraLinear then issues the LoRA term first). */
  readonly canAccumulate?: boolean;
  /** The dense weight when forward is exactly `linear(out, x, weight)` with no bias (LoraLinear
   * may then fuse its shrink into that matmul: backend.ts linearLora). */
  readonly denseWeight?: Tensor;
  /** Optional: forward plus the LoRA term of `stack` in one backend call where the backend
   * can (backend.ts linearQuantizedLora); false, having done nothing, where it cannot. */
  forwardLora?(out: Tensor, x: Tensor, stack: LoraStack, step: PreparedStep): boolean;
}

export class DenseLinear implements Linear {
  readonly inDim: number;
  readonly outDim: number;
  readonly canAccumulate = true;
  readonly denseWeight?: Tensor;
  constructor(
    private readonly backend: Backend,
    readonly weight: Tensor,
    readonly bias?: Tensor,
  ) {
    this.outDim = weight.shape[0]!;
    this.inDim = weight.shape[1]!;
    if (!bias) this.denseWeight = weight;
  }

  forward(out: Tensor, x: Tensor, _step: PreparedStep, accumulate = false): void {
    this.backend.linear(out, x, this.weight, this.bias, accumulate);
  }
}

/**
 * The matmuls a layer runs: projections that read the same input are fused into one
 * (their weights stacked along the output), so a decode step streams q/k/v in one GEMM
 * and gate/up in another. Larger GEMMs reach more of the memory bandwidth at decode
 * shapes (on an H100 at 32 rows: 2.2 TB/s for 4096x4096, 2.7 TB/s for 12288x4096, see
 * bench/kernels.ts), and the LoRA terms of a group run in one launch.
 */
export const LINEAR_GROUPS = {
  qkv_proj: ["q_proj", "k_proj", "v_proj"],
  o_proj: ["o_proj"],
  gate_up_proj: ["gate_proj", "up_proj"],
  down_proj: ["down_proj"],
} as const satisfies Record<string, readonly Projection[]>;
export type LinearGroup = keyof typeof LINEAR_GROUPS;
export const GROUP_NAMES = Object.keys(LINEAR_GROUPS) as LinearGroup[];

/** The group of a projection and its index among the group's members (its output block). */
export function groupOf(p: Projection): { group: LinearGroup; index: number } {
  for (const g of GROUP_NAMES) {
    const index = (LINEAR_GROUPS[g] as readonly Projection[]).indexOf(p);
    if (index >= 0) return { group: g, index };
  }
  throw new Error(`no linear group holds ${p}`);
}

/** Lets a caller (the LoRA layer, a calibration recorder) decorate each fused linear when
 * the model is built. */
export type LinearWrapper = (layer: number, group: LinearGroup, base: Linear) => Linear;
