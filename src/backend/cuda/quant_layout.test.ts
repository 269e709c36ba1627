// The low-bit kernels' weight layout on the CPU: packing round-trips against the GPTQ
// QuantizedWeight (every bit width, group size, act-order, symmetric or not, K not a
// multiple of 128), and an emulation of kernels/quant_gemm.cu's fused kernel (its lanes,
// mma fragments, k order, per-group scaling and split-K merge, transcribed from the .cu)
// equals the dense matmul of the dequantized weight. The GPU test (test/gpu/quant_gemm.test.ts)
// then checks the compiled kernels against the same reference.

import { describe, expect, it } from "vitest";
import { bf16ToF32, f16ToF32, f32ToBf16 } from "../tensor.js";
import { dequantize, type QuantBits, type QuantizedWeight, type QuantSpec } from "../../quant/types.js";
import { randomQuantized, seededRandom as rng } from "../../../test/helpers/quant_random.js";
import {
  COL_N, QuantLayoutError, UNIT_K, dequantizeLayout, kernelPerm, laneWordOffset, packQuantLayout, pairCoords, randomQuantLayout, readPair,
  type QuantLayout,
} from "./quant_layout.js";
import { FUSED_SPLITS, FUSED_WARPS, ctasPerSm, fusedLaunch, fusedLaunchName, fusedPlan, quantKernelNames, tokenTiles } from "./quant_ops.js";

// ------------------------------------------------------------------ an emulation of quant_gemm_b{B}_t{T}

/** Element (row, col) of the matrices an m16n8k16 mma sees, from the 32 lanes' fragments (PTX layouts). */
function mmaTile(a: number[][], b: number[][], d: number[][]): void {
  // a[lane][0..7]: regs a0..a3 as (lo, hi) pairs; b[lane][0..3]: b0, b1; d[lane][0..3] += A B.
  const A = Array.from({ length: 16 }, () => new Float64Array(16));
  const B = Array.from({ length: 16 }, () => new Float64Array(8));
  for (let lane = 0; lane < 32; lane++) {
    const g = lane >> 2, c = lane & 3;
    for (let reg = 0; reg < 4; reg++) {
      const row = g + 8 * (reg & 1), col = 2 * c + 8 * (reg >> 1);
      A[row]![col] = a[lane]![2 * reg]!;
      A[row]![col + 1] = a[lane]![2 * reg + 1]!;
    }
    for (let reg = 0; reg < 2; reg++) {
      const k = 2 * c + 8 * reg;
      B[k]![g] = b[lane]![2 * reg]!;
      B[k + 1]![g] = b[lane]![2 * reg + 1]!;
    }
  }
  for (let lane = 0; lane < 32; lane++) {
    const g = lane >> 2, c = lane & 3;
    for (let e = 0; e < 4; e++) {
      const row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
      let sum = 0;
      for (let k = 0; k < 16; k++) sum += A[row]![k]! * B[k]![col]!;
      d[lane]![e]! += sum;
    }
  }
}

