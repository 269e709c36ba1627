// Multi-step decoding on the CPU backend (its decodeSteps runs the steps one after another
// with nextDecodeBatch between them): outputs must equal one decode step per round.
import { describe, expect, it } from "vitest";
import type { StepBatch } from "../src/backend/backend.js";
import { CpuBackend } from "../src/backend/cpu/cpu_backend.js";
import { isDecodeOnly, nextDecodeBatch } from "../src/backend/decode_steps.js";
import { checkMultiStep } from "./helpers/multistep.js";

function decodeBatch(): StepBatch {
  // Two sequences at positions 15 and 4 (contexts 16 and 5), blocks of 4 tokens, 5 blocks each.
  return {
    numTokens: 2, numSeqs: 2,
    tokenIds: Int32Array.from([7, 9]), positions: Int32Array.from([15, 4]), slotMapping: Int32Array.from([3 * 4 + 3, 6 * 4 + 0]),
    loraSlots: Int32Array.from([1, -1]), queryStart: Int32Array.from([0, 1, 2]), contextLens: Int32Array.from([16, 5]),
    blockTables: Int32Array.from([0, 1, 2, 3, 8, 5, 6, -1, -1, -1]), maxBlocksPerSeq: 5, sampleRows: Int32Array.from([0, 1]),
    sampling: {
      temperature: Float32Array.from([0, 1]), topP: Float32Array.from([1, 0.5]), topK: Int32Array.from([0, 3]),
      seeds: Uint32Array.from([5, 6]), counters: Uint32Array.from([10, 2]), numTopLogprobs: 2,
    },
  };
}

describe("nextDecodeBatch", () => {
  it("feeds each sequence its token at the next position, slot from its block table", () => {
    const b = decodeBatch();
    expect(isDecodeOnly(b)).toBe(true);
    const n = nextDecodeBatch(b, Int32Array.from([40, 41]), 4);
    expect([...n.tokenIds]).toEqual([40, 41]);
    expect([...n.positions]).toEqual([16, 5]);
    // position 16 is block index 4 (id 8), offset 0; position 5 is block index 1 (id 6), offset 1
    expect([...n.slotMapping]).toEqual([8 * 4, 6 * 4 + 1]);
    expect([...n.contextLens]).toEqual([17, 6]);
    expect([...n.sampling.counters]).toEqual([11, 3]);
    expect([...n.loraSlots]).toEqual([1, -1]);
    expect([...n.sampling.topP]).toEqual([1, 0.5]);
    expect(n.sampling.numTopLogprobs).toBe(2);
    expect([...b.positions]).toEqual([15, 4]); // the input is not changed
  });

  it("refuses a step without a block for the next position, and a step that is not decode-only", () => {
    const b = decodeBatch();
    const tables = Int32Array.from([0, 1, 2, 3, -1, 5, 6, -1, -1, -1]);
    expect(() => nextDecodeBatch({ ...b, blockTables: tables }, Int32Array.from([1, 2]), 4)).toThrow(/no KV block for position 16/);
    const prefill = { ...b, numTokens: 3, queryStart: Int32Array.from([0, 2, 3]), sampleRows: Int32Array.from([1, 2]) };
    expect(isDecodeOnly(prefill)).toBe(false);
    expect(() => nextDecodeBatch(prefill, Int32Array.from([1, 2]), 4)).toThrow(/not decode-only/);
  });
});

describe("engine with multi-step decoding (CPU)", () => {
  it("4 steps per round give every request the same tokens, logprobs, text and finish as 1 (greedy and seeded)", async () => {
    await checkMultiStep("cpu", CpuBackend.prototype as never, 4, 0);
  }, 120_000);
});
