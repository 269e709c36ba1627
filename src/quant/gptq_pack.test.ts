import { describe, expect, it } from "vitest";
import { mulberry32 } from "../backend/rng.js";
import { f16ToF32 } from "../backend/tensor.js";
import { GptqLayoutError, packAlongRows, packGptq, unpackAlongRows, unpackGptq, type GptqFormat } from "./gptq_pack.js";
import { groupIndex } from "./quantizer.js";
import { dequantize, numGroups, QUANT_BITS, type QuantBits, type QuantizedWeight, type QuantSpec } from "./types.js";

const i32 = (u: number) => u | 0;

/** A random QuantizedWeight whose every value the layout can hold exactly. */
function randomWeight(spec: QuantSpec, K: number, N: number, seed: number, format: GptqFormat = "gptq"): QuantizedWeight {
  const rnd = mulberry32(seed);
  const maxq = (1 << spec.bits) - 1;
  const G = numGroups(K, spec.groupSize);
  const codes = Uint8Array.from({ length: K * N }, () => Math.floor(rnd() * (maxq + 1)));
  const minZero = format === "gptq" ? 1 : 0;
  const zeros = Uint8Array.from({ length: G * N }, () => (spec.sym ? 1 << (spec.bits - 1) : minZero + Math.floor(rnd() * (maxq + 1 - minZero))));
  // Random fp16 bit patterns of positive normal numbers.
  const bits16 = Uint16Array.from({ length: G * N }, () => 0x0400 + Math.floor(rnd() * (0x7bff - 0x0400)));
  const scales = f16ToF32(bits16);
  let perm: number[] | undefined;
  if (spec.descAct) {
    perm = Array.from({ length: K }, (_, k) => k);
    for (let i = K - 1; i > 0; i--) {
      const j = Math.floor(rnd() * (i + 1));
      [perm[i], perm[j]] = [perm[j]!, perm[i]!];
    }
  }
  return { spec, inDim: K, outDim: N, codes, scales, zeros, gIdx: groupIndex(K, spec.groupSize, perm) };
}

/**
 * An independent reading of qweight, following how vLLM's / AutoGPTQ's torch fallback
 * decodes it: for 2/4/8 bits, value j of a word is (w >> bits*j) & mask; for 3 bits each
 * group of 3 words holds 32 values at fixed shifts, values 10 and 21 stitched from two words.
 */
function referenceUnpackColumn(words: number[], bits: QuantBits): number[] {
  const mask = (1 << bits) - 1;
  const out: number[] = [];
  if (bits !== 3) {
    for (const w of words) for (let j = 0; j < 32 / bits; j++) out.push((w >>> (bits * j)) & mask);
    return out;
  }
  for (let t = 0; t < words.length; t += 3) {
    const [w0, w1, w2] = [words[t]!, words[t + 1]!, words[t + 2]!];
    for (let j = 0; j < 10; j++) out.push((w0 >>> (3 * j)) & 7);
    out.push(((w0 >>> 30) & 3) | ((w1 << 2) & 4));
    for (let j = 0; j < 10; j++) out.push((w1 >>> (3 * j + 1)) & 7);
    out.push(((w1 >>> 31) & 1) | ((w2 << 1) & 6));
    for (let j = 0; j < 10; j++) out.push((w2 >>> (3 * j + 2)) & 7);
  }
  return out;
}

