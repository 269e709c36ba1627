// The weight layout of kernels/quant_gemm.cu, built on the host once per linear at load,
// from an unpacked GPTQ weight (quant/types.ts QuantizedWeight), and the pieces of the
// kernels' index math the CPU tests replay (quant_layout.test.ts emulates the kernel on
// these arrays and checks it against the dense matmul).
//
// Notation: K inputs, N outputs, W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n]).
//
// k order. With act-order (desc_act) the groups are scattered over the inputs; the kernel
// wants group gi to be the contiguous k range [gi*gs, (gi+1)*gs). So the rows are stored
// in group order: kernel position i holds input perm[i] (a stable sort of the inputs by
// g_idx), and the caller gathers x's columns with the same perm (quant_gather_cols). Every
// GPTQ act-order checkpoint has exactly gs inputs per group (input perm[i] is in group
// floor(i / gs)); other g_idx shapes are refused (QuantLayoutError) and the loader serves
// those linears dequantized instead. Without act-order perm is null (the identity).
//
// Tiles. N is cut into columns of 32 outputs (COL_N), K into units of 128 (UNIT_K; K is
// padded up with code 0, and the kernel zero-fills x past K). For each (column c, unit u)
// lane L of the warp (g = L >> 2, c4 = L & 3) owns 4*B 32-bit words holding 16 mma A tiles
// (16 n x 16 k) x 8 codes. Tile tau (0..15): n16 half nt = tau & 1, 16-k step sigma =
// tau >> 1 = 2j + st (32-k block j, step st). Pair i (0..3) of a tile is the A register i
// of the mma fragment: rows n = nt*16 + g + 8*(i & 1), inputs k = 32j + 8*c4 + 4*st +
// 2*(i >> 1) + {0, 1} (pairCoords). The 4-input offsets inside a block follow from each
// lane reading x[m, 8*c4 .. 8*c4 + 7] as one 16-byte vector (see the .cu header).
// Where a pair's two codes sit in the lane's words (packLane / readPair; lo = smaller k):
//   4 bits: word tau, lo at bits 4i, hi at 16 + 4i
//   2 bits: word tau/2, field f = 4*(tau%2) + i: lo at 2f, hi at 16 + 2f
//   8 bits: word 2*tau + i/2, lo at byte 2*(i%2), hi at byte 2*(i%2) + 1
//   3 bits: words 3q..3q+2 hold tiles 4q..4q+3 (16 pairs p = 4*(tau%4) + i): pair p < 15 in
//           word 3q + p/5, field f = p%5, lo at 3f, hi at 16 + 3f; pair 15's lo bit b is
//           bit 15 and its hi bit b is bit 31 of word 3q + b
// so that a pair always comes out in one AND/OR as bf16x2 {128 + lo, 128 + hi}.
// Lane word w lives in 16-byte plane w >> 2, component w & 3:
//   qw u32 [N/32][units][B planes][32 lanes][4]
// Scales (fp16) and zeros (u8): entry (group gi, column c, r = 0..7) holds the four rows
// the lanes with g = r need, in the order (nt0 g, nt0 g+8, nt1 g, nt1 g+8) = outputs
// c*32 + r + {0, 8, 16, 24}:
//   scales u16 [G][N/32][8][4],  zeros u32 [G][N/32][8] (bytes in the same order)
// zeros is null when every zero point is 2^(B-1) (symmetric): the kernel uses symZero.

import { f16ToF32, f32ToF16 } from "../tensor.js";
import { numGroups, type QuantBits, type QuantizedWeight } from "../../quant/types.js";

export const UNIT_K = 128;
export const COL_N = 32;

/** A weight the kernels cannot take; the message names the limit. Loaders fall back to dense weights. */
export class QuantLayoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QuantLayoutError";
  }
}

