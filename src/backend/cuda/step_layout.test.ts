import { describe, expect, it } from "vitest";
import type { StepBatch } from "../backend.js";
import {
  SMALL_BUCKETS, bucketRows, capacityShortfall, decodeGraphKey, packStep, stagingViews, stepLayout, type StepLayout,
} from "./step_layout.js";

/** Regions [name, word offset, words], in layout order: each 256-byte aligned, after its
 * predecessor's end, and inside the buffer. */
function expectOrderedRegions(regions: readonly [string, number, number][], totalWords: number): void {
  for (let i = 0; i < regions.length; i++) {
    const [name, off, len] = regions[i]!;
    expect(off % 64, `${name} aligned to 256 bytes`).toBe(0);
    if (i > 0) {
      const [, poff, plen] = regions[i - 1]!;
      expect(off, `${name} after its predecessor`).toBeGreaterThanOrEqual(poff + plen);
    }
    expect(off + len).toBeLessThanOrEqual(totalWords);
  }
}

/** A step: sequence s has `lens[s]` new tokens and `ctx[s]` context after the step. */
function batch(lens: number[], ctx: number[], B: number, lora: number[] = lens.map(() => -1), numTop = 0): StepBatch {
  const T = lens.reduce((a, b) => a + b, 0), S = lens.length;
  const tokenIds = new Int32Array(T), positions = new Int32Array(T), slotMapping = new Int32Array(T), loraSlots = new Int32Array(T);
  const queryStart = new Int32Array(S + 1), contextLens = Int32Array.from(ctx), blockTables = new Int32Array(S * B).fill(-1);
  const sampleRows = new Int32Array(S);
  let t = 0;
  lens.forEach((len, s) => {
    queryStart[s] = t;
    for (let i = 0; i < len; i++, t++) {
      tokenIds[t] = 100 + t;
      positions[t] = ctx[s]! - len + i;
      slotMapping[t] = 1000 * (s + 1) + i;
      loraSlots[t] = lora[s]!;
    }
    for (let b = 0; b < Math.ceil(ctx[s]! / 16); b++) blockTables[s * B + b] = 10 * s + b;
    sampleRows[s] = t - 1;
  });
  queryStart[S] = t;
  return {
    numTokens: T, numSeqs: S, tokenIds, positions, slotMapping, loraSlots, queryStart, contextLens, blockTables,
    maxBlocksPerSeq: B, sampleRows,
    sampling: {
      temperature: Float32Array.from(lens.map((_, s) => 0.5 + s)), topP: Float32Array.from(lens.map(() => 0.9)),
      topK: Int32Array.from(lens.map((_, s) => s * 10)), seeds: Uint32Array.from(lens.map((_, s) => 0xfffffff0 + s)),
      counters: Uint32Array.from(lens.map((_, s) => s + 3)), numTopLogprobs: numTop,
    },
  };
}

function pack(b: StepBatch, layout: StepLayout, buf = new ArrayBuffer(layout.totalWords * 4)) {
  const v = stagingViews(buf);
  // Poison, so every word the step needs is seen to be written.
  v.i32.fill(0x7eadbeef);
  return { packed: packStep(b, layout, v), v };
}

describe("bucketRows", () => {
  it("follows the ladder up to 256, then multiples of 64", () => {
    expect(bucketRows(0)).toBe(0);
    const want: Record<number, number> = {
      1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 24, 24: 24, 25: 32, 33: 48, 49: 64, 65: 96, 97: 128,
      129: 192, 193: 256, 256: 256, 257: 320, 320: 320, 321: 384, 1000: 1024, 1025: 1088,
    };
    for (const [n, b] of Object.entries(want)) expect(bucketRows(Number(n)), `n=${n}`).toBe(b);
    for (const b of SMALL_BUCKETS) expect(bucketRows(b)).toBe(b);
  });

  it("is monotone and never more than doubles (at most 1.5x past 16)", () => {
    let prev = 0;
    for (let n = 1; n <= 5000; n++) {
      const b = bucketRows(n);
      expect(b).toBeGreaterThanOrEqual(n);
      expect(b).toBeGreaterThanOrEqual(prev);
      expect(b).toBeLessThan(2 * n);
      if (n > 16) expect(b / n).toBeLessThanOrEqual(1.5);
      prev = b;
    }
  });

  it("rejects negative and fractional counts", () => {
    expect(() => bucketRows(-1)).toThrow(/non-negative integer/);
    expect(() => bucketRows(2.5)).toThrow(/non-negative integer/);
  });
});