/** The kernel's output for x [rows, K] (original input order), transcribed from quant_gemm.cu, in f64. */
function emulateFused(l: QuantLayout, x: Float32Array, rows: number, splits: number, bias?: Float32Array): Float64Array {
  const { K, N, bits } = l;
  const NC = N / COL_N, KU = l.units, G = l.groups, gs = l.groupSize;
  // quant_gather_cols: x in the weight's k order.
  const xp = new Float32Array(rows * K);
  for (let r = 0; r < rows; r++) for (let i = 0; i < K; i++) xp[r * K + i] = x[r * K + (l.perm ? l.perm[i]! : i)]!;
  const T = tokenTiles(rows), mBlocks = Math.ceil(rows / (8 * T)), S = splits;
  const out = new Float64Array(rows * N);
  const scaleOf = (e: number, h: number): number => f16ToF32(l.scales.subarray(e * 4 + h, e * 4 + h + 1))[0]!;
  for (let col = 0; col < NC; col++) {
    for (let mb = 0; mb < mBlocks; mb++) {
      const row0 = mb * 8 * T;
      // Per split: acc[lane][nt][t][e].
      const accs: number[][][][][] = [];
      for (let s = 0; s < S; s++) {
        const u0 = Math.floor((s * KU) / S), u1 = Math.floor(((s + 1) * KU) / S);
        const acc = Array.from({ length: 32 }, () => Array.from({ length: 2 }, () => Array.from({ length: T }, () => [0, 0, 0, 0])));
        const tmp = Array.from({ length: 32 }, () => Array.from({ length: 2 }, () => Array.from({ length: T }, () => [0, 0, 0, 0])));
        const sc = Array.from({ length: 32 }, () => [0, 0, 0, 0]);
        const nz = Array.from({ length: 32 }, () => [l.symZero, l.symZero, l.symZero, l.symZero]);
        let curG = -1;
        const flush = (): void => {
          for (let lane = 0; lane < 32; lane++)
            for (let nt = 0; nt < 2; nt++)
              for (let t = 0; t < T; t++)
                for (let e = 0; e < 4; e++) {
                  acc[lane]![nt]![t]![e]! += sc[lane]![2 * nt + (e >> 1)]! * tmp[lane]![nt]![t]![e]!;
                  tmp[lane]![nt]![t]![e] = 0;
                }
        };
        for (let u = u0; u < u1; u++) {
          const base = (col * KU + u) * bits * 128;
          const w = (lane: number) => (i: number): number => l.words[base + laneWordOffset(lane, i)]!;
          for (let j = 0; j < 4; j++) {
            const kb = u * 128 + j * 32;
            const gi = Math.min(Math.floor(kb / gs), G - 1);
            if (gi !== curG) {
              if (curG >= 0) flush();
              for (let lane = 0; lane < 32; lane++) {
                const e = (gi * NC + col) * 8 + (lane >> 2);
                for (let h = 0; h < 4; h++) {
                  sc[lane]![h] = scaleOf(e, h);
                  if (l.zeros) nz[lane]![h] = (l.zeros[e]! >>> (8 * h)) & 0xff;
                }
              }
              curG = gi;
            }
            // x fragments: lane (g, c) holds x[row0 + 8t + g, kb + 8c .. 8c + 7].
            const xv = Array.from({ length: 32 }, (_, lane) => Array.from({ length: T }, (_, t) => {
              const row = row0 + 8 * t + (lane >> 2), k = kb + 8 * (lane & 3);
              return Array.from({ length: 8 }, (_, e) => (row < rows && k < K ? xp[row * K + k + e]! : 0));
            }));
            for (let st = 0; st < 2; st++) {
              for (let nt = 0; nt < 2; nt++) {
                const tau = (2 * j + st) * 2 + nt;
                const a = Array.from({ length: 32 }, (_, lane) => {
                  const frag: number[] = [];
                  for (let i = 0; i < 4; i++) {
                    const [lo, hi] = readPair(w(lane), bits, tau, i);
                    const z = nz[lane]![2 * nt + (i & 1)]!;
                    frag.push(lo - z, hi - z);
                  }
                  return frag;
                });
                for (let t = 0; t < T; t++) {
                  // b0 = x pair (st ? z : x), b1 = (st ? w : y) of the lane's 16-byte vector.
                  const b = Array.from({ length: 32 }, (_, lane) => {
                    const v = xv[lane]![t]!;
                    return st ? [v[4]!, v[5]!, v[6]!, v[7]!] : [v[0]!, v[1]!, v[2]!, v[3]!];
                  });
                  mmaTile(a, b, tmp.map((tl) => tl[nt]![t]!));
                }
              }
            }
          }
        }
        if (curG >= 0) flush();
        accs.push(acc);
      }
      // Epilogue: the sum over splits in split order, plus bias.
      for (let lane = 0; lane < 32; lane++) {
        const g = lane >> 2, c4 = lane & 3;
        for (let nt = 0; nt < 2; nt++)
          for (let e = 0; e < 4; e++)
            for (let t = 0; t < T; t++) {
              const n = col * 32 + g + nt * 16 + 8 * (e >> 1), row = row0 + 8 * t + 2 * c4 + (e & 1);
              if (row >= rows) continue;
              let v = 0;
              for (let s = 0; s < S; s++) v += accs[s]![lane]![nt]![t]![e]!;
              out[row * N + n] = v + (bias ? bias[n]! : 0);
            }
      }
    }
  }
  return out;
}

/**
 * quant_gemm_lora's shrink CTAs (quant_gemm.cu issueA, shrink_unit, shrink_store) transcribed:
 * t [rows, NA] = x @ A^T for A [NA, K], with NW warps per CTA, T token tiles and S k splits.
 */
