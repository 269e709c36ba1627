// The memory roofline of one decode step: a decode step reads every base weight once,
// the LoRA A/B of every distinct adapter in the batch, and each sequence's KV cache;
// at batch sizes where decode is memory-bound, its time cannot beat
// bytes read / device bandwidth. Activations, logits and step metadata are left out:
// they are a few MB against the weights' GBs.

import { TARGET_MODULES } from "../lora/peft.js";
import type { ModelConfig } from "../model/config.js";
import { projDims } from "../model/weights.js";

/** Bytes per stored element on a backend. */
export interface StorageBytes {
  readonly weights: number;
  readonly adapters: number;
  readonly kv: number;
}

/**
 * What each backend stores: the CPU backend holds every float as f32; the CUDA backend
 * keeps weights, LoRA stacks and the KV cache in bf16 (see their file headers).
 */
const BACKEND_STORAGE: Readonly<Record<string, StorageBytes>> = {
  cpu: { weights: 4, adapters: 4, kv: 4 },
  cuda: { weights: 2, adapters: 2, kv: 2 },
};

/** Storage widths of `backend`; an unknown backend is assumed to store bf16. */
export function storageBytes(backend: string): StorageBytes {
  return BACKEND_STORAGE[backend] ?? { weights: 2, adapters: 2, kv: 2 };
}

export interface DecodeWorkload {
  readonly batch: number;
  readonly promptLen: number;
  readonly gen: number;
  /** Distinct adapters in the batch (0 = none). */
  readonly adapters: number;
  readonly rank: number;
}

/** A GPTQ base served by low-bit kernels: what each projection's weight costs to read. */
export interface QuantStorage {
  readonly bits: number;
  /** -1: one group over all inputs. */
  readonly groupSize: number;
  readonly sym: boolean;
}

/**
 * Bytes of one quantized projection as the CUDA low-bit kernels read it
 * (backend/cuda/quant_layout.ts): the codes, an fp16 scale per (group, output), and a
 * one-byte zero point per (group, output) unless symmetric.
 */
export function quantLinearBytes(inDim: number, outDim: number, q: QuantStorage): number {
  const groups = q.groupSize === -1 ? 1 : Math.ceil(inDim / q.groupSize);
  return (inDim * outDim * q.bits) / 8 + groups * outDim * 2 + (q.sym ? 0 : groups * outDim);
}

export interface StepBytes {
  readonly weights: number;
  readonly adapters: number;
  readonly kv: number;
  readonly total: number;
  /** Mean tokens in a sequence's KV cache over the decode steps. */
  readonly meanContext: number;
}

/** Base weight elements a decode step reads: every projection, bias and norm, the LM head, and `batch` embedding rows. */
export function weightElementsPerStep(config: ModelConfig, batch: number): number {
  const H = config.hiddenSize;
  let perLayer = 2 * H; // input and post-attention norms
  for (const m of TARGET_MODULES) {
    const { inDim, outDim } = projDims(config, m);
    perLayer += inDim * outDim;
  }
  const q = config.numHeads * config.headDim, kv = config.numKvHeads * config.headDim;
  if (config.qkvBias) perLayer += q + 2 * kv;
  if (config.oBias) perLayer += H;
  if (config.mlpBias) perLayer += 2 * config.intermediateSize + H;
  // The LM head is read whole; the embedding only at the batch's token ids (the same
  // table when tied, but those rows are read a second time).
  return config.numLayers * perLayer + H + config.vocabSize * H + batch * H;
}

/**
 * Bytes one decode step reads, averaged over the decode steps of a run where every
 * sequence has `promptLen` prompt tokens and generates `gen`: the step producing
 * output token k (k = 1..gen-1) attends over promptLen + k positions, so the mean
 * context is promptLen + gen / 2.
 */
export function decodeStepBytes(config: ModelConfig, w: DecodeWorkload, bytes: StorageBytes, quant?: QuantStorage): StepBytes {
  let weights = weightElementsPerStep(config, w.batch) * bytes.weights;
  if (quant) {
    // The projections are read packed; everything else (norms, embeddings, LM head, biases) as before.
    for (const m of TARGET_MODULES) {
      const { inDim, outDim } = projDims(config, m);
      weights += config.numLayers * (quantLinearBytes(inDim, outDim, quant) - inDim * outDim * bytes.weights);
    }
  }
  let loraPerAdapter = 0;
  for (const m of TARGET_MODULES) {
    const { inDim, outDim } = projDims(config, m);
    loraPerAdapter += w.rank * (inDim + outDim);
  }
  const distinct = Math.min(w.adapters, w.batch);
  const adapters = config.numLayers * loraPerAdapter * distinct * bytes.adapters;
  const meanContext = w.promptLen + w.gen / 2;
  const kvPerToken = config.numLayers * 2 * config.numKvHeads * config.headDim * bytes.kv;
  const kv = kvPerToken * w.batch * meanContext;
  return { weights, adapters, kv, total: weights + adapters + kv, meanContext };
}
