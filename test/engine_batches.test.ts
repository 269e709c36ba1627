// Every StepBatch the engine builds, checked against what each request should have at that
// step, under churn: a small KV cache (preemption and recompute), a small batch (a queue),
// aborts, requests arriving while others run, and mixed logprobs. The engine rewrites only
// what changed in its step arrays from one step to the next, so stale rows are the failure
// this looks for. The backend is a stand-in that samples known tokens and checks batches.

import { describe, expect, it } from "vitest";
import type { Backend, KvCache, KvCacheSpec, PreparedStep, SampleResult, StepBatch, Tensor } from "../src/backend/backend.js";
import { mulberry32 } from "../src/backend/rng.js";
import { Engine } from "../src/engine/engine.js";
import type { SamplingParams } from "../src/engine/types.js";
import type { AdapterPool } from "../src/lora/adapter_pool.js";
import type { AdapterRegistry } from "../src/lora/registry.js";
import { loadModelConfig } from "../src/model/config.js";
import type { LlamaModel } from "../src/model/llama.js";
import { TextTokenizer } from "../src/model/tokenizer.js";
import { createPolicy } from "../src/scheduler/index.js";
import { DEMO_BASE } from "./helpers/demo.js";

interface Req {
  readonly prompt: number[];
  readonly params: SamplingParams & { readonly seed: number };
  readonly slot: number;
  /** Tokens the backend sampled for it, in order (reset when it is recomputed: never, they are kept). */
  readonly sampled: number[];
  /** Block id holding each block index of its context, as its token rows wrote them. */
  readonly blockAt: Map<number, number>;
}

const BLOCK = 4;

/** Checks each step against the requests (found by their seeds) and samples known tokens. */
class CheckingBackend {
  readonly name = "checking";
  readonly activationDtype = "f32";
  readonly bySeed = new Map<number, Req>();
  steps = 0;
  decodeSteps = 0;
  #last: StepBatch | null = null;
  readonly #logits: Tensor = { shape: [1, 1], dtype: "f32" };

  prepare(batch: StepBatch): PreparedStep {
    this.steps++;
    if (batch.numTokens === batch.numSeqs) this.decodeSteps++;
    const B = batch.maxBlocksPerSeq;
    const used = new Set<number>();
    let nTop = 0;
    for (let s = 0; s < batch.numSeqs; s++) {
      const r = this.bySeed.get(batch.sampling.seeds[s]!);
      expect(r, `row ${s}: seed ${batch.sampling.seeds[s]} is no request's`).toBeDefined();
      const req = r!;
      const ctx = batch.contextLens[s]!;
      expect(ctx).toBe(req.prompt.length + req.sampled.length);
      expect(batch.sampling.counters[s]).toBe(req.sampled.length);
      expect(batch.sampling.temperature[s]).toBe(Math.fround(req.params.temperature));
      expect(batch.sampling.topP[s]).toBe(Math.fround(req.params.topP));
      expect(batch.sampling.topK[s]).toBe(req.params.topK);
      nTop = Math.max(nTop, req.params.logprobs);
      const q0 = batch.queryStart[s]!, q1 = batch.queryStart[s + 1]!;
      expect(batch.sampleRows[s]).toBe(q1 - 1);
      for (let t = q0; t < q1; t++) {
        const p = batch.positions[t]!;
        expect(p).toBe(ctx - (q1 - t));
        const all = [...req.prompt, ...req.sampled];
        expect(batch.tokenIds[t]).toBe(all[p]);
        expect(batch.loraSlots[t]).toBe(req.slot);
        const slot = batch.slotMapping[t]!;
        req.blockAt.set(Math.floor(p / BLOCK), Math.floor(slot / BLOCK));
        expect(slot % BLOCK).toBe(p % BLOCK);
      }
      const nBlocks = Math.ceil(ctx / BLOCK);
      for (let j = 0; j < B; j++) {
        const id = batch.blockTables[s * B + j]!;
        if (j < nBlocks) {
          expect(id, `row ${s} block ${j}`).toBe(req.blockAt.get(j));
          expect(used.has(id), `block ${id} in two rows`).toBe(false);
          used.add(id);
        } else expect(id, `row ${s} block ${j} past the context`).toBe(-1);
      }
    }
    expect(batch.sampling.numTopLogprobs).toBe(nTop);
    this.#last = batch;
    return { batch };
  }

