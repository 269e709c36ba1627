// Multi-step decoding on the CUDA backend: a graph of n decode steps, advance_decode_step
// (kernels/step.cu) making each step's metadata from the last one's tokens on the device.
// Its reference is nextDecodeBatch (decode_steps.ts), which the CPU test checks; here the
// engine's outputs with 4 steps per round must equal those with 1 (the same kernels, so
// logprobs within 1e-5), greedy and seeded, across mixed adapters, stops, EOS and logprobs.
import { describe, it } from "vitest";
import { CudaBackend } from "../../src/backend/cuda/cuda_backend.js";
import { checkMultiStep } from "../helpers/multistep.js";
import { HAS_GPU, NO_GPU_REASON } from "./gpu.js";

describe.skipIf(!HAS_GPU)(`engine with multi-step decoding on cuda${HAS_GPU ? "" : ` (skipped: ${NO_GPU_REASON})`}`, () => {
  it("4 steps per round give every request the same tokens, logprobs, text and finish as 1 (greedy and seeded)", async () => {
    await checkMultiStep("cuda", CudaBackend.prototype as never, 4, 1e-5);
  }, 300_000);
});