export interface QuantLayout {
  readonly bits: QuantBits;
  /** Inputs and outputs of the linear. */
  readonly K: number;
  readonly N: number;
  /** K / 128, rounded up. */
  readonly units: number;
  /** Inputs per group in the kernel's k order (K for one group). */
  readonly groupSize: number;
  readonly groups: number;
  /** qw: [N/32][units][bits][32][4] u32. */
  readonly words: Uint32Array;
  /** [groups][N/32][8][4] fp16 bits. */
  readonly scales: Uint16Array;
  /** [groups][N/32][8] u32 (4 zero points, one per byte), or null when symmetric. */
  readonly zeros: Uint32Array | null;
  /** The zero point every output has when `zeros` is null: 2^(bits-1). */
  readonly symZero: number;
  /** Kernel k position i holds input perm[i]; null = identity. */
  readonly perm: Int32Array | null;
}

/** Device bytes of a layout's parts: words, scales, zeros, perm. */
export function quantLayoutBytes(bits: QuantBits, K: number, N: number, groups: number, sym: boolean, actOrder: boolean): number {
  const units = Math.ceil(K / UNIT_K);
  return (N / COL_N) * units * bits * 512 + groups * N * 2 + (sym ? 0 : groups * N) + (actOrder ? K * 4 : 0);
}

/** Rows and inputs of pair i of tile tau for lane `lane`, relative to the (column, unit) origin; hi is k + 1. */
export function pairCoords(lane: number, tau: number, i: number): { n: number; k: number } {
  const g = lane >> 2, c4 = lane & 3, nt = tau & 1, sigma = tau >> 1, j = sigma >> 1, st = sigma & 1;
  return { n: nt * 16 + g + 8 * (i & 1), k: 32 * j + 8 * c4 + 4 * st + 2 * (i >> 1) };
}

/** A lane's word w inside its (column, unit) block of 4*bits*32 words. */
export function laneWordOffset(lane: number, w: number): number {
  return ((w >> 2) * 32 + lane) * 4 + (w & 3);
}

/**
 * The two codes of pair i of tile tau from a lane's words: the shifts and masks of
 * quant_gemm.cu's magic_pair / dequant_tile, replayed on the host.
 */
export function readPair(word: (w: number) => number, bits: QuantBits, tau: number, i: number): [number, number] {
  let v: number;
  switch (bits) {
    case 4:
      v = (word(tau) >>> (4 * i)) & 0x000f000f;
      break;
    case 2: {
      const f = (tau & 1) * 4 + i;
      v = (word(tau >> 1) >>> (2 * f)) & 0x00030003;
      break;
    }
    case 3: {
      const q = tau >> 2, p = (tau & 3) * 4 + i;
      v = p < 15
        ? (word(3 * q + Math.floor(p / 5)) >>> (3 * (p % 5))) & 0x00070007
        : ((word(3 * q) >>> 15) & 0x00010001) | ((word(3 * q + 1) >>> 14) & 0x00020002) | ((word(3 * q + 2) >>> 13) & 0x00040004);
      break;
    }
    case 8: {
      const x = word(2 * tau + (i >> 1)), sh = 16 * (i & 1);
      return [(x >>> sh) & 0xff, (x >>> (sh + 8)) & 0xff];
    }
    default:
      return bits satisfies never;
  }
  return [v & 0xffff, v >>> 16];
}

/** Where pair (tau, i) goes in a lane's words: (word, bit) of each bit of lo, then of hi. */
function pairBits(bits: QuantBits, tau: number, i: number): { lo: [number, number][]; hi: [number, number][] } {
  const run = (w: number, sh: number): [number, number][] => Array.from({ length: bits }, (_, b) => [w, sh + b] as [number, number]);
  switch (bits) {
    case 4:
      return { lo: run(tau, 4 * i), hi: run(tau, 16 + 4 * i) };
    case 2: {
      const f = (tau & 1) * 4 + i;
      return { lo: run(tau >> 1, 2 * f), hi: run(tau >> 1, 16 + 2 * f) };
    }
    case 8: {
      const w = 2 * tau + (i >> 1), sh = 16 * (i & 1);
      return { lo: run(w, sh), hi: run(w, sh + 8) };
    }
    case 3: {
      const q = tau >> 2, p = (tau & 3) * 4 + i;
      if (p < 15) {
        const w = 3 * q + Math.floor(p / 5), f = p % 5;
        return { lo: run(w, 3 * f), hi: run(w, 16 + 3 * f) };
      }
      return {
        lo: [0, 1, 2].map((b) => [3 * q + b, 15] as [number, number]),
        hi: [0, 1, 2].map((b) => [3 * q + b, 31] as [number, number]),
      };
    }
    default:
      return bits satisfies never;
  }
}

