// How one engine step's metadata is laid out in device memory, padded to a bucket,
// and packed on the host. Pure logic (no CUDA): unit-tested on the CPU.
//
// The metadata of a step lives in ONE device buffer of fixed layout, sized at
// capacity (most tokens, most sequences, blocks per sequence). `packStep` writes a
// step into a host staging buffer with the same layout, and the backend uploads the
// prefix [0, copyWords) with a single host-to-device copy. Because offsets depend only
// on the capacity, every kernel argument that points into metadata is the same on
// every step, which is what lets a captured CUDA graph be replayed with new contents.
//
// Layout (4-byte words; each region starts on a 256-byte boundary; blockTables last
// so that the copy can stop after the live sequences' rows):
//   counts       [4]            numTokens, numSeqs, numSample, padTokens
//   tokenIds     [tokens]       i32; padded rows: 0
//   positions    [tokens]       i32; padded rows: 0
//   slotMapping  [tokens]       i32; padded rows: -1 (no KV write)
//   loraSlots    [tokens]       i32; padded rows: -1 (no adapter)
//   queryStart   [seqs + 1]     i32; padded sequences are empty (start = end = numTokens)
//   contextLens  [seqs]         i32; padded: 0
//   sampleRows   [seqs]         i32; padded: 0 (a valid row; never sampled)
//   temperature  [seqs]         f32; padded: 0
//   topP         [seqs]         f32; padded: 1
//   topK         [seqs]         i32; padded: 0
//   seeds        [seqs]         u32; padded: 0
//   counters     [seqs]         u32; padded: 0
//   blockTables  [seqs * B]     i32, row stride B = the capacity's blocksPerSeq (a step
//                               with fewer blocks per sequence is re-strided, -1 filled);
//                               rows of padded sequences are not uploaded (context 0)
//
// Compact layout (stepLayout(capacity, { compact: true })): the four token regions
// above, sized at `tokens`, move after blockTables, and a second set of them sized at
// `seqs` comes right after counts. A step whose token rows fit that second set (every
// decode step: one row per sequence) is packed there (PackedStep.compact), and its
// copy stops after the live block-table rows, so it uploads about
// 12 * seqs + numSeqs * B words instead of 4 * tokens + ... (tokens is the prefill
// budget, thousands of rows). Kernels must then read token rows from the set the step
// was packed into; which one is a function of padTokens (so of a graph's bucket key).

import type { StepBatch } from "../backend.js";

/** Most rows, sequences and blocks per sequence the metadata buffer holds. */
export interface StepCapacity {
  readonly tokens: number;
  readonly seqs: number;
  readonly blocksPerSeq: number;
}

/** Word offsets of the four per-token regions. */
export interface TokenRegions {
  readonly tokenIds: number;
  readonly positions: number;
  readonly slotMapping: number;
  readonly loraSlots: number;
}

/** Word offsets of each region in the metadata buffer. */
export interface StepLayout extends TokenRegions {
  readonly capacity: StepCapacity;
  readonly counts: number;
  readonly tokenIds: number;
  readonly positions: number;
  readonly slotMapping: number;
  readonly loraSlots: number;
  readonly queryStart: number;
  readonly contextLens: number;
  readonly sampleRows: number;
  readonly temperature: number;
  readonly topP: number;
  readonly topK: number;
  readonly seeds: number;
  readonly counters: number;
  readonly blockTables: number;
  readonly totalWords: number;
  /** Compact layouts: token regions of capacity.seqs rows, for steps of at most that many padded rows. */
  readonly compactTokens: TokenRegions | null;
}

/** Words per 256 bytes: every region is aligned for vector loads and cuBLAS-style alignment. */
const ALIGN_WORDS = 64;
const alignUp = (x: number, a: number): number => Math.ceil(x / a) * a;

/** Batch-size buckets up to 256; above it, multiples of 64. */
export const SMALL_BUCKETS: readonly number[] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/**
 * Rows a step of `n` rows is padded to: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192,
 * 256, then the next multiple of 64. Kernels see the bucket as their capacity and read
 * the live count from device metadata, so all steps of a bucket share one CUDA graph.
 */
export function bucketRows(n: number): number {
  if (!(n >= 0) || !Number.isInteger(n)) throw new Error(`row count must be a non-negative integer (got ${n})`);
  if (n === 0) return 0;
  for (const b of SMALL_BUCKETS) if (n <= b) return b;
  return alignUp(n, 64);
}