describe("GPTQ packing: hand-computed words", () => {
  it("4-bit: value k sits in bits 4k..4k+3 of the word", () => {
    expect([...packAlongRows([1, 2, 3, 4, 5, 6, 7, 8], 8, 1, 4)]).toEqual([i32(0x87654321)]);
  });

  it("2-bit: value k sits in bits 2k..2k+1", () => {
    // 0,1,2,3 -> 0b11_10_01_00 = 0xE4 per byte.
    const vals = Array.from({ length: 16 }, (_, k) => k % 4);
    expect([...packAlongRows(vals, 16, 1, 2)]).toEqual([i32(0xe4e4e4e4)]);
  });

  it("8-bit: value k is byte k (little-endian)", () => {
    expect([...packAlongRows([0x01, 0x80, 0xff, 0x7f], 4, 1, 8)]).toEqual([i32(0x7fff8001)]);
  });

  it("3-bit: 32 values in 3 words, values 10 and 21 straddle the word boundaries", () => {
    const vals = new Array<number>(32).fill(0);
    vals[0] = 1; // bit 0 of word 0
    vals[10] = 0b101; // stream bits 30..32: bit 30 of word 0, bit 0 of word 1
    vals[11] = 0b010; // stream bits 33..35: bit 2 of word 1
    vals[21] = 0b110; // stream bits 63..65: bit 31 of word 1 (0), bits 0..1 of word 2 (1, 1)
    vals[31] = 0b111; // stream bits 93..95: bits 29..31 of word 2
    expect([...packAlongRows(vals, 32, 1, 3)]).toEqual([i32(0x40000001), i32(0x00000005), i32(0xe0000003)]);
  });

  it("packs each column of qweight independently, words of column n at stride N", () => {
    // K = 8, N = 2: column 0 counts up, column 1 counts down.
    const codes = Array.from({ length: 16 }, (_, i) => (i % 2 === 0 ? i / 2 : 15 - (i - 1) / 2));
    expect([...packAlongRows(codes, 8, 2, 4)]).toEqual([i32(0x76543210), i32(0x89abcdef)]);
  });

  const symZeros: [QuantBits, number][] = [
    [2, 0x55555555], // zero 2 stored as 1 = 0b01
    [4, 0x77777777], // zero 8 stored as 7: the well-known qzeros of symmetric 4-bit GPTQ checkpoints
    [8, 0x7f7f7f7f], // zero 128 stored as 127
  ];
  for (const [bits, word] of symZeros) {
    it(`${bits}-bit symmetric classic qzeros: every field holds 2^(bits-1) - 1`, () => {
      const spec: QuantSpec = { bits, groupSize: -1, sym: true, descAct: false };
      const N = 32 / bits;
      const q = randomWeight(spec, N * 4, N, 1);
      const t = packGptq(q, "gptq");
      expect(t.qzeros.shape).toEqual([1, 1]);
      expect([...t.qzeros.data]).toEqual([i32(word)]);
    });
  }

  it("3-bit symmetric classic qzeros: field 3 (0b011) in a 96-bit stream", () => {
    // Stream bit i is set when i % 3 is 0 or 1; word 1 starts at stream bit 32 (32 % 3 = 2).
    const q = randomWeight({ bits: 3, groupSize: -1, sym: true, descAct: false }, 32, 32, 1);
    expect([...packGptq(q, "gptq").qzeros.data]).toEqual([i32(0xdb6db6db), i32(0xb6db6db6), i32(0x6db6db6d)]);
  });

  it("gptq_v2 stores the zero itself: symmetric 4-bit qzeros are 0x88888888", () => {
    const q = randomWeight({ bits: 4, groupSize: -1, sym: true, descAct: false }, 8, 8, 1);
    expect([...packGptq(q, "gptq_v2").qzeros.data]).toEqual([i32(0x88888888)]);
  });
});

describe("GPTQ packing: pack -> unpack identity", () => {
  // K and N that fill whole words but are not multiples of 32 where the width allows it.
  const SHAPES: Record<QuantBits, [number, number]> = { 2: [80, 48], 3: [96, 64], 4: [40, 24], 8: [36, 12] };
  for (const bits of QUANT_BITS) {
    const [K, N] = SHAPES[bits];
    for (const groupSize of [-1, 16, 32]) {
      for (const sym of [false, true]) {
        for (const descAct of [false, true]) {
          for (const format of ["gptq", "gptq_v2"] as const) {
            it(`${bits}-bit K=${K} N=${N} group ${groupSize} sym=${sym} desc_act=${descAct} ${format}`, () => {
              const spec: QuantSpec = { bits, groupSize, sym, descAct };
              const q = randomWeight(spec, K, N, bits * 1000 + groupSize + (sym ? 7 : 0) + (descAct ? 13 : 0), format);
              const t = packGptq(q, format);
              const G = numGroups(K, groupSize);
              expect(t.qweight.shape).toEqual([(K * bits) / 32, N]);
              expect(t.qzeros.shape).toEqual([G, (N * bits) / 32]);
              expect(t.scales.shape).toEqual([G, N]);
              expect(t.scales.dtype).toBe("f16");
              expect(t.g_idx.shape).toEqual([K]);
              const back = unpackGptq(t, spec, format);
              expect(back.inDim).toBe(K);
              expect(back.outDim).toBe(N);
              expect(back.codes).toEqual(q.codes);
              expect(back.zeros).toEqual(q.zeros);
              expect(back.scales).toEqual(q.scales);
              expect(back.gIdx).toEqual(q.gIdx);
              expect(dequantize(back)).toEqual(dequantize(q));
              // The packed codes decode the same way under the reference reading.
              const words = t.qweight.data as Int32Array;
              for (const n of [0, N - 1]) {
                const column = Array.from({ length: (K * bits) / 32 }, (_, w) => words[w * N + n]!);
                expect(referenceUnpackColumn(column, bits)).toEqual(Array.from({ length: K }, (_, k) => q.codes[k * N + n]!));
              }
            });
          }
        }
      }
    }
  }

  it("unpackAlongRows inverts packAlongRows for random 3-bit data over many words", () => {
    const rnd = mulberry32(5);
    const vals = Uint8Array.from({ length: 96 * 5 }, () => Math.floor(rnd() * 8));
    expect(unpackAlongRows(packAlongRows(vals, 96, 5, 3), 96, 5, 3)).toEqual(vals);
  });
});