describe("decodeGraphKey", () => {
  it("keys decode-only steps by bucket and refuses mixed steps", () => {
    expect(decodeGraphKey(batch([1, 1, 1, 1, 1], [7, 9, 3, 20, 5], 4))).toBe("decode:8");
    expect(decodeGraphKey(batch([1], [1], 4))).toBe("decode:1");
    expect(decodeGraphKey(batch([3, 1], [3, 9], 4))).toBeNull();
    expect(decodeGraphKey({ numTokens: 0, numSeqs: 0, sampleRows: new Int32Array(0) })).toBeNull();
    // A sequence that is not sampled (never made by the engine) is not a plain decode step.
    expect(decodeGraphKey({ numTokens: 2, numSeqs: 2, sampleRows: new Int32Array(1) })).toBeNull();
  });
});

describe("stepLayout", () => {
  it("places aligned, disjoint regions in a fixed order with the block tables last", () => {
    const l = stepLayout({ tokens: 300, seqs: 20, blocksPerSeq: 7 });
    const regions: [string, number, number][] = [
      ["counts", l.counts, 4], ["tokenIds", l.tokenIds, 300], ["positions", l.positions, 300],
      ["slotMapping", l.slotMapping, 300], ["loraSlots", l.loraSlots, 300], ["queryStart", l.queryStart, 21],
      ["contextLens", l.contextLens, 20], ["sampleRows", l.sampleRows, 20], ["temperature", l.temperature, 20],
      ["topP", l.topP, 20], ["topK", l.topK, 20], ["seeds", l.seeds, 20], ["counters", l.counters, 20],
      ["blockTables", l.blockTables, 140],
    ];
    expectOrderedRegions(regions, l.totalWords);
    expect(l.blockTables + 140).toBeLessThanOrEqual(l.totalWords);
    expect(l.totalWords % 64).toBe(0);
  });

  it("depends only on the capacity", () => {
    expect(stepLayout({ tokens: 64, seqs: 8, blocksPerSeq: 4 })).toEqual(stepLayout({ tokens: 64, seqs: 8, blocksPerSeq: 4 }));
    expect(() => stepLayout({ tokens: 0, seqs: 1, blocksPerSeq: 1 })).toThrow(/capacity/);
  });
});