/**
 * The graph key for a step, or null when the step must run eagerly. Only decode-only
 * steps replay graphs: every sequence contributes exactly one token and is sampled
 * (numTokens == numSeqs == numSample); the key is its bucket.
 */
export function decodeGraphKey(batch: Pick<StepBatch, "numTokens" | "numSeqs" | "sampleRows">): string | null {
  const n = batch.numTokens;
  if (n === 0 || batch.numSeqs !== n || batch.sampleRows.length !== n) return null;
  return `decode:${bucketRows(n)}`;
}

export function stepLayout(capacity: StepCapacity, opts: { readonly compact?: boolean } = {}): StepLayout {
  const { tokens, seqs, blocksPerSeq } = capacity;
  if (tokens < 1 || seqs < 1 || blocksPerSeq < 1) {
    throw new Error(`step capacity needs at least one token, sequence and block (got ${tokens}, ${seqs}, ${blocksPerSeq})`);
  }
  let at = 0;
  const region = (words: number): number => {
    const start = at;
    at = alignUp(at + words, ALIGN_WORDS);
    return start;
  };
  const tokenRegions = (rows: number): TokenRegions =>
    ({ tokenIds: region(rows), positions: region(rows), slotMapping: region(rows), loraSlots: region(rows) });
  const counts = region(4);
  const compactTokens = opts.compact ? tokenRegions(seqs) : null;
  const full = opts.compact ? null : tokenRegions(tokens);
  const queryStart = region(seqs + 1);
  const contextLens = region(seqs);
  const sampleRows = region(seqs);
  const temperature = region(seqs);
  const topP = region(seqs);
  const topK = region(seqs);
  const seeds = region(seqs);
  const counters = region(seqs);
  const blockTables = region(seqs * blocksPerSeq);
  const { tokenIds, positions, slotMapping, loraSlots } = full ?? tokenRegions(tokens);
  return {
    capacity, counts, tokenIds, positions, slotMapping, loraSlots, queryStart, contextLens, sampleRows,
    temperature, topP, topK, seeds, counters, blockTables, totalWords: at, compactTokens,
  };
}

/** What packing decided about a step. */
export interface PackedStep {
  /** Token rows kernels are launched over (bucket of numTokens). */
  readonly padTokens: number;
  /** Sequence slots kernels are launched over (bucket of numSeqs). */
  readonly padSeqs: number;
  /** Sampled rows kernels are launched over (bucket of numSample). */
  readonly padSample: number;
  /** Words to upload, from offset 0. */
  readonly copyWords: number;
  /** Whether any token uses an adapter (eager runs may skip LoRA launches otherwise). */
  readonly anyLora: boolean;
  /** 1 + the highest adapter slot a token uses, 0 when none (how many slots' shrink
   * columns the all-slots LoRA GEMM must make: cuda_backend.ts linearLora). */
  readonly loraSlotSpan: number;
  /** Some sequence has more than one query row (prefill kernels have work). */
  readonly hasPrefill: boolean;
  /** Some sequence has exactly one query row (decode kernels have work). */
  readonly hasDecode: boolean;
  /** The token rows are in the layout's compactTokens regions (else in its full-size ones). */
  readonly compact: boolean;
}

/** The three views of one staging buffer that packing writes through. */
export interface StagingViews {
  readonly i32: Int32Array;
  readonly u32: Uint32Array;
  readonly f32: Float32Array;
}

export function stagingViews(buffer: ArrayBuffer, byteOffset = 0, words = (buffer.byteLength - byteOffset) >> 2): StagingViews {
  return {
    i32: new Int32Array(buffer, byteOffset, words),
    u32: new Uint32Array(buffer, byteOffset, words),
    f32: new Float32Array(buffer, byteOffset, words),
  };
}

/**
 * Writes src[0, n) at dst[off] and `pad` over [off + n, off + padTo). A source of exactly
 * n elements (as the engine's views are) is copied without making a view of it.
 */
function put<A extends Int32Array | Uint32Array | Float32Array>(dst: A, off: number, src: A, n: number, padTo: number, pad: number): void {
  dst.set((src.length === n ? src : src.subarray(0, n)) as ArrayLike<number>, off);
  dst.fill(pad, off + n, off + padTo);
}