function emulateShrink(x: Float32Array, A: Float32Array, rows: number, K: number, NA: number, T: number, NW: number, S: number): Float64Array {
  const KU = Math.ceil(K / 128), mBlocks = Math.ceil(rows / (8 * T)), E = 8 * T * 32;
  const out = new Float64Array(rows * NA).fill(NaN);
  for (let acol = 0; acol < Math.ceil(NA / 32); acol++) {
    for (let mb = 0; mb < mBlocks; mb++) {
      const row0 = mb * 8 * T;
      const splitSums: Float64Array[] = [];
      for (let s = 0; s < S; s++) {
        const u0 = Math.floor((s * KU) / S), u1 = Math.floor(((s + 1) * KU) / S);
        // acc[warp][lane][nt][t][e]
        const acc = Array.from({ length: NW }, () => Array.from({ length: 32 }, () => Array.from({ length: 2 }, () => Array.from({ length: T }, () => [0, 0, 0, 0]))));
        for (let u = u0; u < u1; u++) {
          // issueA: the stage's A region as bf16 elements (byte offset / 2).
          const stage = new Float64Array(4096).fill(NaN);
          for (let q = 0; q < 1024; q++) {
            const row = q >> 5, pp = q & 31, n = 32 * acol + row, k = u * 128 + 4 * pp;
            const st8 = 2 * (pp >> 3) + (pp & 1), c = (pp >> 1) & 3, ok = n < NA && k < K;
            const dst = (((st8 * 32 + row) * 4 + c) * 8) / 2;
            for (let e = 0; e < 4; e++) stage[dst + e] = ok ? A[n * K + k + e]! : 0;
          }
          for (let warp = 0; warp < NW; warp++) {
            for (let st8 = warp; st8 < 8; st8 += NW) {
              const j = st8 >> 1, sp = st8 & 1;
              for (let nt = 0; nt < 2; nt++) {
                const a = Array.from({ length: 32 }, (_, lane) => {
                  const g = lane >> 2, c4 = lane & 3;
                  const r0 = (((st8 * 32 + nt * 16 + g) * 4 + c4) * 8) / 2, r1 = r0 + (8 * 4 * 8) / 2;
                  const lo = [0, 1, 2, 3].map((e) => stage[r0 + e]!), hi = [0, 1, 2, 3].map((e) => stage[r1 + e]!);
                  return [lo[0]!, lo[1]!, hi[0]!, hi[1]!, lo[2]!, lo[3]!, hi[2]!, hi[3]!]; // {lo.x, hi.x, lo.y, hi.y}
                });
                for (let t = 0; t < T; t++) {
                  const b = Array.from({ length: 32 }, (_, lane) => {
                    const row = row0 + 8 * t + (lane >> 2), k = u * 128 + 32 * j + 8 * (lane & 3) + 4 * sp;
                    return [0, 1, 2, 3].map((e) => (row < rows && k < K ? x[row * K + k + e]! : 0));
                  });
                  mmaTile(a, b, acc[warp]!.map((tl) => tl[nt]![t]!));
                }
              }
            }
          }
        }
        // shrink_store: part[warp][v * 32 + lane], summed in warp order.
        const red = new Float64Array(E);
        for (let i = 0; i < E; i++) {
          const vi = i >> 5, ln = i & 31, e = vi & 3, nt = Math.floor((vi >> 2) / T), t = (vi >> 2) % T;
          for (let w = 0; w < NW; w++) red[i] += acc[w]![ln]![nt]![t]![e]!;
        }
        splitSums.push(red);
      }
      for (let i = 0; i < E; i++) {
        const vi = i >> 5, ln = i & 31, e = vi & 3, nt = Math.floor((vi >> 2) / T), t = (vi >> 2) % T;
        const n = 32 * acol + nt * 16 + (ln >> 2) + 8 * (e >> 1), row = row0 + 8 * t + 2 * (ln & 3) + (e & 1);
        if (row < rows && n < NA) out[row * NA + n] = splitSums.reduce((acc, r) => acc + r[i]!, 0);
      }
    }
  }
  return out;
}

function denseRef(q: QuantizedWeight, x: Float32Array, rows: number, bias?: Float32Array): Float64Array {
  const W = dequantize(q), K = q.inDim, N = q.outDim;
  const out = new Float64Array(rows * N);
  for (let r = 0; r < rows; r++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[r * K + k]! * W[n * K + k]!;
      out[r * N + n] = s + (bias ? bias[n]! : 0);
    }
  return out;
}