/** For every (lane, tau, i) of a block: its coordinates and where its codes go, flattened for the packing loop. */
interface PairTable {
  readonly n: Int32Array;
  readonly k: Int32Array;
  /** u32 offset in the block and shift of lo and of hi (a run of `bits` bits); -1: spread (3-bit pair 15). */
  readonly offLo: Int32Array;
  readonly shLo: Int32Array;
  readonly offHi: Int32Array;
  readonly shHi: Int32Array;
  /** For spread pairs: (offset, bit) of each bit of lo, then of hi. */
  readonly spread: Map<number, [number, number][]>;
}

const tables = new Map<QuantBits, PairTable>();

function pairTable(bits: QuantBits): PairTable {
  const have = tables.get(bits);
  if (have) return have;
  const P = 32 * 16 * 4;
  const t: PairTable = {
    n: new Int32Array(P), k: new Int32Array(P), offLo: new Int32Array(P), shLo: new Int32Array(P), offHi: new Int32Array(P),
    shHi: new Int32Array(P), spread: new Map(),
  };
  let p = 0;
  for (let lane = 0; lane < 32; lane++) {
    for (let tau = 0; tau < 16; tau++) {
      for (let i = 0; i < 4; i++, p++) {
        const c = pairCoords(lane, tau, i);
        t.n[p] = c.n;
        t.k[p] = c.k;
        const pb = pairBits(bits, tau, i);
        const contiguous = (run: [number, number][]): boolean => run.every(([w, b], e) => w === run[0]![0] && b === run[0]![1] + e);
        if (contiguous(pb.lo) && contiguous(pb.hi)) {
          t.offLo[p] = laneWordOffset(lane, pb.lo[0]![0]);
          t.shLo[p] = pb.lo[0]![1];
          t.offHi[p] = laneWordOffset(lane, pb.hi[0]![0]);
          t.shHi[p] = pb.hi[0]![1];
        } else {
          t.offLo[p] = -1;
          t.spread.set(p, [...pb.lo, ...pb.hi].map(([w, b]) => [laneWordOffset(lane, w), b] as [number, number]));
        }
      }
    }
  }
  tables.set(bits, t);
  return t;
}

/**
 * The kernel's k order for a weight: null when the groups are already consecutive runs of
 * groupSize inputs, else the stable sort of the inputs by g_idx. Throws QuantLayoutError
 * when the sorted order does not give every group exactly groupSize inputs (except the last).
 */
export function kernelPerm(gIdx: Int32Array, K: number, groupSize: number, groups: number): Int32Array | null {
  const gs = groupSize === -1 ? K : groupSize;
  let identity = true;
  for (let k = 0; k < K && identity; k++) identity = gIdx[k] === Math.floor(k / gs);
  if (identity) return null;
  const count = new Int32Array(groups + 1);
  for (let k = 0; k < K; k++) {
    const g = gIdx[k]!;
    if (!(g >= 0 && g < groups)) throw new QuantLayoutError(`g_idx[${k}] = ${g} is not a group in [0, ${groups})`);
    count[g + 1]!++;
  }
  for (let g = 0; g < groups; g++) count[g + 1]! += count[g]!;
  const perm = new Int32Array(K);
  for (let k = 0; k < K; k++) perm[count[gIdx[k]!]!++] = k;
  for (let i = 0; i < K; i++) {
    if (gIdx[perm[i]!] !== Math.floor(i / gs)) {
      throw new QuantLayoutError(
        `act-order groups are not runs of ${gs} inputs (group ${gIdx[perm[i]!]} holds a different number); the low-bit kernel needs equal groups`);
    }
  }
  return perm;
}

