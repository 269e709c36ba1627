// The CPU suites, on the CUDA backend: reference tokens identical, top-8 logits within
// 5e-2 (bf16 activations), mixed batches equal single requests.
import { describe, it } from "vitest";
import { mixedBatchSuite, referenceSuite } from "../helpers/suites.js";
import { HAS_GPU, NO_GPU_REASON } from "./gpu.js";

if (HAS_GPU) {
  referenceSuite("cuda", 5e-2);
  mixedBatchSuite("cuda");
} else {
  describe.skip(`GPU reference (${NO_GPU_REASON})`, () => it("skipped", () => {}));
}
