// Layer-streamed capture on the CPU backend against the one-pass capture (capture.ts):
// same Hessians up to the f32 rounding of the Gram sums, whatever the chunk size; the
// dummy layer source makes the same tensors as loadLlamaWeights(DUMMY).

import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { CpuBackend } from "../backend/cpu/cpu_backend.js";
import type { Tensor } from "../backend/backend.js";
import { f32ToBf16 } from "../backend/tensor.js";
import { loadPeftAdapter } from "../lora/peft.js";
import { loadModelConfig, type ModelConfig } from "../model/config.js";
import { GROUP_NAMES } from "../model/linear.js";
import { TextTokenizer } from "../model/tokenizer.js";
import { DUMMY, loadLlamaWeights } from "../model/weights.js";
import { calibrationIds, readCalibration } from "./calibration.js";
import { HessianCapture } from "./capture.js";
import type { Hessians } from "./hessian.js";
import { CheckpointLayers, DummyLayers } from "./layer_source.js";
import { streamCapture, type StreamTask } from "./stream_capture.js";

const DEMO = join(import.meta.dirname, "..", "..", "examples", "demo");
const BASE = join(DEMO, "base");
const LIMIT = 4;
const TASKS = ["reverse", "sort"] as const;
const calib = (t: string): string => join(DEMO, "data", t, "calib.jsonl");
const adapterDir = (t: string): string => join(DEMO, "adapters", t);

/** max |a - b| / max |b| over one matrix. */
function relErr(a: Float32Array, b: Float32Array): number {
  let worst = 0, scale = 0;
  for (let i = 0; i < b.length; i++) {
    worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return worst / scale;
}

describe("streamCapture on the CPU backend (demo base)", () => {
  let onePass: Hessians[];
  let tasks: StreamTask[];
  const cfg = loadModelConfig(BASE);

  /** Every layer's per-task Hessians of one stream, merged per task. */
  function stream(stepTokens: number, withAdapter = true): Hessians[] {
    const b = new CpuBackend();
    const src = new CheckpointLayers(b, cfg, BASE);
    const merged = TASKS.map(() => ({ tokens: 0, h: new Map<string, Float32Array>() }));
    const layers: number[] = [];
    streamCapture(b, src, withAdapter ? tasks : tasks.map((t) => ({ ...t, adapter: null })), {
      stepTokens,
      onLayer: (l, perTask) => {
        layers.push(l);
        perTask.forEach((hs, i) => {
          merged[i]!.tokens = hs.tokens;
          for (const [k, v] of hs.h) merged[i]!.h.set(k, v);
        });
      },
    });
    src.close();
    expect(layers).toEqual([...Array(cfg.numLayers).keys()]);
    return merged;
  }

  beforeAll(() => {
    const cap = HessianCapture.open(BASE);
    onePass = TASKS.map((t) => cap.capture({ adapterDir: adapterDir(t), calibPath: calib(t), limit: LIMIT }));
    const tok = TextTokenizer.load(BASE);
    tasks = TASKS.map((t) => ({
      name: t,
      adapter: loadPeftAdapter(adapterDir(t), cfg),
      seqs: readCalibration(calib(t), LIMIT).map((r) => calibrationIds(tok, r)),
    }));
  });

  it("gives the one-pass capture's Hessians (adapters on) up to f32 rounding, in one chunk or several", () => {
    for (const stepTokens of [2048, 64]) {
      const got = stream(stepTokens);
      TASKS.forEach((_, i) => {
        expect(got[i]!.tokens).toBe(onePass[i]!.tokens);
        expect([...got[i]!.h.keys()].sort()).toEqual([...onePass[i]!.h.keys()].sort());
        for (const [site, want] of onePass[i]!.h) expect(relErr(got[i]!.h.get(site)!, want), `${site}, chunks of ${stepTokens}`).toBeLessThan(1e-5);
      });
    }
  });

  it("with adapters off, later layers see other activations (the adapter really is applied)", () => {
    const plain = stream(2048, false);
    const last = `model.layers.${cfg.numLayers - 1}.mlp.down_proj`;
    expect(relErr(plain[0]!.h.get(last)!, onePass[0]!.h.get(last)!)).toBeGreaterThan(0.01);
    const first = "model.layers.0.self_attn.q_proj";
    expect(relErr(plain[0]!.h.get(first)!, onePass[0]!.h.get(first)!)).toBeLessThan(1e-5);
  });
});

describe("DummyLayers", () => {
  const tiny: ModelConfig = { ...loadModelConfig(BASE), numLayers: 2, vocabSize: 64, qkvBias: true, tieWordEmbeddings: false };

  it("makes the tensors loadLlamaWeights(DUMMY) makes, layer by layer", () => {
    const b = new CpuBackend();
    const full = loadLlamaWeights(b, tiny, DUMMY);
    const src = new DummyLayers(b, tiny);
    const same = (x: Tensor, y: Tensor): boolean => Buffer.from(b.read(x).buffer).equals(Buffer.from(b.read(y).buffer));
    expect(same(src.embed(), full.embed)).toBe(true);
    for (let l = 0; l < tiny.numLayers; l++) {
      const lw = src.layer(l);
      for (const g of GROUP_NAMES) expect(same(lw.proj[g]!, full.layers[l]!.proj[g]!), `layer ${l} ${g}`).toBe(true);
      expect(same(lw.bias.qkv_proj!, full.layers[l]!.bias.qkv_proj!)).toBe(true);
      expect(same(lw.inputNorm, full.layers[l]!.inputNorm)).toBe(true);
    }
    // The writer's copy is the stored dtype (bf16 here) of the same values.
    const head = src.tensors().get("lm_head.weight").data as Uint16Array;
    expect(Buffer.from(head.buffer).equals(Buffer.from(f32ToBf16(b.read(full.lmHead) as Float32Array).buffer))).toBe(true);
  });

  it("as the writer's base: every name has the shape and byte size it reads as", () => {
    const b = new CpuBackend();
    const src = new DummyLayers(b, tiny);
    const t = src.tensors();
    const names = t.names();
    expect(names).toContain("model.layers.1.self_attn.k_proj.bias");
    expect(names).toContain("lm_head.weight");
    expect(t.has("model.layers.2.self_attn.q_proj.weight")).toBe(false);
    for (const n of names) {
      const info = t.info(n);
      const h = t.get(n);
      expect(h.shape, n).toEqual(info.shape);
      expect(h.data.byteLength, n).toBe(info.byteLength);
    }
    // A member of a fused group is its rows of the group's tensor.
    const k = t.get("model.layers.1.self_attn.k_proj.weight");
    expect(Buffer.from(k.data.buffer).equals(Buffer.from(f32ToBf16(src.weight(1, "k_proj", src.layer(1))).buffer))).toBe(true);
  });
});