/** Checks what the kernels need of a weight's shape; throws QuantLayoutError naming the limit. */
export function checkQuantShape(bits: number, K: number, N: number, groupSize: number): void {
  if (![2, 3, 4, 8].includes(bits)) throw new QuantLayoutError(`${bits}-bit weights have no kernel (2, 3, 4 and 8 do)`);
  if (K % 32 !== 0) throw new QuantLayoutError(`the input size K = ${K} must be a multiple of 32 for the low-bit kernel`);
  if (N % COL_N !== 0) throw new QuantLayoutError(`the output size N = ${N} must be a multiple of ${COL_N} for the low-bit kernel`);
  if (groupSize !== -1 && (groupSize % 32 !== 0 || groupSize <= 0)) {
    throw new QuantLayoutError(`group size ${groupSize} must be -1 or a multiple of 32 for the low-bit kernel`);
  }
}

/** QuantizedWeight -> the kernels' layout (see the header). */
export function packQuantLayout(q: QuantizedWeight): QuantLayout {
  const { bits } = q.spec;
  const K = q.inDim, N = q.outDim;
  checkQuantShape(bits, K, N, q.spec.groupSize);
  const groups = numGroups(K, q.spec.groupSize);
  const gs = q.spec.groupSize === -1 ? K : q.spec.groupSize;
  const perm = kernelPerm(q.gIdx, K, q.spec.groupSize, groups);
  const units = Math.ceil(K / UNIT_K), NC = N / COL_N;
  const blockWords = bits * 32 * 4;
  const words = new Uint32Array(NC * units * blockWords);
  const t = pairTable(bits);
  const P = t.n.length;
  const codes = q.codes;
  // Rows of the codes matrix (k * N) in kernel order; -1 past K (padding: code 0).
  const rowAt = new Int32Array(units * UNIT_K + 1).fill(-1);
  for (let i = 0; i < K; i++) rowAt[i] = (perm ? perm[i]! : i) * N;
  for (let c = 0; c < NC; c++) {
    const n0 = c * COL_N;
    for (let u = 0; u < units; u++) {
      const base = (c * units + u) * blockWords, k0 = u * UNIT_K;
      for (let p = 0; p < P; p++) {
        const r = rowAt[k0 + t.k[p]!]!, r1 = rowAt[k0 + t.k[p]! + 1]!;
        const n = n0 + t.n[p]!;
        const lo = r < 0 ? 0 : codes[r + n]!, hi = r1 < 0 ? 0 : codes[r1 + n]!;
        if (lo === 0 && hi === 0) continue;
        const offLo = t.offLo[p]!;
        if (offLo >= 0) {
          words[base + offLo] |= lo << t.shLo[p]!;
          words[base + t.offHi[p]!] |= hi << t.shHi[p]!;
          continue;
        }
        const spread = t.spread.get(p)!;
        for (let b = 0; b < bits; b++) {
          if ((lo >> b) & 1) words[base + spread[b]![0]]! |= 1 << spread[b]![1];
          if ((hi >> b) & 1) words[base + spread[bits + b]![0]]! |= 1 << spread[bits + b]![1];
        }
      }
    }
  }
  // Scales and zeros: entry (gi, c, r) = outputs c*32 + r + {0, 8, 16, 24}.
  const symZero = 1 << (bits - 1);
  let sym = true;
  for (let i = 0; i < q.zeros.length && sym; i++) sym = q.zeros[i] === symZero;
  const s32 = new Float32Array(groups * N);
  const zeros = sym ? null : new Uint32Array(groups * NC * 8);
  for (let gi = 0; gi < groups; gi++) {
    for (let c = 0; c < NC; c++) {
      for (let r = 0; r < 8; r++) {
        const e = (gi * NC + c) * 8 + r;
        let zw = 0;
        for (let h = 0; h < 4; h++) {
          const n = c * COL_N + r + 8 * h;
          s32[e * 4 + h] = q.scales[gi * N + n]!;
          zw |= q.zeros[gi * N + n]! << (8 * h);
        }
        if (zeros) zeros[e] = zw >>> 0;
      }
    }
  }
  // fp16 as GPTQ stores them (scales read from bf16 / f32 checkpoints are rounded here).
  const scales = f32ToF16(s32);
  return { bits, K, N, units, groupSize: gs, groups, words, scales, zeros, symZero, perm };
}