/** Why `batch` does not fit `capacity`, or null when it fits. */
export function capacityShortfall(batch: StepBatch, capacity: StepCapacity): string | null {
  const numSample = batch.sampleRows.length;
  if (bucketRows(batch.numTokens) > capacity.tokens) return `${batch.numTokens} tokens (bucket ${bucketRows(batch.numTokens)}) > capacity ${capacity.tokens}`;
  if (bucketRows(Math.max(batch.numSeqs, numSample)) > capacity.seqs) return `${batch.numSeqs} sequences > capacity ${capacity.seqs}`;
  if (batch.maxBlocksPerSeq > capacity.blocksPerSeq) return `${batch.maxBlocksPerSeq} blocks per sequence > capacity ${capacity.blocksPerSeq}`;
  return null;
}

/**
 * Writes `batch` into the staging views at `layout`'s offsets, padding tokens to
 * bucket(numTokens) and sequences to bucket(numSeqs). Allocates nothing. The caller
 * checks `capacityShortfall` first.
 */
export function packStep(batch: StepBatch, layout: StepLayout, v: StagingViews): PackedStep {
  const { i32, u32, f32 } = v;
  const T = batch.numTokens, S = batch.numSeqs, M = batch.sampleRows.length;
  const B = layout.capacity.blocksPerSeq;
  const padTokens = bucketRows(T);
  const padSeqs = bucketRows(Math.max(S, M));
  const padSample = bucketRows(M);
  if (batch.tokenIds.length < T || batch.positions.length < T || batch.slotMapping.length < T || batch.loraSlots.length < T) {
    throw new Error(`step batch arrays are shorter than numTokens (${T})`);
  }
  const Bb = batch.maxBlocksPerSeq;
  if (Bb > B) throw new Error(`step has ${Bb} blocks per sequence, the layout ${B}`);
  if (batch.queryStart.length < S + 1 || batch.contextLens.length < S || batch.blockTables.length < S * Bb) {
    throw new Error(`step batch arrays are shorter than numSeqs (${S}) requires`);
  }

  const c = layout.counts;
  i32[c] = T;
  i32[c + 1] = S;
  i32[c + 2] = M;
  i32[c + 3] = padTokens;

  const compact = layout.compactTokens !== null && padTokens <= layout.capacity.seqs;
  const tr = compact ? layout.compactTokens! : layout;
  put(i32, tr.tokenIds, batch.tokenIds, T, padTokens, 0);
  put(i32, tr.positions, batch.positions, T, padTokens, 0);
  put(i32, tr.slotMapping, batch.slotMapping, T, padTokens, -1);
  put(i32, tr.loraSlots, batch.loraSlots, T, padTokens, -1);
  let loraSlotSpan = 0;
  const ls = batch.loraSlots;
  for (let t = 0; t < T; t++) loraSlotSpan = Math.max(loraSlotSpan, ls[t]! + 1);
  const anyLora = loraSlotSpan > 0;

  const qs = batch.queryStart;
  let hasPrefill = false, hasDecode = false;
  for (let s = 0; s < S; s++) {
    const len = qs[s + 1]! - qs[s]!;
    if (len > 1) hasPrefill = true;
    else if (len === 1) hasDecode = true;
  }
  // Padded sequences are empty: they start (and end) at numTokens.
  put(i32, layout.queryStart, qs, S + 1, padSeqs + 1, T);
  put(i32, layout.contextLens, batch.contextLens, S, padSeqs, 0);

  const sp = batch.sampling;
  put(i32, layout.sampleRows, batch.sampleRows, M, padSeqs, 0);
  put(f32, layout.temperature, sp.temperature, M, padSeqs, 0);
  put(f32, layout.topP, sp.topP, M, padSeqs, 1);
  put(i32, layout.topK, sp.topK, M, padSeqs, 0);
  put(u32, layout.seeds, sp.seeds, M, padSeqs, 0);
  put(u32, layout.counters, sp.counters, M, padSeqs, 0);

  const bt = batch.blockTables;
  if (Bb === B) {
    i32.set(bt.length === S * B ? bt : bt.subarray(0, S * B), layout.blockTables);
  } else {
    for (let s = 0; s < S; s++) {
      const row = layout.blockTables + s * B;
      i32.set(bt.subarray(s * Bb, (s + 1) * Bb), row);
      i32.fill(-1, row + Bb, row + B);
    }
  }
  // The copy ends after the live block-table rows, or (full-size token rows after them
  // in a compact layout) after the last padded token row.
  const copyWords = layout.compactTokens !== null && !compact ? layout.loraSlots + padTokens : layout.blockTables + S * B;
  return { padTokens, padSeqs, padSample, copyWords, anyLora, loraSlotSpan, hasPrefill, hasDecode, compact };
}
