// The GPTQ tensor layout (AutoGPTQ / GPTQModel / HF transformers / vLLM) <-> QuantizedWeight.
// docs/gptq-format.md is the full description; in short, for a linear with K inputs
// and N outputs, G groups:
//   qweight int32 [K*bits/32, N]   codes packed along the input axis (down columns)
//   qzeros  int32 [G, N*bits/32]   zero points packed along the output axis (across rows)
//   scales  fp16  [G, N]
//   g_idx   int32 [K]              group of each input
// Packing is one little-endian bit stream per packed line: value i occupies stream
// bits [i*bits, (i+1)*bits), and stream bit b is bit b%32 of word b/32. For 2, 4 and 8
// bits no value crosses a word; for 3 bits, 32 values fill 3 words and values 10 and
// 21 straddle word boundaries (exactly AutoGPTQ's 3-bit packer).
// Zero points: the classic "gptq" format (checkpoint_format "gptq", AutoGPTQ v1) stores
// zero - 1 in each field and loaders add 1 back; "gptq_v2" (GPTQModel) stores the zero.

import type { HostTensor } from "../backend/backend.js";
import { f16ToF32, f32ToF16, toF32 } from "../backend/tensor.js";
import { numGroups, QUANT_BITS, type QuantBits, type QuantizedWeight, type QuantSpec } from "./types.js";

export type GptqFormat = "gptq" | "gptq_v2";

/** The four tensors of one quantized linear, as they sit in a checkpoint (names without the module prefix). */
export interface GptqTensors {
  readonly qweight: HostTensor;
  readonly qzeros: HostTensor;
  readonly scales: HostTensor;
  readonly g_idx: HostTensor;
}

export class GptqLayoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GptqLayoutError";
  }
}

function checkBits(bits: number): asserts bits is QuantBits {
  if (!(QUANT_BITS as readonly number[]).includes(bits)) throw new GptqLayoutError(`bits must be one of ${QUANT_BITS.join(", ")}, got ${bits}`);
}

/** Whether `count` values of `bits` fill whole int32 words (what every GPTQ loader assumes). */
export function packsEvenly(count: number, bits: QuantBits): boolean {
  return (count * bits) % 32 === 0;
}

function evenCount(what: string, count: number, bits: QuantBits): void {
  if (!packsEvenly(count, bits)) {
    const unit = 32 / gcd(32, bits);
    throw new GptqLayoutError(`${what} is ${count}, which ${bits}-bit GPTQ packing cannot hold: it must be a multiple of ${unit} so values fill whole int32 words`);
  }
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

/**
 * Packs `values` [rows, cols] (row-major, each in [0, 2^bits)) along the rows:
 * column c's values form one bit stream, written to out[w * cols + c] for word w.
 * Returns [rows * bits / 32, cols].
 */
export function packAlongRows(values: ArrayLike<number>, rows: number, cols: number, bits: QuantBits): Int32Array {
  evenCount("the packed length", rows, bits);
  const out = new Int32Array(((rows * bits) / 32) * cols);
  for (let r = 0; r < rows; r++) {
    const bit = r * bits;
    const word = bit >>> 5;
    const shift = bit & 31;
    const base = word * cols;
    const spill = shift + bits > 32;
    for (let c = 0; c < cols; c++) {
      const v = values[r * cols + c]!;
      out[base + c] |= v << shift;
      // The high bits of a value that straddles a word start the next word.
      if (spill) out[base + cols + c] |= v >>> (32 - shift);
    }
  }
  return out;
}

/** Inverse of packAlongRows: `words` [rows * bits / 32, cols] -> values [rows, cols]. */
export function unpackAlongRows(words: Int32Array, rows: number, cols: number, bits: QuantBits): Uint8Array {
  evenCount("the packed length", rows, bits);
  const mask = (1 << bits) - 1;
  const out = new Uint8Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const bit = r * bits;
    const word = bit >>> 5;
    const shift = bit & 31;
    const base = word * cols;
    const spill = shift + bits > 32;
    for (let c = 0; c < cols; c++) {
      let v = words[base + c]! >>> shift;
      if (spill) v |= words[base + cols + c]! << (32 - shift);
      out[r * cols + c] = v & mask;
    }
  }
  return out;
}

