// The CUDA switches still being measured (README's environment table), each run through
// the end-to-end suites on the GPU: reference tokens identical, top-8 logits within 5e-2,
// mixed batches equal single requests. Every switch is read when a backend is created, and
// each test file runs in its own process, so setting them here touches no other file.
import { describe, it } from "vitest";
import { mixedBatchSuite, referenceSuite } from "../helpers/suites.js";
import { HAS_GPU, NO_GPU_REASON } from "./gpu.js";

process.env.INLAID_UPLOAD_IN_GRAPH = "1"; // the step's metadata upload inside its graph
process.env.INLAID_LORA_SKIP_IDLE = "1"; // graphs without adapter rows leave out the per-row LoRA kernels
process.env.INLAID_EXPAND_EARLY = "1"; // the all-slots expand's loads before its wait in two rounds

if (HAS_GPU) {
  referenceSuite("cuda", 5e-2);
  mixedBatchSuite("cuda");
} else {
  describe.skip(`GPU experiments (${NO_GPU_REASON})`, () => it("skipped", () => {}));
}
