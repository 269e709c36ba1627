// `inlaid bench` end to end on the CPU (the demo with its checkpoint, and a tiny shape
// with random weights), the synthetic adapters it creates, the roofline arithmetic,
// and the shipped benchmark shapes.

import { copyFileSync, existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { OfflineBenchResult } from "../src/bench/offline.js";
import { percentile, randomPrompts } from "../src/bench/offline.js";
import { decodeStepBytes, storageBytes } from "../src/bench/roofline.js";
import { syntheticAdapterParams, syntheticAdapters, writeSyntheticAdapter } from "../src/bench/synthetic_adapter.js";
import { loadPeftAdapter, TARGET_MODULES } from "../src/lora/peft.js";
import { loadModelConfig } from "../src/model/config.js";
import { runCli } from "./helpers/cli.js";
import { DEMO_BASE, ROOT } from "./helpers/demo.js";

const cache = mkdtempSync(join(tmpdir(), "inlaid-bench-test-"));
const inlaid = runCli;

function expectSane(r: OfflineBenchResult, batch: number, promptLen: number, gen: number): void {
  expect(r.bench).toBe("offline");
  expect(r.backend).toBe("cpu");
  expect(r.graph_launch).toBeNull(); // the CPU backend replays no graphs
  expect([r.batch, r.prompt_len, r.gen]).toEqual([batch, promptLen, gen]);
  expect(r.seconds).toBeGreaterThan(0);
  expect(r.output_tokens_per_s).toBeGreaterThan(0);
  expect(r.output_tokens_per_s).toBeCloseTo((batch * gen) / r.seconds, -1);
  expect(r.total_tokens_per_s).toBeGreaterThan(r.output_tokens_per_s);
  expect(r.prefill_s).toBeGreaterThan(0);
  expect(r.prefill_s).toBeLessThan(r.seconds);
  // All prompts fit one prefill step, then one decode step per further token.
  expect(r.steps).toBe(gen);
  expect(r.decode_step_ms!.n).toBe(gen - 1);
  expect(r.decode_step_ms!.mean).toBeGreaterThan(0);
  expect(r.decode_step_ms!.p50).toBeLessThanOrEqual(r.decode_step_ms!.p99);
  expect(r.roofline.bandwidth_source).toBe("cpu-copy");
  expect(r.roofline.bandwidth_gbs).toBeGreaterThan(0);
  expect(r.roofline.bytes_per_step).toBe(r.roofline.weights_bytes + r.roofline.adapter_bytes + r.roofline.kv_bytes);
  expect(r.roofline.step_ms).toBeGreaterThan(0);
  expect(r.roofline.ratio).toBeGreaterThan(0);
}

describe("inlaid bench", () => {
  it("runs the demo with mixed synthetic adapters and prints sane JSON", async () => {
    const r = await inlaid("bench", "--model", DEMO_BASE, "--batch", "4", "--prompt-len", "16", "--gen", "8",
      "--adapters", "2", "--rank", "4", "--device", "cpu", "--adapter-cache", cache, "--json");
    expect(r.stderr).toContain("bandwidth");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as OfflineBenchResult;
    expectSane(out, 4, 16, 8);
    expect(out.load_format).toBe("safetensors");
    expect([out.adapters, out.rank]).toEqual([2, 4]);
    expect(out.roofline.adapter_bytes).toBeGreaterThan(0);
    expect(out.shape).toMatchObject({ layers: 6, hidden: 256, heads: 8, kv_heads: 4, vocab: 512 });
  });

  it("builds random weights from config.json alone (dummy load format, no adapters)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-bench-tiny-"));
    writeFileSync(join(dir, "config.json"), JSON.stringify({
      model_type: "qwen2", hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
      num_key_value_heads: 2, vocab_size: 1000, max_position_embeddings: 128, rope_theta: 1e6, tie_word_embeddings: false,
    }));
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(DEMO_BASE, f), join(dir, f));
    const r = await inlaid("bench", "--model", dir, "--batch", "3", "--prompt-len", "10", "--gen", "5", "--adapters", "0",
      "--device", "cpu", "--no-warmup", "--json");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as OfflineBenchResult;
    expectSane(out, 3, 10, 5);
    expect(out.load_format).toBe("dummy");
    expect(out.adapters).toBe(0);
    expect(out.roofline.adapter_bytes).toBe(0);
  });

  it("prints a readable summary without --json", async () => {
    const r = await inlaid("bench", "--model", DEMO_BASE, "--batch", "2", "--prompt-len", "4", "--gen", "3", "--adapters", "1",
      "--rank", "2", "--device", "cpu", "--adapter-cache", cache, "--bandwidth-gbs", "10");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/throughput +[\d.]+ output tokens\/s/);
    expect(r.stdout).toMatch(/roofline .* \/ 10 GB\/s \(flag\)/);
  });

  it("refuses --model with --config, unknown shapes and contexts beyond the model (usage errors)", async () => {
    const both = await inlaid("bench", "--model", DEMO_BASE, "--config", "llama-2-7b");
    expect(both.code).toBe(2);
    expect(both.stderr).toContain("either --model or --config");
    const unknown = await inlaid("bench", "--config", "llama-9");
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain("llama-2-7b");
    const long = await inlaid("bench", "--model", DEMO_BASE, "--prompt-len", "500", "--gen", "100", "--device", "cpu");
    expect(long.code).toBe(1);
    expect(long.stderr).toContain("max_position_embeddings (512)");
  });
});