describe("GPTQ packing: what the layout cannot hold is refused", () => {
  const spec4: QuantSpec = { bits: 4, groupSize: 8, sym: false, descAct: false };

  it("K that does not fill whole words (3-bit needs multiples of 32)", () => {
    const q = randomWeight({ bits: 3, groupSize: -1, sym: false, descAct: false }, 40, 32, 1);
    expect(() => packGptq(q)).toThrow(/input size \(K\) is 40.*multiple of 32/);
  });

  it("N that does not fill whole qzeros words", () => {
    const q = randomWeight(spec4, 16, 12, 1);
    expect(() => packGptq(q)).toThrow(/output size \(N\) is 12.*multiple of 8/);
  });

  it("a scale that is not an fp16 value", () => {
    const q = randomWeight(spec4, 16, 8, 1);
    q.scales[3] = 0.1;
    expect(() => packGptq(q)).toThrow(GptqLayoutError);
    expect(() => packGptq(q)).toThrow(/not an fp16 value/);
  });

  it("a zero point of 0 in the classic format (it stores zero - 1); gptq_v2 takes it", () => {
    const q = randomWeight(spec4, 16, 8, 1);
    q.zeros[2] = 0;
    expect(() => packGptq(q, "gptq")).toThrow(/zero point 0 .* cannot be stored in the classic gptq format/);
    expect(unpackGptq(packGptq(q, "gptq_v2"), spec4, "gptq_v2").zeros).toEqual(q.zeros);
  });

  it("symmetric weights whose zeros are not 2^(bits-1)", () => {
    const q = randomWeight({ ...spec4, sym: true }, 16, 8, 1);
    q.zeros[0] = 7;
    expect(() => packGptq(q)).toThrow(/symmetric 4-bit weights need every zero point = 8/);
  });

  it("a g_idx entry outside the groups", () => {
    const q = randomWeight({ ...spec4, descAct: true }, 16, 8, 1);
    q.gIdx[5] = 2;
    expect(() => packGptq(q)).toThrow(/gIdx\[5\] = 2 is not a group in \[0, 2\)/);
  });

  it("a permuted g_idx without desc_act (loaders would assume consecutive groups)", () => {
    const q = randomWeight({ ...spec4, descAct: true }, 16, 8, 1);
    expect(() => packGptq({ ...q, spec: spec4 })).toThrow(/without desc_act input \d+ must be in group/);
  });

  it("tensors whose shapes disagree with the spec", () => {
    const q = randomWeight(spec4, 16, 8, 1);
    const t = packGptq(q);
    expect(() => unpackGptq(t, { ...spec4, groupSize: 4 }, "gptq", "m")).toThrow(/m: scales is \[2, 8\], expected \[4, 8\]/);
    expect(() => unpackGptq(t, { ...spec4, bits: 8 }, "gptq", "m")).toThrow(/m: scales is \[2, 8\], expected \[1, 8\]/);
  });
});

describe("GPTQ unpacking of other writers' tensors", () => {
  it("classic format: a field of 2^bits - 1 (a wrapped zero of 0) reads as zero 0", () => {
    const spec: QuantSpec = { bits: 4, groupSize: -1, sym: false, descAct: false };
    const q = randomWeight(spec, 8, 8, 3);
    const t = packGptq(q, "gptq");
    // Field 0 = 0xF, the others stored 0 (zero 1).
    const qzeros = { ...t.qzeros, data: Int32Array.of(0x0000000f) };
    const back = unpackGptq({ ...t, qzeros }, spec, "gptq");
    expect([...back.zeros]).toEqual([0, 1, 1, 1, 1, 1, 1, 1]);
  });

  it("without g_idx, inputs fall into consecutive groups", () => {
    const spec: QuantSpec = { bits: 4, groupSize: 8, sym: false, descAct: false };
    const q = randomWeight(spec, 24, 8, 4);
    const t = packGptq(q);
    const back = unpackGptq({ qweight: t.qweight, qzeros: t.qzeros, scales: t.scales, g_idx: null }, spec);
    expect([...back.gIdx]).toEqual(Array.from({ length: 24 }, (_, k) => Math.floor(k / 8)));
  });

  it("bf16 and f32 scales are read too", () => {
    const spec: QuantSpec = { bits: 8, groupSize: -1, sym: true, descAct: false };
    const q = randomWeight(spec, 4, 4, 6);
    const t = packGptq(q);
    const f32 = { shape: t.scales.shape, dtype: "f32" as const, data: Float32Array.from(q.scales) };
    expect(unpackGptq({ ...t, scales: f32 }, spec).scales).toEqual(q.scales);
  });
});
