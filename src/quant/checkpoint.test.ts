import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bf16ToF32, f32ToBf16 } from "../backend/tensor.js";
import { loadModelConfig } from "../model/config.js";
import { SafetensorsDir, writeSafetensors } from "../model/safetensors.js";
import { DEMO_BASE } from "../../test/helpers/demo.js";
import { openQuantizedSource, readQuantizedWeights, readQuantSpec, writeQuantizedCheckpoint } from "./checkpoint.js";
import { moduleSpec, parseGptqConfig, QuantConfigError, readGptqConfig } from "./gptq_config.js";
import { packGptq } from "./gptq_pack.js";
import { quantizeRtn } from "./rtn.js";
import { linearModules } from "./modules.js";
import { quantizeModelRtn } from "./rtn.js";
import { dequantize, type QuantizedWeight, type QuantSpec } from "./types.js";

const SPEC: QuantSpec = { bits: 4, groupSize: 64, sym: false, descAct: false };

let work: string;
let weights: Map<string, QuantizedWeight>;

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), "inlaid-ckpt-"));
  const src = SafetensorsDir.open(DEMO_BASE);
  try {
    weights = quantizeModelRtn(src, loadModelConfig(DEMO_BASE), SPEC);
  } finally {
    src.close();
  }
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Byte equality of two typed arrays of one kind (vitest's toEqual is slow on millions of elements). */
function sameBytes(a: ArrayBufferView, b: ArrayBufferView): boolean {
  return a.constructor === b.constructor && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function sameWeight(a: QuantizedWeight, b: QuantizedWeight, what: string): void {
  expect(a.spec, what).toEqual(b.spec);
  expect([a.inDim, a.outDim], what).toEqual([b.inDim, b.outDim]);
  for (const k of ["codes", "scales", "zeros", "gIdx"] as const) expect(sameBytes(a[k], b[k]), `${what}.${k}`).toBe(true);
}

/** A model folder with the given config.json fields (and optionally a quantize_config.json). */
function fakeDir(name: string, config: Record<string, unknown>, quantizeConfig?: unknown): string {
  const d = join(work, name);
  mkdirSync(d, { recursive: true });
  writeFileSync(join(d, "config.json"), JSON.stringify(config));
  if (quantizeConfig !== undefined) writeFileSync(join(d, "quantize_config.json"), JSON.stringify(quantizeConfig));
  return d;
}

describe("quantization_config", () => {
  it("an unquantized folder has no spec", () => {
    expect(readQuantSpec(DEMO_BASE)).toBeNull();
  });

  it("reads config.json's quantization_config, with GPTQ's defaults for sym and desc_act", () => {
    const d = fakeDir("q1", { model_type: "llama", quantization_config: { quant_method: "gptq", bits: 3, group_size: 128 } });
    expect(readQuantSpec(d)).toEqual({ bits: 3, groupSize: 128, sym: true, descAct: false });
    expect(readGptqConfig(d)!.format).toBe("gptq");
  });

  it("falls back to AutoGPTQ's quantize_config.json (no quant_method there)", () => {
    const d = fakeDir("q2", { model_type: "llama" }, { bits: 8, group_size: -1, desc_act: true, sym: false, checkpoint_format: "gptq_v2" });
    expect(readQuantSpec(d)).toEqual({ bits: 8, groupSize: -1, sym: false, descAct: true });
    expect(readGptqConfig(d)!.format).toBe("gptq_v2");
  });

  it("reads transformers' newer `format` field", () => {
    expect(parseGptqConfig({ bits: 4, group_size: 32, format: "gptq_v2" }, "x").format).toBe("gptq_v2");
  });

  const refusals: [string, Record<string, unknown>, RegExp][] = [
    ["another method", { quant_method: "awq", bits: 4, group_size: 128 }, /quant_method "awq" is not supported; only GPTQ/],
    ["5 bits", { quant_method: "gptq", bits: 5, group_size: 128 }, /bits 5 is not supported/],
    ["group size 0", { quant_method: "gptq", bits: 4, group_size: 0 }, /group_size must be a positive integer or -1/],
    ["no group size", { quant_method: "gptq", bits: 4 }, /group_size is missing/],
    ["Marlin layout", { quant_method: "gptq", bits: 4, group_size: 128, checkpoint_format: "marlin" }, /checkpoint_format "marlin" is not supported; supported: gptq, gptq_v2/],
    ["is_marlin_format", { bits: 4, group_size: 128, is_marlin_format: true }, /Marlin's repacked layout/],
    ["int16 packing", { bits: 4, group_size: 128, pack_dtype: "int16" }, /pack_dtype "int16" is not supported/],
    ["sym as a string", { bits: 4, group_size: 128, sym: "yes" }, /sym must be true or false/],
    ["a bad dynamic regex", { bits: 4, group_size: 128, dynamic: { "+:(": { bits: 8 } } }, /dynamic rule "\+:\(" is not a regular expression/],
  ];
  for (const [what, qc, re] of refusals) {
    it(`refuses ${what} with a message naming it`, () => {
      const d = fakeDir(`bad-${what.replace(/\W/g, "")}`, { model_type: "llama", quantization_config: qc });
      expect(() => readQuantSpec(d)).toThrow(QuantConfigError);
      expect(() => readQuantSpec(d)).toThrow(re);
    });
  }

  it("GPTQModel's dynamic rules: first match from the start of the name wins; -: excludes", () => {
    const cfg = parseGptqConfig(
      { bits: 4, group_size: 128, dynamic: { "-:.*down_proj": {}, "+:model\\.layers\\.0\\.": { bits: 8, group_size: 64 }, "+:.*": { sym: false } } },
      "x",
    );
    expect(moduleSpec(cfg, "model.layers.0.self_attn.q_proj")).toEqual({ bits: 8, groupSize: 64, sym: true, descAct: false });
    expect(moduleSpec(cfg, "model.layers.1.self_attn.q_proj")).toEqual({ bits: 4, groupSize: 128, sym: false, descAct: false });
    expect(moduleSpec(cfg, "model.layers.0.mlp.down_proj")).toBeNull();
    // Anchored at the start only, as Python's re.match.
    expect(moduleSpec(parseGptqConfig({ bits: 4, group_size: 8, dynamic: { "+:layers": { bits: 2 } } }, "x"), "model.layers.0.mlp.up_proj")!.bits).toBe(4);
  });
});

describe("writeQuantizedCheckpoint / readQuantizedWeights", () => {
  let out: string;
  beforeAll(() => {
    out = join(work, "demo-rtn4");
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: out, spec: SPEC, weights });
  });

  it("writes an HF folder: config with quantization_config, quantize_config.json, tokenizer files, one safetensors file", () => {
    const files = readdirSync(out).sort();
    expect(files).toEqual(["config.json", "generation_config.json", "model.safetensors", "quantize_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]);
    const cfg = JSON.parse(readFileSync(join(out, "config.json"), "utf8"));
    expect(cfg.quantization_config).toMatchObject({ quant_method: "gptq", bits: 4, group_size: 64, sym: false, desc_act: false, checkpoint_format: "gptq", damp_percent: 0.01 });
    expect(cfg.hidden_size).toBe(256);
    expect(JSON.parse(readFileSync(join(out, "quantize_config.json"), "utf8"))).toEqual(cfg.quantization_config);
    expect(readFileSync(join(out, "tokenizer.json")).equals(readFileSync(join(DEMO_BASE, "tokenizer.json")))).toBe(true);
    // config.ts reads a quantized config.json like any other.
    expect(loadModelConfig(out)).toEqual(loadModelConfig(DEMO_BASE));
    expect(readQuantSpec(out)).toEqual(SPEC);
  });

  it("stores the four GPTQ tensors per module with HF names, and every other tensor byte for byte", () => {
    const st = SafetensorsDir.open(out), base = SafetensorsDir.open(DEMO_BASE);
    try {
      expect(st.files[0]!.metadata).toEqual({ format: "pt" });
      const q = "model.layers.0.self_attn.q_proj";
      expect(st.has(`${q}.weight`)).toBe(false);
      expect(st.info(`${q}.qweight`)).toMatchObject({ fileDtype: "I32", shape: [32, 256] });
      expect(st.info(`${q}.qzeros`)).toMatchObject({ fileDtype: "I32", shape: [4, 32] });
      expect(st.info(`${q}.scales`)).toMatchObject({ fileDtype: "F16", shape: [4, 256] });
      expect(st.info(`${q}.g_idx`)).toMatchObject({ fileDtype: "I32", shape: [256] });
      const passed = base.names().filter((n) => !weights.has(n.replace(/\.weight$/, "")));
      expect(passed).toContain("lm_head.weight");
      expect(passed).toContain("model.embed_tokens.weight");
      for (const n of passed) {
        const [a, b] = [st.get(n), base.get(n)];
        expect([a.dtype, a.shape], n).toEqual([b.dtype, b.shape]);
        expect(sameBytes(a.data, b.data), n).toBe(true);
      }
      expect(st.names().length).toBe(passed.length + 4 * weights.size);
    } finally {
      st.close();
      base.close();
    }
  });

  it("reads back exactly the weights it was given", () => {
    const back = readQuantizedWeights(out);
    expect([...back.keys()].sort()).toEqual(linearModules(loadModelConfig(DEMO_BASE)).map((m) => m.name).sort());
    for (const [name, q] of weights) sameWeight(back.get(name)!, q, name);
  });

  it("is deterministic: the same weights give byte-identical files", () => {
    const again = join(work, "demo-rtn4-again");
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: again, spec: SPEC, weights });
    for (const f of readdirSync(out)) expect(readFileSync(join(again, f)).equals(readFileSync(join(out, f))), f).toBe(true);
  });

  it("shards with an index when the tensors exceed the shard size, and reads back the same", () => {
    const sharded = join(work, "demo-sharded");
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: sharded, spec: SPEC, weights, maxShardBytes: 1 << 20 });
    const shards = readdirSync(sharded).filter((f) => f.endsWith(".safetensors"));
    expect(shards.length).toBeGreaterThan(2);
    expect(shards[0]).toMatch(/^model-00001-of-000\d\d\.safetensors$/);
    const index = JSON.parse(readFileSync(join(sharded, "model.safetensors.index.json"), "utf8"));
    expect(Object.keys(index.weight_map).length).toBe(SafetensorsDir.open(out).names().length);
    const back = readQuantizedWeights(sharded);
    for (const [name, q] of weights) sameWeight(back.get(name)!, q, name);
  });

  it("refuses weights with another spec, unknown module names and mismatched shapes, leaving nothing behind", () => {
    const dest = join(work, "refused");
    const q = weights.get("model.layers.0.self_attn.q_proj")!;
    const cases: [Map<string, QuantizedWeight>, RegExp][] = [
      [new Map([["model.layers.0.self_attn.q_proj", { ...q, spec: { ...SPEC, bits: 8 } }]]), /was quantized 8-bit.*but the checkpoint is 4-bit/],
      [new Map([["layers.0.q_proj", q]]), /has no tensor layers\.0\.q_proj\.weight; module names must be HF names/],
      [new Map([["model.layers.0.self_attn.k_proj", q]]), /quantized as \[out 256, in 256\] but the base's .*k_proj\.weight is \[128, 256\]/],
    ];
    for (const [w, re] of cases) expect(() => writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dest, spec: SPEC, weights: w })).toThrow(re);
    expect(existsSync(dest)).toBe(false);
    expect(() => writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: DEMO_BASE, spec: SPEC, weights })).toThrow(/is the base model folder/);
    expect(() => writeQuantizedCheckpoint({ baseDir: out, outDir: dest, spec: SPEC, weights })).toThrow(/already quantized/);
  });
});