describe("synthetic adapters", () => {
  const config = loadModelConfig(DEMO_BASE);

  it("are PEFT folders that load with every projection at the given rank", () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-synth-"));
    writeSyntheticAdapter(dir, config, { rank: 4, seed: 3 });
    const a = loadPeftAdapter(dir, config);
    expect(a.maxRank).toBe(4);
    expect(a.targetModules).toEqual([...TARGET_MODULES]);
    expect(a.modules).toHaveLength(config.numLayers * TARGET_MODULES.length);
    for (const m of a.modules) {
      expect(m.rank).toBe(4);
      expect(m.scale).toBe(2); // lora_alpha = 2r
      expect(m.b.some((x) => x !== 0)).toBe(true); // not PEFT's zero-initialized B
    }
    expect(a.sizeBytes).toBe(syntheticAdapterParams(config, 4) * 4);
  });

  it("differ by seed and are reused from the cache", () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-synth-cache-"));
    const written: string[] = [];
    const first = syntheticAdapters(config, 2, 2, dir, (d) => written.push(d));
    expect(written).toEqual(first);
    const again = syntheticAdapters(config, 2, 2, dir, (d) => written.push(d));
    expect(again).toEqual(first);
    expect(written).toHaveLength(2);
    const [a, b] = first.map((d) => loadPeftAdapter(d, config));
    expect(a!.modules[0]!.a).not.toEqual(b!.modules[0]!.a);
  });
});