/**
 * A layout of random codes without building a QuantizedWeight: every bit pattern of the
 * words is a valid set of codes, so the words are a seeded xorshift stream; symmetric
 * zeros, one fp16 scale for all (so W has a standard deviation of about `std`), no act-order.
 * For `--load-format dummy` of a quantized config (7B-sized models in seconds).
 */
export function randomQuantLayout(bits: QuantBits, K: number, N: number, groupSize: number, seed: number, std: number): QuantLayout {
  checkQuantShape(bits, K, N, groupSize);
  const units = Math.ceil(K / UNIT_K), groups = numGroups(K, groupSize), NC = N / COL_N;
  const words = new Uint32Array(NC * units * bits * 128);
  let s = (Math.imul(seed, 2654435761) ^ 0x9e3779b9) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    words[i] = s >>> 0;
  }
  // Uniform codes minus the middle zero: standard deviation ~ 2^bits / sqrt(12).
  const scale = (std * Math.sqrt(12)) / (1 << bits);
  const scales = f32ToF16(new Float32Array(groups * NC * 8 * 4).fill(scale));
  return { bits, K, N, units, groupSize: groupSize === -1 ? K : groupSize, groups, words, scales, zeros: null, symZero: 1 << (bits - 1), perm: null };
}

/** The group of kernel position k (the kernel's min(k / gs, G - 1)). */
export function layoutGroup(l: QuantLayout, k: number): number {
  return Math.min(Math.floor(k / l.groupSize), l.groups - 1);
}

/** Scale and zero point of output n in group gi, read from the layout's entries. */
export function layoutScaleZero(l: QuantLayout, gi: number, n: number): { scale: number; zero: number } {
  const c = Math.floor(n / COL_N), w = n % COL_N, r = w % 8, h = w >> 3;
  const e = (gi * (l.N / COL_N) + c) * 8 + r;
  const scale = f16ToF32(l.scales.subarray(e * 4 + h, e * 4 + h + 1))[0]!;
  const zero = l.zeros ? (l.zeros[e]! >>> (8 * h)) & 0xff : l.symZero;
  return { scale, zero };
}

/**
 * The dense weight W [N, K] (inputs in the ORIGINAL order) a layout encodes, read back
 * through readPair: what the kernels compute with. Tests compare it with quant/types.ts
 * dequantize.
 */
export function dequantizeLayout(l: QuantLayout): Float32Array {
  const { K, N, bits, units } = l;
  const NC = N / COL_N, blockWords = bits * 128;
  const w = new Float32Array(N * K);
  for (let c = 0; c < NC; c++) {
    for (let u = 0; u < units; u++) {
      const base = (c * units + u) * blockWords;
      for (let lane = 0; lane < 32; lane++) {
        const word = (x: number): number => l.words[base + laneWordOffset(lane, x)]!;
        for (let tau = 0; tau < 16; tau++) {
          for (let i = 0; i < 4; i++) {
            const { n, k } = pairCoords(lane, tau, i);
            const [lo, hi] = readPair(word, bits, tau, i);
            for (const [kk, code] of [[u * UNIT_K + k, lo], [u * UNIT_K + k + 1, hi]] as const) {
              if (kk >= K) continue;
              const nn = c * COL_N + n;
              const { scale, zero } = layoutScaleZero(l, layoutGroup(l, kk), nn);
              w[nn * K + (l.perm ? l.perm[kk]! : kk)] = scale * (code - zero);
            }
          }
        }
      }
    }
  }
  return w;
}