describe("atomic writes", () => {
  const leftovers = (dir: string) => readdirSync(dir).filter((f) => f.includes(".tmp-") || f.includes(".old-"));

  it("extra() writes into the folder before it appears", () => {
    const dest = join(work, "atomic", "with-extra");
    let sawDest: boolean | null = null;
    writeQuantizedCheckpoint({
      baseDir: DEMO_BASE, outDir: dest, spec: SPEC, weights,
      extra: (tmp) => {
        sawDest = existsSync(dest);
        mkdirSync(join(tmp, "mlgptq"));
        writeFileSync(join(tmp, "mlgptq", "tasks.json"), "[]");
      },
    });
    expect(sawDest).toBe(false);
    expect(readFileSync(join(dest, "mlgptq", "tasks.json"), "utf8")).toBe("[]");
    expect(leftovers(join(work, "atomic"))).toEqual([]);
  });

  it("when extra() throws, no folder and no temp folder is left", () => {
    const dest = join(work, "atomic", "failed");
    expect(() =>
      writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dest, spec: SPEC, weights, extra: () => { throw new Error("solver died"); } }),
    ).toThrow("solver died");
    expect(existsSync(dest)).toBe(false);
    expect(leftovers(join(work, "atomic"))).toEqual([]);
  });

  it("a failed rewrite leaves the existing checkpoint untouched; a successful one replaces it", () => {
    const dest = join(work, "atomic", "existing");
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dest, spec: SPEC, weights, extra: (t) => writeFileSync(join(t, "marker"), "v1") });
    const before = readFileSync(join(dest, "model.safetensors"));
    expect(() =>
      writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dest, spec: SPEC, weights, extra: () => { throw new Error("disk full"); } }),
    ).toThrow("disk full");
    expect(readFileSync(join(dest, "marker"), "utf8")).toBe("v1");
    expect(readFileSync(join(dest, "model.safetensors")).equals(before)).toBe(true);

    const spec8: QuantSpec = { ...SPEC, bits: 8 };
    const src = SafetensorsDir.open(DEMO_BASE);
    const w8 = quantizeModelRtn(src, loadModelConfig(DEMO_BASE), spec8);
    src.close();
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dest, spec: spec8, weights: w8 });
    expect(existsSync(join(dest, "marker"))).toBe(false);
    expect(readQuantSpec(dest)).toEqual(spec8);
    expect(leftovers(join(work, "atomic"))).toEqual([]);
  });
});