describe("roofline", () => {
  it("counts Llama-2-7B's bytes per decode step (bf16, 32 requests of 128 + 128, 8 adapters of rank 16)", () => {
    const cfg = loadModelConfig(join(ROOT, "bench", "configs", "llama-2-7b"));
    const b = decodeStepBytes(cfg, { batch: 32, promptLen: 128, gen: 128, adapters: 8, rank: 16 }, storageBytes("cuda"));
    // 32 layers * (2 norms * 4096 + 4*4096^2 + 3*4096*11008) + final norm + lm_head 32000*4096 + 32 embedding rows.
    expect(b.weights).toBe(2 * (32 * (2 * 4096 + 4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 + 32000 * 4096 + 32 * 4096));
    expect(b.weights / 1e9).toBeCloseTo(13.215, 3);
    // Per adapter 16 * (35584 in + 42496 out) per layer, 32 layers: 39,976,960 values.
    expect(syntheticAdapterParams(cfg, 16)).toBe(39_976_960);
    expect(b.adapters).toBe(8 * 39_976_960 * 2);
    // K and V: 32 layers * 2 * 32 heads * 128 * 2 bytes per token, 32 sequences at a mean context of 128 + 64.
    expect(b.meanContext).toBe(192);
    expect(b.kv).toBe(32 * 2 * 32 * 128 * 2 * 32 * 192);
    expect(b.total).toBe(b.weights + b.adapters + b.kv);
  });

  it("counts a 4-bit GPTQ base's projections at their packed size", () => {
    const cfg = loadModelConfig(join(ROOT, "bench", "configs", "llama-2-7b"));
    const w = { batch: 32, promptLen: 128, gen: 128, adapters: 0, rank: 16 };
    const dense = decodeStepBytes(cfg, w, storageBytes("cuda"));
    const q4 = decodeStepBytes(cfg, w, storageBytes("cuda"), { bits: 4, groupSize: 128, sym: true });
    const proj = 4 * 4096 * 4096 + 3 * 4096 * 11008;
    // One 4-bit symmetric group-128 layer of this shape allocated 104,349,696 bytes on the
    // H100 (bench/quant_gemm.ts, "measured_one_layer_sym_bytes"): codes plus fp16 scales.
    expect(q4.weights).toBe(dense.weights - 32 * proj * 2 + 32 * 104_349_696);
    const asym = decodeStepBytes(cfg, w, storageBytes("cuda"), { bits: 4, groupSize: 128, sym: false });
    // One zero-point byte per (group, output): 32 groups over 4096 inputs, 86 over 11008.
    expect(asym.weights - q4.weights).toBe(32 * (32 * (3 * 4096 + 4096 + 2 * 11008) + 86 * 4096));
  });

  it("counts only the adapters a batch can hold, and f32 on the CPU backend", () => {
    const cfg = loadModelConfig(DEMO_BASE);
    const few = decodeStepBytes(cfg, { batch: 2, promptLen: 4, gen: 4, adapters: 8, rank: 4 }, storageBytes("cpu"));
    const two = decodeStepBytes(cfg, { batch: 2, promptLen: 4, gen: 4, adapters: 2, rank: 4 }, storageBytes("cpu"));
    expect(few.adapters).toBe(two.adapters);
    expect(two.adapters).toBe(2 * syntheticAdapterParams(cfg, 4) * 4);
  });

  it("percentiles are nearest-rank and prompts are reproducible", () => {
    const xs = Array.from({ length: 100 }, (_, i) => i + 1);
    expect([percentile(xs, 50), percentile(xs, 99), percentile(xs, 100), percentile([7], 99)]).toEqual([50, 99, 100, 7]);
    const p = randomPrompts(3, 5, 100, 1);
    expect(randomPrompts(3, 5, 100, 1)).toEqual(p);
    expect(p.flat().every((id) => Number.isInteger(id) && id >= 0 && id < 100)).toBe(true);
    expect(p[0]).not.toEqual(p[1]);
  });
});

describe("bench/configs", () => {
  const shapes: Record<string, object> = {
    "llama-2-7b": { architecture: "llama", numLayers: 32, hiddenSize: 4096, intermediateSize: 11008, numHeads: 32, numKvHeads: 32, vocabSize: 32000, ropeTheta: 1e4, maxPositionEmbeddings: 4096, qkvBias: false },
    "llama-2-13b": { architecture: "llama", numLayers: 40, hiddenSize: 5120, intermediateSize: 13824, numHeads: 40, numKvHeads: 40, vocabSize: 32000, ropeTheta: 1e4, maxPositionEmbeddings: 4096 },
    "llama-3-8b": { architecture: "llama", numLayers: 32, hiddenSize: 4096, intermediateSize: 14336, numHeads: 32, numKvHeads: 8, vocabSize: 128256, ropeTheta: 5e5, ropeScaling: { type: "none" }, maxPositionEmbeddings: 8192 },
    "qwen2.5-7b": { architecture: "qwen2", numLayers: 28, hiddenSize: 3584, intermediateSize: 18944, numHeads: 28, numKvHeads: 4, vocabSize: 152064, ropeTheta: 1e6, qkvBias: true, oBias: false, tieWordEmbeddings: false, maxPositionEmbeddings: 131072 },
  };
  for (const [name, shape] of Object.entries(shapes)) {
    it(`${name} parses to the published shape, in bf16, with a tokenizer`, () => {
      const dir = join(ROOT, "bench", "configs", name);
      const cfg = loadModelConfig(dir);
      expect(cfg).toMatchObject({ ...shape, headDim: 128, dtype: "bf16" });
      for (const f of ["tokenizer.json", "tokenizer_config.json"]) expect(existsSync(join(dir, f))).toBe(true);
    });
  }
});