/** Packs each row of `values` [rows, cols] into its own stream: [rows, cols * bits / 32]. */
function packAcrossRows(values: Uint8Array, rows: number, cols: number, bits: QuantBits): Int32Array {
  const wpr = (cols * bits) / 32;
  const out = new Int32Array(rows * wpr);
  for (let r = 0; r < rows; r++) out.set(packAlongRows(values.subarray(r * cols, (r + 1) * cols), cols, 1, bits), r * wpr);
  return out;
}

function unpackAcrossRows(words: Int32Array, rows: number, cols: number, bits: QuantBits): Uint8Array {
  const wpr = (cols * bits) / 32;
  const out = new Uint8Array(rows * cols);
  for (let r = 0; r < rows; r++) out.set(unpackAlongRows(words.subarray(r * wpr, (r + 1) * wpr), cols, 1, bits), r * cols);
  return out;
}

/**
 * QuantizedWeight -> the four GPTQ tensors. Refuses what the layout cannot hold
 * exactly rather than rounding it: scales that are not fp16 values, codes or zeros out
 * of range, symmetric weights whose zeros are not 2^(bits-1), and (classic format) a
 * zero of 0, which it cannot store (see quantizer.ts).
 */
export function packGptq(q: QuantizedWeight, format: GptqFormat = "gptq"): GptqTensors {
  const { spec, inDim: K, outDim: N } = q;
  const bits = spec.bits;
  checkBits(bits);
  evenCount("the input size (K)", K, bits);
  evenCount("the output size (N)", N, bits);
  const G = numGroups(K, spec.groupSize);
  if (q.codes.length !== K * N) throw new GptqLayoutError(`codes has ${q.codes.length} values, expected K*N = ${K * N}`);
  if (q.scales.length !== G * N || q.zeros.length !== G * N) {
    throw new GptqLayoutError(`scales/zeros have ${q.scales.length}/${q.zeros.length} values, expected groups*N = ${G}*${N} = ${G * N}`);
  }
  if (q.gIdx.length !== K) throw new GptqLayoutError(`gIdx has ${q.gIdx.length} entries, expected K = ${K}`);
  const maxq = (1 << bits) - 1;
  for (let i = 0; i < q.codes.length; i++) {
    if (q.codes[i]! > maxq) throw new GptqLayoutError(`code ${q.codes[i]} at index ${i} does not fit in ${bits} bits`);
  }
  const gs = spec.groupSize === -1 ? K : spec.groupSize;
  for (let k = 0; k < K; k++) {
    const g = q.gIdx[k]!;
    if (!(g >= 0 && g < G)) throw new GptqLayoutError(`gIdx[${k}] = ${g} is not a group in [0, ${G})`);
    // Without desc_act, vLLM's and Marlin's kernels ignore g_idx and assume consecutive groups.
    if (!spec.descAct && g !== Math.floor(k / gs)) {
      throw new GptqLayoutError(`gIdx[${k}] = ${g}, but without desc_act input ${k} must be in group ${Math.floor(k / gs)} (loaders ignore g_idx then); set descAct for a permuted g_idx`);
    }
  }
  const symZero = 1 << (bits - 1);
  const minZero = format === "gptq" ? 1 : 0;
  const stored = new Uint8Array(G * N);
  for (let i = 0; i < G * N; i++) {
    const z = q.zeros[i]!;
    if (spec.sym && z !== symZero) throw new GptqLayoutError(`symmetric ${bits}-bit weights need every zero point = ${symZero}, found ${z} at index ${i}`);
    if (z < minZero || z > maxq) {
      throw new GptqLayoutError(
        z === 0 && format === "gptq"
          ? `zero point 0 at index ${i} cannot be stored in the classic gptq format (it stores zero - 1); quantize with quantizer.ts's groupParams, which keeps zeros >= 1`
          : `zero point ${z} at index ${i} is outside [${minZero}, ${maxq}]`,
      );
    }
    stored[i] = format === "gptq" ? z - 1 : z;
  }
  const scales16 = f32ToF16(q.scales);
  const back = f16ToF32(scales16);
  for (let i = 0; i < back.length; i++) {
    if (back[i] !== q.scales[i]) {
      throw new GptqLayoutError(`scale ${q.scales[i]} at index ${i} is not an fp16 value, so the checkpoint would not reproduce it; round scales with quantizer.ts's f16Ceil before choosing codes`);
    }
  }
  return {
    qweight: { shape: [(K * bits) / 32, N], dtype: "i32", data: packAlongRows(q.codes, K, N, bits) },
    qzeros: { shape: [G, (N * bits) / 32], dtype: "i32", data: packAcrossRows(stored, G, N, bits) },
    scales: { shape: [G, N], dtype: "f16", data: scales16 },
    g_idx: { shape: [K], dtype: "i32", data: Int32Array.from(q.gIdx) },
  };
}