describe("openQuantizedSource", () => {
  it("answers .weight of quantized modules with the dequantized bf16 tensor and passes the rest through", () => {
    const dir = join(work, "demo-src");
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: dir, spec: SPEC, weights });
    const src = openQuantizedSource(dir), base = SafetensorsDir.open(DEMO_BASE);
    try {
      expect(src.names()).toEqual(base.names());
      const name = "model.layers.3.mlp.down_proj";
      expect(src.has(`${name}.weight`)).toBe(true);
      expect(src.has(`${name}.qweight`)).toBe(true);
      expect(src.has("model.layers.3.mlp.nope.weight")).toBe(false);
      const t = src.get(`${name}.weight`);
      expect(t.dtype).toBe("bf16");
      expect(t.shape).toEqual([256, 704]);
      expect(sameBytes(t.data, f32ToBf16(dequantize(weights.get(name)!)))).toBe(true);
      // Close to the original weights: within a quantization step (plus bf16 rounding).
      const w = bf16ToF32(base.get(`${name}.weight`).data as Uint16Array), d = bf16ToF32(t.data as Uint16Array);
      const maxScale = Math.max(...weights.get(name)!.scales);
      let worst = 0;
      for (let i = 0; i < w.length; i++) worst = Math.max(worst, Math.abs(w[i]! - d[i]!) - Math.abs(w[i]!) / 128);
      expect(worst).toBeLessThanOrEqual(maxScale / 2);
      expect(src.get("model.norm.weight")).toEqual(base.get("model.norm.weight"));
    } finally {
      src.close();
      base.close();
    }
  });

  it("gives f32 when config.json's dtype is float32", () => {
    const dir = join(work, "demo-src");
    const f32dir = join(work, "demo-src-f32");
    mkdirSync(f32dir);
    for (const f of readdirSync(dir)) writeFileSync(join(f32dir, f), readFileSync(join(dir, f)));
    const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    writeFileSync(join(f32dir, "config.json"), JSON.stringify({ ...cfg, dtype: "float32" }));
    const src = openQuantizedSource(f32dir);
    try {
      const t = src.get("model.layers.0.mlp.up_proj.weight");
      expect(t.dtype).toBe("f32");
      expect(sameBytes(t.data, dequantize(weights.get("model.layers.0.mlp.up_proj")!))).toBe(true);
    } finally {
      src.close();
    }
  });
});