  replay(_key: string, forward: () => Tensor): Tensor {
    return forward();
  }

  sample(_logits: Tensor, step: PreparedStep): SampleResult {
    expect(step.batch).toBe(this.#last);
    const b = step.batch, m = b.sampleRows.length, k = b.sampling.numTopLogprobs;
    const tokens = new Int32Array(m);
    for (let s = 0; s < m; s++) {
      const req = this.bySeed.get(b.sampling.seeds[s]!)!;
      // A token the request's seed and position determine (as a seeded draw would be); never EOS.
      tokens[s] = 3 + ((req.params.seed * 31 + b.sampling.counters[s]! * 7) % 500);
      req.sampled.push(tokens[s]!);
    }
    return { tokens, logprobs: new Float32Array(m), topIds: new Int32Array(m * k), topLogprobs: new Float32Array(m * k) };
  }

  createKvCache(spec: KvCacheSpec): KvCache {
    return { spec };
  }

  freeKvCache(): void {}
}

describe("engine step batches under churn", () => {
  it("every batch holds each request's tokens, positions, blocks and sampling parameters", async () => {
    const config = loadModelConfig(DEMO_BASE);
    const tokenizer = TextTokenizer.load(DEMO_BASE);
    const backend = new CheckingBackend();
    const names = ["a", "b", "c"];
    const registered = new Map(names.map((name, id) => [name, { id, name, path: "", adapter: { maxRank: 4 } }]));
    const registry = { get: (n: string) => registered.get(n), list: () => [...registered.values()] };
    // Slot = adapter id + 10, so rows show which adapter they carry.
    const pool = { acquire: (id: number) => id + 10, release: () => {}, evict: () => {}, dispose: () => {} };
    const model = { limits: { maxTokens: 512, maxSeqs: 8 }, forward: () => ({ shape: [1], dtype: "f32" }) };
    const maxModelLen = 96;
    const engine = new Engine(
      config, tokenizer, backend as unknown as Backend, model as unknown as LlamaModel,
      registry as unknown as AdapterRegistry, pool as unknown as AdapterPool,
      { maxBatch: 8, maxWaiting: 1000, maxModelLen, maxBatchedTokens: 128, blockSize: BLOCK, numBlocks: 40, modelId: "m", policy: createPolicy("fcfs") },
    );
    const rand = mulberry32(5);
    const int = (lo: number, hi: number): number => lo + Math.floor(rand() * (hi - lo + 1));
    const runs: Promise<void>[] = [];
    let aborted = 0, finished = 0;
    const start = (i: number): void => {
      const adapter = i % 4 === 3 ? null : names[i % 4]!;
      const params = {
        maxTokens: int(1, 40), temperature: int(0, 4) / 4, topP: int(1, 4) / 4, topK: int(0, 3) * 10, stop: [],
        ignoreEos: true, logprobs: int(-1, 3), seed: 1000 + i,
      };
      const prompt = Array.from({ length: int(1, 40) }, () => int(3, 500));
      const req: Req = { prompt, params, slot: adapter === null ? -1 : registered.get(adapter)!.id + 10, sampled: [], blockAt: new Map() };
      backend.bySeed.set(params.seed, req);
      const ac = new AbortController();
      const abortAfter = i % 5 === 2 ? int(1, 10) : -1;
      runs.push((async () => {
        let n = 0;
        let reason: string | null = null;
        for await (const o of engine.generate({ id: `r${i}`, promptIds: prompt, adapter, params }, ac.signal)) {
          n += o.tokenIds.length;
          reason = o.finishReason;
          if (n === abortAfter) ac.abort();
        }
        if (reason === "abort") aborted++;
        else {
          expect(reason).toBe("length");
          expect(n).toBe(params.maxTokens);
          finished++;
        }
      })());
    };
    for (let i = 0; i < 12; i++) start(i);
    // More arrive while those run.
    for (let wave = 0; wave < 6; wave++) {
      await new Promise((r) => setTimeout(r, 2));
      for (let i = 0; i < 6; i++) start(12 + wave * 6 + i);
    }
    await Promise.all(runs);
    await engine.close();
    expect(aborted + finished).toBe(48);
    expect(aborted).toBeGreaterThan(0);
    // The cache (40 blocks of 4) held far less than the batch wanted: steps ran with
    // preemption, and most steps were decode steps over varying batches.
    expect(backend.decodeSteps).toBeGreaterThan(50);
  });
});
