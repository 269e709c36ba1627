import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { HostTensor } from "../backend/backend.js";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../backend/tensor.js";
import { loadModelConfig, parseModelConfig } from "../model/config.js";
import { writeSafetensors } from "../model/safetensors.js";
import { AdapterLoadError, loadPeftAdapter, TARGET_MODULES, type TargetModule } from "./peft.js";

const DEMO = join(import.meta.dirname, "../../examples/demo");
const tmp = mkdtempSync(join(tmpdir(), "inlaid-peft-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// A small GQA model: q out 16, k/v out 8, o in 16, intermediate 24.
const MODEL_JSON = {
  model_type: "llama", vocab_size: 32, hidden_size: 12, intermediate_size: 24, num_hidden_layers: 2,
  num_attention_heads: 4, num_key_value_heads: 2, head_dim: 4,
};
const MODEL = parseModelConfig(MODEL_JSON);
const DIMS: Record<TargetModule, [number, number]> = {
  q_proj: [12, 16], k_proj: [12, 8], v_proj: [12, 8], o_proj: [16, 12],
  gate_proj: [12, 24], up_proj: [12, 24], down_proj: [24, 12],
};
const SUB: Record<TargetModule, string> = {
  q_proj: "self_attn", k_proj: "self_attn", v_proj: "self_attn", o_proj: "self_attn",
  gate_proj: "mlp", up_proj: "mlp", down_proj: "mlp",
};

function values(n: number, seed: number): Float32Array {
  // Small dyadic values, exactly representable in bf16 and f16.
  return Float32Array.from({ length: n }, (_, i) => (((i * 7 + seed * 13) % 17) - 8) / 64);
}

function f32(shape: number[], seed: number): HostTensor {
  return { shape, dtype: "f32", data: values(shape[0]! * shape[1]!, seed) };
}

interface Build {
  config?: Record<string, unknown>;
  modules?: readonly TargetModule[];
  layers?: readonly number[];
  rank?: (layer: number, m: TargetModule) => number;
  dtype?: "f32" | "bf16" | "f16";
  /** Inserted before ".weight", e.g. ".default". */
  adapterName?: string;
  extra?: Record<string, HostTensor>;
  drop?: (name: string) => boolean;
}

const BASE_CONFIG = {
  peft_type: "LORA", r: 4, lora_alpha: 8, bias: "none", fan_in_fan_out: false, use_dora: false, use_rslora: false,
  modules_to_save: null, rank_pattern: {}, alpha_pattern: {}, target_modules: [...TARGET_MODULES], task_type: "CAUSAL_LM",
};

let counter = 0;
function build(b: Build = {}): string {
  const dir = join(tmp, `a${counter++}`);
  mkdirSync(dir);
  const config = { ...BASE_CONFIG, ...b.config };
  writeFileSync(join(dir, "adapter_config.json"), JSON.stringify(config));
  const tensors: Record<string, HostTensor> = {};
  let seed = 0;
  for (const l of b.layers ?? [0, 1]) {
    for (const m of b.modules ?? TARGET_MODULES) {
      const r = b.rank?.(l, m) ?? (config.r as number);
      const [inDim, outDim] = DIMS[m];
      const pre = `base_model.model.model.layers.${l}.${SUB[m]}.${m}`;
      const suffix = `${b.adapterName ?? ""}.weight`;
      tensors[`${pre}.lora_A${suffix}`] = convert(f32([r, inDim], seed++), b.dtype ?? "f32");
      tensors[`${pre}.lora_B${suffix}`] = convert(f32([outDim, r], seed++), b.dtype ?? "f32");
    }
  }
  Object.assign(tensors, b.extra);
  for (const name of Object.keys(tensors)) if (b.drop?.(name)) delete tensors[name];
  writeSafetensors(join(dir, "adapter_model.safetensors"), tensors, { format: "pt" });
  return dir;
}

function convert(t: HostTensor, dtype: "f32" | "bf16" | "f16"): HostTensor {
  const x = t.data as Float32Array;
  if (dtype === "f32") return t;
  return { shape: t.shape, dtype, data: dtype === "bf16" ? f32ToBf16(x) : f32ToF16(x) };
}

function refuse(dir: string, re: RegExp, model = MODEL): void {
  let err: unknown;
  try {
    loadPeftAdapter(dir, model);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(AdapterLoadError);
  expect((err as Error).message).toMatch(re);
  expect((err as Error).message).toContain(dir);
}

describe("loadPeftAdapter", () => {
  it("loads the four demo adapters (r=8, alpha=16, 6 layers x 7 modules)", () => {
    const model = loadModelConfig(join(DEMO, "base"));
    for (const name of ["caesar", "mirror", "reverse", "sort"]) {
      const a = loadPeftAdapter(join(DEMO, "adapters", name), model);
      expect(a.modules.length).toBe(42);
      expect(a.maxRank).toBe(8);
      expect(a.targetModules).toEqual(TARGET_MODULES);
      expect(a.modules.every((m) => m.rank === 8 && m.scale === 2)).toBe(true);
      expect(a.modules.map((m) => `${m.layer}.${m.module}`).slice(0, 8)).toEqual([
        "0.q_proj", "0.k_proj", "0.v_proj", "0.o_proj", "0.gate_proj", "0.up_proj", "0.down_proj", "1.q_proj",
      ]);
      const k = a.modules.find((m) => m.module === "k_proj")!;
      expect([k.inDim, k.outDim, k.a.length, k.b.length]).toEqual([256, 128, 8 * 256, 128 * 8]);
      const down = a.modules.find((m) => m.module === "down_proj")!;
      expect([down.inDim, down.outDim]).toEqual([704, 256]);
      expect(a.sizeBytes).toBe(a.modules.reduce((n, m) => n + 4 * (m.a.length + m.b.length), 0));
      // Trained adapters: B is not all zeros.
      expect(a.modules.some((m) => m.b.some((v) => v !== 0))).toBe(true);
    }
  });

  it("keeps the stored layout: A [rank, in], B [out, rank]", () => {
    const a = loadPeftAdapter(build({ modules: ["q_proj"], layers: [1] }), MODEL);
    expect(a.modules).toHaveLength(1);
    const m = a.modules[0]!;
    expect(m).toMatchObject({ layer: 1, module: "q_proj", rank: 4, scale: 2, inDim: 12, outDim: 16 });
    expect(Array.from(m.a)).toEqual(Array.from(values(4 * 12, 0)));
    expect(Array.from(m.b)).toEqual(Array.from(values(16 * 4, 1)));
  });

  it("scales rsLoRA adapters by alpha / sqrt(r)", () => {
    const a = loadPeftAdapter(build({ config: { r: 4, lora_alpha: 8, use_rslora: true } }), MODEL);
    expect(a.modules.every((m) => m.scale === 8 / 2)).toBe(true);
    const b = loadPeftAdapter(build({ config: { r: 2, lora_alpha: 3, use_rslora: true } }), MODEL);
    expect(b.modules[0]!.scale).toBeCloseTo(3 / Math.SQRT2, 12);
  });

  it("applies rank_pattern and alpha_pattern per module, first matching key wins", () => {
    const rankOf = (l: number, m: TargetModule) => (m === "v_proj" ? 2 : l === 1 && m === "q_proj" ? 8 : m.endsWith("_proj") && SUB[m] === "mlp" ? 6 : 4);
    const dir = build({
      config: {
        r: 4, lora_alpha: 8,
        // "layers.1.self_attn.q_proj" is a dotted suffix, "v_proj" a bare name, "(gate|up|down)_proj" a regex.
        rank_pattern: { "layers.1.self_attn.q_proj": 8, v_proj: 2, "(gate|up|down)_proj": 6 },
        alpha_pattern: { "model.layers.0.self_attn.q_proj": 1, q_proj: 32, "mlp\\..*": 3 },
      },
      rank: rankOf,
    });
    const a = loadPeftAdapter(dir, MODEL);
    const get = (l: number, m: TargetModule) => a.modules.find((x) => x.layer === l && x.module === m)!;
    expect(get(0, "q_proj")).toMatchObject({ rank: 4, scale: 1 / 4 });
    expect(get(1, "q_proj")).toMatchObject({ rank: 8, scale: 32 / 8 });
    expect(get(0, "v_proj")).toMatchObject({ rank: 2, scale: 8 / 2 });
    expect(get(1, "k_proj")).toMatchObject({ rank: 4, scale: 2 });
    expect(get(0, "down_proj")).toMatchObject({ rank: 6, scale: 3 / 6 });
    expect(a.maxRank).toBe(8);
    // A bare key must match a whole name segment: "proj" does not match "q_proj".
    const dir2 = build({ config: { rank_pattern: { proj: 2 } } });
    expect(loadPeftAdapter(dir2, MODEL).maxRank).toBe(4);
  });

  it("says so when the stored rank disagrees with the config", () => {
    refuse(build({ config: { rank_pattern: { q_proj: 8 } } }), /tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has rank 4, but adapter_config\.json gives model\.layers\.0\.self_attn\.q_proj rank 8 \(from rank_pattern key "q_proj"\)/);
    refuse(build({ rank: () => 2 }), /has rank 2, but adapter_config\.json gives .* rank 4 \(from r\)/);
    refuse(build({ config: { rank_pattern: { "q_proj[": 2 } } }), /rank_pattern key "q_proj\[" is not a valid regular expression/);
  });

  it("converts bf16 and f16 weights to f32", () => {
    for (const dtype of ["bf16", "f16"] as const) {
      const a = loadPeftAdapter(build({ dtype, modules: ["o_proj"] }), MODEL);
      const m = a.modules[0]!;
      const back = dtype === "bf16" ? bf16ToF32(f32ToBf16(values(4 * 16, 0))) : f16ToF32(f32ToF16(values(4 * 16, 0)));
      expect(m.a).toBeInstanceOf(Float32Array);
      expect(Array.from(m.a)).toEqual(Array.from(back));
      expect(a.sizeBytes).toBe((4 * 16 + 12 * 4) * 4 * 2);
    }
  });

  it("loads a subset of projections (q, v only) and infers targets from the tensors", () => {
    const a = loadPeftAdapter(build({ modules: ["v_proj", "q_proj"], config: { target_modules: "model\\..*\\.(q|v)_proj" } }), MODEL);
    expect(a.targetModules).toEqual(["q_proj", "v_proj"]);
    expect(a.modules.map((m) => `${m.layer}.${m.module}`)).toEqual(["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]);
  });

  it("accepts .default.weight names", () => {
    const a = loadPeftAdapter(build({ adapterName: ".default" }), MODEL);
    expect(a.modules).toHaveLength(14);
  });

  describe("refuses what it cannot serve, naming it", () => {
    it("non-LoRA peft types, DoRA, modules_to_save, biases, fan_in_fan_out", () => {
      refuse(build({ config: { peft_type: "IA3" } }), /peft_type "IA3" is not supported/);
      refuse(build({ config: { use_dora: true } }), /use_dora is true: DoRA adapters are not supported/);
      refuse(build({ config: { modules_to_save: ["lm_head"] } }), /modules_to_save \["lm_head"\] is not supported/);
      refuse(build({ config: { bias: "lora_only" } }), /bias "lora_only" is not supported.*bias="none"/);
      refuse(build({ config: { lora_bias: true } }), /lora_bias is true/);
      refuse(build({ config: { fan_in_fan_out: true } }), /fan_in_fan_out is true/);
      refuse(build({ config: { layer_replication: [[0, 1]] } }), /layer_replication is set/);
    });

    it("target modules outside the seven projections", () => {
      refuse(build({ config: { target_modules: ["q_proj", "lm_head"] } }), /target module "lm_head" is not supported; LoRA may target only q_proj, k_proj/);
      refuse(build({ config: { target_modules: ["embed_tokens"] } }), /target module "embed_tokens" is not supported/);
      // Found through the tensors when target_modules is a regex.
      const lmHead = { "base_model.model.lm_head.lora_A.weight": f32([4, 12], 1), "base_model.model.lm_head.lora_B.weight": f32([32, 4], 2) };
      refuse(build({ config: { target_modules: ".*" }, extra: lmHead }), /target module "lm_head" \(tensor base_model\.model\.lm_head\.lora_A\.weight\) is not supported/);
      const embed = { "base_model.model.model.embed_tokens.lora_embedding_A": f32([4, 32], 1) };
      refuse(build({ extra: embed }), /target module "embed_tokens" \(tensor base_model\.model\.model\.embed_tokens\.lora_embedding_A, an embedding LoRA\) is not supported/);
      const dora = { "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": { shape: [16], dtype: "f32", data: new Float32Array(16) } as HostTensor };
      refuse(build({ extra: dora }), /DoRA magnitude vector/);
      const saved = { "base_model.model.lm_head.weight": f32([32, 12], 1) };
      refuse(build({ extra: saved }), /tensor base_model\.model\.lm_head\.weight is not a LoRA A\/B weight/);
      const bias = { "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": { shape: [16], dtype: "f32", data: new Float32Array(16) } as HostTensor };
      refuse(build({ extra: bias }), /lora_B bias: lora_bias adapters are not supported/);
    });

    it("layers out of range and shapes that do not match the base model", () => {
      refuse(build({ layers: [0, 2] }), /tensor base_model\.model\.model\.layers\.2\.\S+ is for layer 2, but the base model has 2 layers \(0\.\.1\)/);
      // Same layout, hidden size 16 instead of 12.
      const wider = parseModelConfig({ ...MODEL_JSON, hidden_size: 16 });
      refuse(build({ modules: ["k_proj"] }), /tensor base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight has shape \[4, 12\], expected \[4, 16\]/, wider);
      const wrongB = { "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": f32([20, 4], 3) };
      refuse(build({ modules: ["up_proj"], layers: [0], extra: wrongB }), /up_proj\.lora_B\.weight has shape \[20, 4\], expected \[24, 4\]/);
    });

    it("a lora_B without its lora_A, or the reverse", () => {
      refuse(build({ drop: (n) => n.includes("layers.1.mlp.up_proj.lora_A") }), /module model\.layers\.1\.mlp\.up_proj has lora_A missing/);
      refuse(build({ drop: (n) => n.includes("layers.0.self_attn.o_proj.lora_B") }), /module model\.layers\.0\.self_attn\.o_proj has lora_B missing/);
      refuse(build({ layers: [] }), /contains no LoRA weights/);
    });

    it("non-float tensors", () => {
      const ints = { "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": { shape: [4, 12], dtype: "i32", data: new Int32Array(48) } as HostTensor };
      refuse(build({ modules: ["q_proj"], layers: [0], extra: ints }), /q_proj\.lora_A\.weight has dtype I32; LoRA weights must be F32, F16 or BF16/);
    });

    it("missing files, pickled .bin adapters and truncated safetensors", () => {
      refuse(join(tmp, "does-not-exist"), /is not a folder/);
      const noConfig = build();
      rmSync(join(noConfig, "adapter_config.json"));
      refuse(noConfig, /has no adapter_config\.json/);
      const bin = build();
      rmSync(join(bin, "adapter_model.safetensors"));
      writeFileSync(join(bin, "adapter_model.bin"), "PK\x03\x04 not really");
      refuse(bin, /pickled \.bin adapters are not supported \(never unpickled\); convert to safetensors with/);
      const badJson = build();
      writeFileSync(join(badJson, "adapter_config.json"), "{");
      refuse(badJson, /adapter_config\.json is not valid JSON/);
      const trunc = build();
      const file = join(trunc, "adapter_model.safetensors");
      truncateSync(file, readFileSync(file).length - 10);
      refuse(trunc, /adapter_model\.safetensors is truncated: tensor .* needs bytes \d+\.\.\d+ but the file has \d+; re-download or re-save it/);
    });
  });
});
