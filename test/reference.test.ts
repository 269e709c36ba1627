// HF transformers + PEFT reference outputs (fp32 over the bf16 checkpoint) reproduced
// on the CPU backend: greedy tokens exactly, top-8 last-position logits within 1e-2.
import { referenceSuite } from "./helpers/suites.js";

referenceSuite("cpu", 1e-2);
