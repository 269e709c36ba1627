// GPTQ checkpoints served through QuantLinears (the low-bit path the CUDA backend takes),
// run here on the CPU backend, whose linearQuantized is the kernels' reference: the engine
// keeps quantized groups quantized, falls back to dequantized dense weights (with a warning)
// for a fused group whose members' g_idx differ, and gives the logits and tokens of the
// default CPU path (weights dequantized at load).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { CpuBackend } from "../src/backend/cpu/cpu_backend.js";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { loadModelConfig } from "../src/model/config.js";
import { QuantizedLinears } from "../src/quant/load_quantized.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE, DEMO_TASKS } from "./helpers/demo.js";
import { quantizeDemo } from "./helpers/quant_demo.js";

describe("quantized linears through createEngine (CPU reference of the low-bit path)", () => {
  let work: string;
  let dense: Engine, kernels: Engine;
  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), "inlaid-qserve-"));
    quantizeDemo(join(work, "q4"), { bits: 4, groupSize: 64, sym: true, descAct: true });
    quantizeDemo(join(work, "q3split"), { bits: 3, groupSize: 32, sym: false, descAct: true }, { splitQkv: true });
    [dense, kernels] = await Promise.all([
      createEngine({ modelDir: join(work, "q4"), adapters: DEMO_ADAPTERS, device: "cpu" }),
      createEngine({ modelDir: join(work, "q4"), adapters: DEMO_ADAPTERS, device: "cpu", quantKernels: true }),
    ]);
  });
  afterAll(async () => {
    await Promise.all([dense?.close(), kernels?.close()]);
    rmSync(work, { recursive: true, force: true });
  });

  it("loads every fused group quantized; a group whose members disagree on g_idx falls back with a warning", () => {
    const cfg = loadModelConfig(DEMO_BASE);
    const cpu = new CpuBackend();
    const all = QuantizedLinears.load(cpu, cfg, join(work, "q4"), { onWarning: () => { throw new Error("no warning expected"); } });
    expect(all.size).toBe(cfg.numLayers * 4);
    expect(all.fallbacks).toEqual([]);
    const warn = vi.fn();
    const split = QuantizedLinears.load(cpu, cfg, join(work, "q3split"), { onWarning: warn });
    expect(split.size).toBe(cfg.numLayers * 4 - 1);
    expect(split.fallbacks.map((f) => [f.layer, f.group])).toEqual([[0, "qkv_proj"]]);
    expect(split.skip(0, "qkv_proj")).toBe(false);
    expect(split.skip(0, "o_proj")).toBe(true);
    expect(warn).toHaveBeenCalledOnce();
    expect(String(warn.mock.calls[0]![0])).toMatch(/layer 0 qkv_proj .*g_idx differs/);
  });

  it("the fallback checkpoint serves: the dense qkv of layer 0 beside quantized groups", async () => {
    const e = await createEngine({ modelDir: join(work, "q3split"), adapters: DEMO_ADAPTERS, device: "cpu", quantKernels: true });
    try {
      const out = await collect(e.generate({ id: "s", promptIds: e.tokenizer.encode("kto bram zu ="), adapter: "reverse", params: { ...GREEDY, maxTokens: 8 } }));
      expect(out.tokenIds.length).toBeGreaterThan(0);
    } finally {
      await e.close();
    }
  });

  it("logits match the dequantize-at-load path (which rounds weights to bf16; the low-bit path keeps them exact)", () => {
    for (const adapter of [...DEMO_TASKS, null]) {
      const ids = dense.tokenizer.encode("eh dwkg uto biwn xm =");
      const a = dense.lastLogits(ids, adapter), b = kernels.lastLogits(ids, adapter);
      let worst = 0;
      for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
      // bf16 rounding of every weight (relative 2^-9) moves these logits by up to ~0.022 (measured).
      expect(worst, adapter ?? "base").toBeLessThan(0.05);
    }
  });

  it("greedy tokens equal the dequantize-at-load path's with every adapter", async () => {
    for (const adapter of [...DEMO_TASKS, null]) {
      const req = (e: Engine) => collect(e.generate({ id: `g-${adapter}`, promptIds: e.tokenizer.encode("kto bram zu ="), adapter, params: { ...GREEDY, maxTokens: 24 } }));
      const [a, b] = await Promise.all([req(dense), req(kernels)]);
      expect(b.tokenIds, adapter ?? "base").toEqual(a.tokenIds);
    }
  });
});