describe("packStep", () => {
  const B = 4;
  const layout = stepLayout({ tokens: 64, seqs: 16, blocksPerSeq: B });

  it("writes a mixed step and pads tokens and sequences to their buckets", () => {
    // A 3-token prefill (adapter 2) and two decodes (no adapter, adapter 0): 5 tokens -> 8, 3 seqs -> 4.
    const b = batch([3, 1, 1], [3, 18, 40], B, [2, -1, 0], 2);
    const { packed, v } = pack(b, layout);
    expect(packed).toEqual({
      padTokens: 8, padSeqs: 4, padSample: 4, copyWords: layout.blockTables + 3 * B, anyLora: true, loraSlotSpan: 3, hasPrefill: true, hasDecode: true,
      compact: false,
    });
    const i32 = (off: number, n: number) => Array.from(v.i32.subarray(off, off + n));
    expect(i32(layout.counts, 4)).toEqual([5, 3, 3, 8]);
    expect(i32(layout.tokenIds, 8)).toEqual([100, 101, 102, 103, 104, 0, 0, 0]);
    expect(i32(layout.positions, 8)).toEqual([0, 1, 2, 17, 39, 0, 0, 0]);
    expect(i32(layout.slotMapping, 8)).toEqual([1000, 1001, 1002, 2000, 3000, -1, -1, -1]);
    expect(i32(layout.loraSlots, 8)).toEqual([2, 2, 2, -1, 0, -1, -1, -1]);
    expect(i32(layout.queryStart, 5)).toEqual([0, 3, 4, 5, 5]);
    expect(i32(layout.contextLens, 4)).toEqual([3, 18, 40, 0]);
    expect(i32(layout.sampleRows, 4)).toEqual([2, 3, 4, 0]);
    expect(Array.from(v.f32.subarray(layout.temperature, layout.temperature + 4))).toEqual([0.5, 1.5, 2.5, 0]);
    expect(Array.from(v.f32.subarray(layout.topP, layout.topP + 4))).toEqual([Math.fround(0.9), Math.fround(0.9), Math.fround(0.9), 1]);
    expect(i32(layout.topK, 4)).toEqual([0, 10, 20, 0]);
    expect(Array.from(v.u32.subarray(layout.seeds, layout.seeds + 4))).toEqual([0xfffffff0, 0xfffffff1, 0xfffffff2, 0]);
    expect(Array.from(v.u32.subarray(layout.counters, layout.counters + 4))).toEqual([3, 4, 5, 0]);
    expect(i32(layout.blockTables, 3 * B)).toEqual([0, -1, -1, -1, 10, 11, -1, -1, 20, 21, 22, -1]);
  });

  it("leaves words past the copied prefix alone and reports no adapters when none is used", () => {
    const b = batch([1, 1], [5, 6], B);
    const { packed, v } = pack(b, layout);
    expect(packed.anyLora).toBe(false);
    expect(packed.loraSlotSpan).toBe(0);
    expect([packed.hasPrefill, packed.hasDecode]).toEqual([false, true]);
    expect(packed.padTokens).toBe(2);
    expect(packed.copyWords).toBe(layout.blockTables + 2 * B);
    expect(v.i32[packed.copyWords]).toBe(0x7eadbeef);
  });

  it("reuses one staging buffer: a smaller step after a larger one is packed exactly", () => {
    const buf = new ArrayBuffer(layout.totalWords * 4);
    const v = stagingViews(buf);
    packStep(batch([5, 5, 5], [5, 5, 5], B, [1, 1, 1]), layout, v);
    const p = packStep(batch([1], [9], B), layout, v);
    expect(p.padTokens).toBe(1);
    expect(Array.from(v.i32.subarray(layout.counts, layout.counts + 4))).toEqual([1, 1, 1, 1]);
    expect(v.i32[layout.loraSlots]).toBe(-1);
    expect(Array.from(v.i32.subarray(layout.queryStart, layout.queryStart + 2))).toEqual([0, 1]);
  });

  it("checks capacity before packing", () => {
    expect(capacityShortfall(batch([1, 1], [1, 1], B), layout.capacity)).toBeNull();
    expect(capacityShortfall(batch([40, 30], [40, 30], B), layout.capacity)).toMatch(/70 tokens \(bucket 96\) > capacity 64/);
    expect(capacityShortfall(batch(new Array(17).fill(1), new Array(17).fill(1), B), layout.capacity)).toMatch(/17 sequences/);
    expect(capacityShortfall(batch([1], [1], 8), layout.capacity)).toMatch(/8 blocks per sequence > capacity 4/);
    expect(capacityShortfall(batch([1], [1], 2), layout.capacity)).toBeNull();
  });

  it("re-strides block tables of a step with fewer blocks per sequence than the layout", () => {
    const b = batch([1, 1], [20, 40], 3);
    const { packed, v } = pack(b, layout);
    expect(packed.copyWords).toBe(layout.blockTables + 2 * B);
    expect(Array.from(v.i32.subarray(layout.blockTables, layout.blockTables + 2 * B))).toEqual([0, 1, -1, -1, 10, 11, 12, -1]);
  });
});