const bf16Rand = (n: number, seed: number): Float32Array => {
  const r = rng(seed);
  return bf16ToF32(f32ToBf16(Float32Array.from({ length: n }, () => 2 * r() - 1)));
};

// ------------------------------------------------------------------ tests

describe("low-bit kernel layout (quant_layout.ts)", () => {
  it("pair coordinates cover each (column, unit) block's 32 x 128 codes exactly once", () => {
    const seen = new Uint8Array(32 * 128);
    for (let lane = 0; lane < 32; lane++)
      for (let tau = 0; tau < 16; tau++)
        for (let i = 0; i < 4; i++) {
          const { n, k } = pairCoords(lane, tau, i);
          expect(k % 2).toBe(0);
          seen[n * 128 + k]!++;
          seen[n * 128 + k + 1]!++;
        }
    expect(seen.every((v) => v === 1)).toBe(true);
  });

  it("every code bit of a lane's words is used by exactly one pair, for each bit width", () => {
    for (const bits of [2, 3, 4, 8] as QuantBits[]) {
      // Set each pair's codes to all ones, one pair at a time, through a fake word store.
      const used = new Uint32Array(4 * bits);
      for (let tau = 0; tau < 16; tau++)
        for (let i = 0; i < 4; i++) {
          // Which bits does readPair look at? Probe with single-bit words.
          for (let w = 0; w < 4 * bits; w++)
            for (let b = 0; b < 32; b++) {
              const [lo, hi] = readPair((x) => (x === w ? (1 << b) >>> 0 : 0), bits, tau, i);
              if (lo !== 0 || hi !== 0) {
                expect(used[w]! & ((1 << b) >>> 0), `bits ${bits} word ${w} bit ${b}`).toBe(0);
                used[w] = (used[w]! | (1 << b)) >>> 0;
              }
            }
        }
      const total = [...used].reduce((a, v) => a + v.toString(2).split("").filter((c) => c === "1").length, 0);
      expect(total).toBe(16 * 4 * 2 * bits);
    }
  });

  const specs: QuantSpec[] = [];
  for (const bits of [2, 3, 4, 8] as QuantBits[])
    for (const groupSize of [32, 64, 128, -1])
      for (const descAct of [false, true]) specs.push({ bits, groupSize, sym: (bits + groupSize) % 3 === 0, descAct });

  for (const spec of specs) {
    it(`packs and reads back every code, scale and zero: ${spec.bits}-bit gs ${spec.groupSize} ${spec.sym ? "sym" : "asym"}${spec.descAct ? " act-order" : ""}`, () => {
      for (const [K, N] of [[96, 64], [352, 32], [256, 96]] as const) {
        const q = randomQuantized(spec, K, N, K + N + spec.bits);
        const l = packQuantLayout(q);
        expect(l.units).toBe(Math.ceil(K / UNIT_K));
        expect(l.words.length).toBe((N / COL_N) * l.units * spec.bits * 128);
        expect(l.zeros === null).toBe(spec.sym);
        if (!spec.descAct || spec.groupSize === -1 || spec.groupSize >= K) expect(l.perm).toBeNull();
        expect(dequantizeLayout(l)).toEqual(dequantize(q));
      }
    });
  }

  it("act-order: kernel position i holds input perm[i], groups are consecutive runs of gs", () => {
    const q = randomQuantized({ bits: 4, groupSize: 32, sym: false, descAct: true }, 256, 32, 5);
    const perm = kernelPerm(q.gIdx, 256, 32, 8)!;
    expect(perm).not.toBeNull();
    expect([...perm].sort((a, b) => a - b)).toEqual(Array.from({ length: 256 }, (_, i) => i));
    for (let i = 0; i < 256; i++) expect(q.gIdx[perm[i]!]).toBe(Math.floor(i / 32));
  });

  it("refuses what the kernels cannot take, naming the limit", () => {
    const base = randomQuantized({ bits: 4, groupSize: 32, sym: true, descAct: false }, 64, 32, 1);
    expect(() => packQuantLayout({ ...base, inDim: 48, codes: base.codes.subarray(0, 48 * 32), gIdx: base.gIdx.subarray(0, 48) })).toThrow(/multiple of 32/);
    expect(() => packQuantLayout({ ...base, outDim: 16 })).toThrow(QuantLayoutError);
    expect(() => packQuantLayout({ ...base, spec: { ...base.spec, groupSize: 48 } })).toThrow(/group size 48/);
    // Groups of unequal size after sorting by g_idx.
    const gIdx = Int32Array.from({ length: 64 }, (_, k) => (k < 40 ? 0 : 1));
    expect(() => kernelPerm(gIdx, 64, 32, 2)).toThrow(/runs of 32/);
  });

  // The fused kernel, emulated lane by lane, against the dense matmul of the dequantized weight.
  const cases: [QuantSpec, number, number, number, number][] = [
    [{ bits: 4, groupSize: 128, sym: true, descAct: false }, 256, 64, 1, 1],
    [{ bits: 4, groupSize: 32, sym: false, descAct: true }, 352, 96, 7, 3],
    [{ bits: 3, groupSize: 64, sym: false, descAct: false }, 384, 32, 16, 2],
    [{ bits: 3, groupSize: -1, sym: true, descAct: false }, 160, 64, 24, 1],
    [{ bits: 2, groupSize: 32, sym: false, descAct: true }, 256, 32, 32, 2],
    [{ bits: 8, groupSize: 64, sym: false, descAct: false }, 192, 32, 9, 2],
    [{ bits: 8, groupSize: -1, sym: true, descAct: true }, 128, 32, 40, 1],
  ];
  for (const [spec, K, N, rows, splits] of cases) {
    it(`emulated fused kernel equals the dense matmul: ${spec.bits}-bit gs ${spec.groupSize}${spec.descAct ? " act-order" : ""} K=${K} N=${N} rows=${rows} splits=${splits}`, () => {
      const q = randomQuantized(spec, K, N, K * 7 + rows);
      const l = packQuantLayout(q);
      const x = bf16Rand(rows * K, rows + K);
      const bias = Float32Array.from({ length: N }, (_, n) => (n % 5) * 0.25);
      const got = emulateFused(l, x, rows, Math.min(splits, l.units), bias);
      const want = denseRef(q, x, rows, bias);
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
      // Both are f64 sums of the same exact products: only the order differs.
      expect(worst).toBeLessThan(1e-9);
    });
  }

  for (const [K, NA, rows, T, NW, S] of [[256, 64, 32, 4, 8, 1], [352, 40, 13, 2, 4, 2], [1056, 96, 5, 1, 8, 4], [128, 8, 24, 4, 4, 1]] as const) {
    it(`emulated LoRA shrink CTAs equal x A^T: K=${K} A rows ${NA} rows=${rows} T=${T} warps=${NW} splits=${S}`, () => {
      const x = bf16Rand(rows * K, K + rows), A = bf16Rand(NA * K, NA + 3);
      const got = emulateShrink(x, A, rows, K, NA, T, NW, S);
      let worst = 0;
      for (let r = 0; r < rows; r++)
        for (let n = 0; n < NA; n++) {
          let want = 0;
          for (let k = 0; k < K; k++) want += x[r * K + k]! * A[n * K + k]!;
          worst = Math.max(worst, Math.abs(got[r * NA + n]! - want)); // NaN (a value never written) fails too
        }
      expect(worst).toBeLessThan(1e-9);
    });
  }

  it("random layouts (--load-format dummy) hold uniform codes with the asked standard deviation", () => {
    for (const bits of [2, 3, 4, 8] as QuantBits[]) {
      const l = randomQuantLayout(bits, 256, 64, 128, 3, 0.02);
      const w = dequantizeLayout(l);
      let s = 0, ss = 0;
      for (const v of w) {
        s += v;
        ss += v * v;
      }
      const mean = s / w.length, std = Math.sqrt(ss / w.length - mean * mean);
      // (q - z) uniform over [-2^(b-1), 2^(b-1)): std = sqrt((4^b - 1) / 12) x scale, slightly under 2^b / sqrt(12).
      expect(std).toBeGreaterThan(0.02 * 0.8);
      expect(std).toBeLessThan(0.02 * 1.1);
      expect(Math.abs(mean)).toBeLessThan(0.02);
    }
  });

  it("INLAID_QGEMM_TILES forces the token tiles per m-block (never more than the rows need)", () => {
    const prev = process.env.INLAID_QGEMM_TILES;
    try {
      process.env.INLAID_QGEMM_TILES = "2";
      expect(fusedPlan(4, 4096, 11008, 32, 132).T).toBe(2);
      expect(fusedPlan(4, 4096, 11008, 32, 132).mBlocks).toBe(2);
      expect(fusedPlan(4, 4096, 11008, 8, 132).T).toBe(1);
      process.env.INLAID_QGEMM_TILES = "3";
      expect(fusedPlan(4, 4096, 11008, 32, 132).T).toBe(2);
      const p = fusedLaunch(4, 11008, 24, 8, 4, 1);
      expect([p.T, p.mBlocks, p.grid[0], p.kernel, fusedLaunchName(p, 24)]).toEqual([1, 3, 3, "quant_gemm_b4_t1_c4", "w8s4t1"]);
    } finally {
      if (prev === undefined) delete process.env.INLAID_QGEMM_TILES;
      else process.env.INLAID_QGEMM_TILES = prev;
    }
  });

  it("4-bit launches of four token tiles and 4 warps take quant_gemm_b4_t4_w4_* (three CTAs per SM); others keep the 8-warp-bounds kernels", () => {
    const p = fusedLaunch(4, 11008, 32, 4, 4);
    expect([p.kernel, fusedLaunchName(p, 32), p.block[0]]).toEqual(["quant_gemm_b4_t4_w4_c4", "w4s4", 128]);
    expect(quantKernelNames()).toContain("quant_gemm_lora_b4_t4_w4_c8");
    expect(ctasPerSm(4, 4, 4)).toBe(3);
    expect(ctasPerSm(8, 4, 4)).toBe(4);
    expect(fusedLaunch(4, 11008, 32, 8, 4).kernel).toBe("quant_gemm_b4_t4_c4");
    expect(fusedLaunch(4, 11008, 8, 4, 4).kernel).toBe("quant_gemm_b4_t1_c4");
    expect(fusedLaunch(4, 11008, 24, 4, 2, 2).kernel).toBe("quant_gemm_b4_t2_c2");
    expect(fusedLaunch(8, 11008, 32, 4, 4).kernel).toBe("quant_gemm_b8_t4_c4");
  });

  it("fused plans: whole clusters of instantiated splits within the k units, one resident wave covering the SMs when one can", () => {
    for (const bits of [2, 3, 4, 8] as QuantBits[])
      for (const [K, N] of [[4096, 11008], [4096, 4096], [11008, 4096], [4096, 22016], [4096, 12288], [256, 512], [704, 256], [128, 64]] as const)
        for (const rows of [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]) {
          const p = fusedPlan(bits, K, N, rows, 132);
          const units = Math.ceil(K / 128), NC = N / 32;
          expect(FUSED_SPLITS).toContain(p.splits);
          expect(p.splits).toBeLessThanOrEqual(units);
          expect(FUSED_WARPS).toContain(p.warps);
          expect(p.kernel).toBe(`quant_gemm_b${bits}_t${p.T}${bits === 4 && p.T === 4 && p.warps === 4 ? "_w4" : ""}_c${p.splits}`);
          expect(p.mBlocks * 8 * p.T).toBeGreaterThanOrEqual(rows);
          expect(p.grid).toEqual([p.mBlocks, Math.ceil(NC / p.warps), p.splits]);
          expect(p.block).toEqual([32 * p.warps, 1, 1]);
          const ctas = p.grid[0] * p.grid[1] * p.grid[2];
          const fits = (w: number, c: number): boolean => c <= Math.floor(0.9 * 132 * ctasPerSm(bits, p.T, w));
          expect(ctasPerSm(bits, p.T, p.warps)).toBeGreaterThanOrEqual(1);
          // All CTAs resident at once (with a margin for cluster packing) whenever some plan is;
          // then no resident plan has more CTAs.
          const resident = FUSED_WARPS.flatMap((w) => FUSED_SPLITS.filter((s) => s <= units).map((s) => ({ w, c: p.mBlocks * Math.ceil(NC / w) * s })))
            .filter(({ w, c }) => fits(w, c));
          if (resident.length > 0) {
            expect(fits(p.warps, ctas)).toBe(true);
            expect(ctas).toBe(Math.max(...resident.map(({ c }) => c)));
          } else {
            expect([p.warps, p.splits]).toEqual([8, 1]);
          }
        }
    // A fixed split count is rounded down to an instantiated one.
    expect(fusedPlan(4, 4096, 4096, 1, 132, 16).splits).toBe(8);
    expect(fusedPlan(4, 4096, 4096, 1, 132, 5).splits).toBe(4);
    expect(fusedPlan(4, 256, 4096, 1, 132, 8).splits).toBe(2);
  });
});