describe("checkpoints from other writers", () => {
  it("reads a GPTQModel-style folder: gptq_v2 zeros, quantize_config.json only, dynamic per-module bits and exclusions, no g_idx", () => {
    const dir = join(work, "foreign");
    mkdirSync(dir);
    writeFileSync(join(dir, "config.json"), readFileSync(join(DEMO_BASE, "config.json")));
    writeFileSync(
      join(dir, "quantize_config.json"),
      JSON.stringify({ bits: 4, group_size: 32, sym: false, desc_act: false, checkpoint_format: "gptq_v2", dynamic: { "+:.*\\.k_proj": { bits: 8 }, "-:.*\\.v_proj": {} } }),
    );
    const base = SafetensorsDir.open(DEMO_BASE);
    const tensors: Record<string, ReturnType<typeof base.get>> = {};
    const expected = new Map<string, QuantizedWeight>();
    for (const n of base.names()) {
      const m = n.replace(/\.weight$/, "");
      const t = base.get(n);
      if (!/\.(q_proj|k_proj)$/.test(m)) {
        tensors[n] = t; // v_proj (excluded), the MLP, norms and embeddings stay dense
        continue;
      }
      const spec: QuantSpec = { bits: m.endsWith("k_proj") ? 8 : 4, groupSize: 32, sym: false, descAct: false };
      const q = quantizeRtn(bf16ToF32(t.data as Uint16Array), t.shape[0]!, t.shape[1]!, spec);
      // A zero point of 0 is legal in v2.
      q.zeros[0] = 0;
      expected.set(m, q);
      const p = packGptq(q, "gptq_v2");
      Object.assign(tensors, { [`${m}.qweight`]: p.qweight, [`${m}.qzeros`]: p.qzeros, [`${m}.scales`]: p.scales });
    }
    base.close();
    writeSafetensors(join(dir, "model.safetensors"), tensors);

    expect(readQuantSpec(dir)).toEqual({ bits: 4, groupSize: 32, sym: false, descAct: false });
    const back = readQuantizedWeights(dir);
    expect([...back.keys()].sort()).toEqual([...expected.keys()].sort());
    for (const [m, q] of expected) sameWeight(back.get(m)!, q, m);
    const src = openQuantizedSource(dir);
    try {
      const ref = SafetensorsDir.open(DEMO_BASE);
      expect(src.names()).toEqual(ref.names());
      ref.close();
      const k = "model.layers.2.self_attn.k_proj";
      expect(sameBytes(src.get(`${k}.weight`).data, f32ToBf16(dequantize(expected.get(k)!)))).toBe(true);
      expect(src.get("model.layers.2.self_attn.v_proj.weight").shape).toEqual([128, 256]);
    } finally {
      src.close();
    }
  });
});
