import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { bf16ToF32 } from "../backend/tensor.js";
import { SafetensorsDir } from "../model/safetensors.js";
import { calibrationIds, readCalibration } from "./calibration.js";
import { HessianCapture } from "./capture.js";
import type { Hessians } from "./hessian.js";

const DEMO = join(import.meta.dirname, "..", "..", "examples", "demo");
const BASE = join(DEMO, "base");
const CALIB = join(DEMO, "data", "reverse", "calib.jsonl");
const ADAPTER = join(DEMO, "adapters", "reverse");
const LIMIT = 6;

describe("HessianCapture on the demo base", () => {
  let cap: HessianCapture;
  let plain: Hessians;
  let lora: Hessians;
  beforeAll(() => {
    cap = HessianCapture.open(BASE);
    plain = cap.capture({ adapterDir: null, calibPath: CALIB, limit: LIMIT }, { stepTokens: 64 });
    lora = cap.capture({ adapterDir: ADAPTER, calibPath: CALIB, limit: LIMIT });
  });

  it("has four sites per layer, q/k/v and gate/up sharing one", () => {
    expect(cap.sites.length).toBe(4 * cap.config.numLayers);
    expect(cap.sites[0]!.linears).toEqual([
      "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
    ]);
    expect([...plain.h.keys()]).toEqual(cap.sites.map((s) => s.name));
  });

  it("counts every calibration token (BOS + prompt + completion) and normalizes per token", () => {
    const rows = readCalibration(CALIB, LIMIT);
    const ids = rows.map((r) => calibrationIds(cap.tokenizer, r));
    expect(ids[0]![0]).toBe(cap.tokenizer.bosTokenId);
    expect(cap.tokenizer.decode(ids[0]!)).toBe(rows[0]!.prompt + rows[0]!.completion);
    const n = ids.reduce((a, s) => a + s.length, 0);
    expect(plain.tokens).toBe(n);
    expect(lora.tokens).toBe(n);
  });

  it("layer 0's attention input is rmsnorm(embedding): H matches a direct computation", () => {
    const src = SafetensorsDir.open(BASE);
    const f32 = (name: string): Float32Array => {
      const t = src.get(name);
      return t.dtype === "bf16" ? bf16ToF32(t.data as Uint16Array) : (t.data as Float32Array);
    };
    const embed = f32("model.embed_tokens.weight");
    const norm = f32("model.layers.0.input_layernorm.weight");
    src.close();
    const H = cap.config.hiddenSize;
    const ids = readCalibration(CALIB, LIMIT).flatMap((r) => calibrationIds(cap.tokenizer, r));
    const want = new Float64Array(H * H);
    for (const id of ids) {
      const x = embed.subarray(id * H, (id + 1) * H);
      let ss = 0;
      for (let i = 0; i < H; i++) ss += x[i]! * x[i]!;
      const inv = 1 / Math.sqrt(ss / H + cap.config.rmsNormEps);
      const y = Array.from(x, (v, i) => Math.fround(Math.fround(v * inv) * norm[i]!));
      for (let i = 0; i < H; i++) for (let j = 0; j < H; j++) want[i * H + j] += y[i]! * y[j]!;
    }
    const got = plain.h.get("model.layers.0.self_attn.q_proj")!;
    let worst = 0, scale = 0;
    for (let i = 0; i < H * H; i++) {
      const w = (2 / ids.length) * want[i]!;
      worst = Math.max(worst, Math.abs(got[i]! - w));
      scale = Math.max(scale, Math.abs(w));
    }
    expect(worst / scale).toBeLessThan(1e-5);
    // Symmetric, with a positive diagonal.
    for (let i = 0; i < H; i++) {
      expect(got[i * H + i]).toBeGreaterThan(0);
      for (let j = 0; j < i; j++) expect(got[i * H + j]).toBe(got[j * H + i]);
    }
  });

  it("the adapter changes what later linears see, not the first layer's input", () => {
    const q0 = "model.layers.0.self_attn.q_proj";
    expect(lora.h.get(q0)).toEqual(plain.h.get(q0));
    const last = cap.sites[cap.sites.length - 1]!.name;
    const a = lora.h.get(last)!, b = plain.h.get(last)!;
    let diff = 0, norm = 0;
    for (let i = 0; i < a.length; i++) {
      diff += (a[i]! - b[i]!) ** 2;
      norm += b[i]! ** 2;
    }
    expect(Math.sqrt(diff / norm)).toBeGreaterThan(0.01);
  });

  it("is deterministic: the same calibration gives the same bytes", () => {
    const again = cap.capture({ adapterDir: null, calibPath: CALIB, limit: LIMIT }, { stepTokens: 64 });
    for (const [k, v] of plain.h) expect(Buffer.from(again.h.get(k)!.buffer).equals(Buffer.from(v.buffer))).toBe(true);
  });
});