describe("compact layout", () => {
  const B = 4;
  const cap = { tokens: 300, seqs: 16, blocksPerSeq: B };
  const layout = stepLayout(cap, { compact: true });

  it("puts seqs-row token regions first and the full-size ones after the block tables", () => {
    const c = layout.compactTokens!;
    const regions: [string, number, number][] = [
      ["counts", layout.counts, 4], ["c.tokenIds", c.tokenIds, 16], ["c.positions", c.positions, 16],
      ["c.slotMapping", c.slotMapping, 16], ["c.loraSlots", c.loraSlots, 16], ["queryStart", layout.queryStart, 17],
      ["contextLens", layout.contextLens, 16], ["sampleRows", layout.sampleRows, 16], ["temperature", layout.temperature, 16],
      ["topP", layout.topP, 16], ["topK", layout.topK, 16], ["seeds", layout.seeds, 16], ["counters", layout.counters, 16],
      ["blockTables", layout.blockTables, 16 * B], ["tokenIds", layout.tokenIds, 300], ["positions", layout.positions, 300],
      ["slotMapping", layout.slotMapping, 300], ["loraSlots", layout.loraSlots, 300],
    ];
    expectOrderedRegions(regions, layout.totalWords);
    // The default layout is unchanged by the option's existence.
    expect(stepLayout(cap).compactTokens).toBeNull();
    expect(stepLayout(cap).tokenIds).toBe(64);
  });

  it("packs a decode step into the compact regions and uploads only up to its block-table rows", () => {
    const b = batch([1, 1, 1], [5, 18, 40], B, [2, -1, 0]);
    const buf = new ArrayBuffer(layout.totalWords * 4);
    const { packed, v } = pack(b, layout, buf);
    const c = layout.compactTokens!;
    expect(packed).toEqual({
      padTokens: 4, padSeqs: 4, padSample: 4, copyWords: layout.blockTables + 3 * B, anyLora: true, loraSlotSpan: 3, hasPrefill: false, hasDecode: true,
      compact: true,
    });
    const i32 = (off: number, n: number) => Array.from(v.i32.subarray(off, off + n));
    expect(i32(c.tokenIds, 4)).toEqual([100, 101, 102, 0]);
    expect(i32(c.positions, 4)).toEqual([4, 17, 39, 0]);
    expect(i32(c.slotMapping, 4)).toEqual([1000, 2000, 3000, -1]);
    expect(i32(c.loraSlots, 4)).toEqual([2, -1, 0, -1]);
    expect(i32(layout.queryStart, 5)).toEqual([0, 1, 2, 3, 3]);
    expect(i32(layout.blockTables, 3 * B)).toEqual([0, -1, -1, -1, 10, 11, -1, -1, 20, 21, 22, -1]);
    // The full-size token regions are not written (nor uploaded).
    expect(v.i32[layout.tokenIds]).toBe(0x7eadbeef);
    expect(v.i32[packed.copyWords]).toBe(0x7eadbeef);
    // About 12 * seqs + live block rows: far less than the default layout's prefix.
    const plain = pack(b, stepLayout(cap)).packed.copyWords;
    expect(packed.copyWords).toBeLessThan(plain / 2);
  });

  it("packs a step of more rows than sequences into the full-size regions and uploads through them", () => {
    const b = batch([12, 1, 4], [12, 18, 40], B);
    const { packed, v } = pack(b, layout);
    expect(packed.padTokens).toBe(24);
    expect(packed.compact).toBe(false);
    expect(packed.copyWords).toBe(layout.loraSlots + 24);
    const i32 = (off: number, n: number) => Array.from(v.i32.subarray(off, off + n));
    expect(i32(layout.tokenIds, 24)).toEqual([...Array.from({ length: 17 }, (_, t) => 100 + t), 0, 0, 0, 0, 0, 0, 0]);
    expect(i32(layout.slotMapping + 16, 8)).toEqual([3003, -1, -1, -1, -1, -1, -1, -1]);
    expect(v.i32[layout.compactTokens!.tokenIds]).toBe(0x7eadbeef);
    expect(i32(layout.blockTables, 3 * B)).toEqual([0, -1, -1, -1, 10, 11, -1, -1, 20, 21, 22, -1]);
  });

  it("chooses the regions by the padded row count alone (one choice per graph bucket)", () => {
    // capacity.seqs 12 is not a bucket: 9..12 rows pad to 16 and cannot use the 12-row regions.
    const odd = stepLayout({ tokens: 300, seqs: 12, blocksPerSeq: B }, { compact: true });
    expect(pack(batch(new Array(8).fill(1), new Array(8).fill(3), B), odd).packed.compact).toBe(true);
    expect(pack(batch([1], [3], B), odd).packed.compact).toBe(true);
    // A small prefill fits as well as a decode of the same bucket.
    expect(pack(batch([3, 1], [3, 3], B), odd).packed.compact).toBe(true);
    const nine = batch(new Array(9).fill(1), new Array(9).fill(3), B);
    expect(capacityShortfall(nine, odd.capacity)).toMatch(/9 sequences/);
  });
});