/**
 * The four GPTQ tensors -> QuantizedWeight. `g_idx` may be absent (early GPTQ-for-LLaMa
 * checkpoints): inputs then fall into consecutive groups. `spec.groupSize` and
 * `spec.descAct` are taken as given; the tensors' shapes are checked against them.
 * `what` names the module in error messages.
 */
export function unpackGptq(
  t: { qweight: HostTensor; qzeros: HostTensor; scales: HostTensor; g_idx?: HostTensor | null },
  spec: QuantSpec,
  format: GptqFormat = "gptq",
  what = "quantized linear",
): QuantizedWeight {
  const bits = spec.bits;
  checkBits(bits);
  const bad = (msg: string) => new GptqLayoutError(`${what}: ${msg}`);
  if (t.qweight.dtype !== "i32" || t.qweight.shape.length !== 2) throw bad(`qweight must be a 2-D int32 tensor, got ${t.qweight.dtype} [${t.qweight.shape.join(", ")}]`);
  if (t.qzeros.dtype !== "i32" || t.qzeros.shape.length !== 2) throw bad(`qzeros must be a 2-D int32 tensor, got ${t.qzeros.dtype} [${t.qzeros.shape.join(", ")}]`);
  if (t.scales.dtype === "i32" || t.scales.shape.length !== 2) throw bad(`scales must be a 2-D float tensor, got ${t.scales.dtype} [${t.scales.shape.join(", ")}]`);
  const [rowsPacked, N] = t.qweight.shape as [number, number];
  const K = (rowsPacked * 32) / bits;
  if (!Number.isInteger(K)) throw bad(`qweight has ${rowsPacked} rows, which is not a whole number of ${bits}-bit inputs (rows * 32 / bits)`);
  const G = numGroups(K, spec.groupSize);
  if (t.scales.shape[0] !== G || t.scales.shape[1] !== N) {
    throw bad(`scales is [${t.scales.shape.join(", ")}], expected [${G}, ${N}] for K = ${K} and group_size ${spec.groupSize}; does quantization_config match the tensors?`);
  }
  evenCount(`${what}: the output size (N)`, N, bits);
  if (t.qzeros.shape[0] !== G || t.qzeros.shape[1] !== (N * bits) / 32) {
    throw bad(`qzeros is [${t.qzeros.shape.join(", ")}], expected [${G}, ${(N * bits) / 32}]`);
  }
  const codes = unpackAlongRows(t.qweight.data as Int32Array, K, N, bits);
  const zeros = unpackAcrossRows(t.qzeros.data as Int32Array, G, N, bits);
  if (format === "gptq") {
    // Stored zero - 1: a field of 2^bits - 1 is a wrapped zero of 0, read as 0 (the writer's
    // intent, and GPTQModel's reading); vLLM's kernels would compute 2^bits there.
    const mask = (1 << bits) - 1;
    for (let i = 0; i < zeros.length; i++) zeros[i] = (zeros[i]! + 1) & mask;
  }
  let gIdx: Int32Array;
  if (t.g_idx) {
    if (t.g_idx.dtype !== "i32" || t.g_idx.shape.length !== 1 || t.g_idx.shape[0] !== K) {
      throw bad(`g_idx must be int32 [${K}], got ${t.g_idx.dtype} [${t.g_idx.shape.join(", ")}]`);
    }
    gIdx = Int32Array.from(t.g_idx.data as Int32Array);
    for (let k = 0; k < K; k++) {
      if (!(gIdx[k]! >= 0 && gIdx[k]! < G)) throw bad(`g_idx[${k}] = ${gIdx[k]} is not a group in [0, ${G})`);
    }
  } else {
    const gs = spec.groupSize === -1 ? K : spec.groupSize;
    gIdx = Int32Array.from({ length: K }, (_, k) => Math.floor(k / gs));
  }
  const scales = toF32(t.scales.data, t.scales.dtype);
  return { spec, inDim: K, outDim: N, codes, scales: scales === t.scales.data ? Float32Array.from(scales) : scales, zeros, gIdx };
}
