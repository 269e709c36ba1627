import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadModelConfig, parseModelConfig, type ModelConfig } from "./config.js";
import { ropeInvFreq } from "./rope.js";

const DEMO = join(import.meta.dirname, "../../examples/demo/base");
const tmp = mkdtempSync(join(tmpdir(), "inlaid-cfg-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// Trimmed copies of the published config.json files.
const LLAMA2_7B = {
  architectures: ["LlamaForCausalLM"], bos_token_id: 1, eos_token_id: 2, hidden_act: "silu", hidden_size: 4096,
  intermediate_size: 11008, max_position_embeddings: 4096, model_type: "llama", num_attention_heads: 32,
  num_hidden_layers: 32, num_key_value_heads: 32, pretraining_tp: 1, rms_norm_eps: 1e-5, rope_scaling: null,
  rope_theta: 10000.0, tie_word_embeddings: false, torch_dtype: "float16", vocab_size: 32000,
};
const LLAMA31_8B = {
  architectures: ["LlamaForCausalLM"], attention_bias: false, bos_token_id: 128000, eos_token_id: [128001, 128008, 128009],
  hidden_act: "silu", hidden_size: 4096, intermediate_size: 14336, max_position_embeddings: 131072, mlp_bias: false,
  model_type: "llama", num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: "llama3" },
  rope_theta: 500000.0, tie_word_embeddings: false, torch_dtype: "bfloat16", vocab_size: 128256,
};
const MISTRAL_7B = {
  architectures: ["MistralForCausalLM"], bos_token_id: 1, eos_token_id: 2, hidden_act: "silu", hidden_size: 4096,
  intermediate_size: 14336, max_position_embeddings: 32768, model_type: "mistral", num_attention_heads: 32,
  num_hidden_layers: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5, rope_theta: 10000.0, sliding_window: 4096,
  tie_word_embeddings: false, torch_dtype: "bfloat16", vocab_size: 32000,
};
const QWEN25_7B = {
  architectures: ["Qwen2ForCausalLM"], bos_token_id: 151643, eos_token_id: 151645, hidden_act: "silu", hidden_size: 3584,
  intermediate_size: 18944, max_position_embeddings: 32768, max_window_layers: 28, model_type: "qwen2",
  num_attention_heads: 28, num_hidden_layers: 28, num_key_value_heads: 4, rms_norm_eps: 1e-6, rope_theta: 1000000.0,
  sliding_window: 131072, tie_word_embeddings: false, torch_dtype: "bfloat16", use_sliding_window: false, vocab_size: 152064,
};
const QWEN25_05B = {
  ...QWEN25_7B, eos_token_id: 151643, hidden_size: 896, intermediate_size: 4864, max_window_layers: 24,
  num_attention_heads: 14, num_hidden_layers: 24, num_key_value_heads: 2, sliding_window: 32768, tie_word_embeddings: true,
  vocab_size: 151936,
};

/** The same config with some fields replaced (undefined deletes the field). */
function edit(base: Record<string, unknown>, changes: Record<string, unknown>): Record<string, unknown> {
  const out = { ...base, ...changes };
  for (const [k, v] of Object.entries(changes)) if (v === undefined) delete out[k];
  return out;
}

describe("parseModelConfig", () => {
  it("reads the demo config (transformers v5 rope_parameters, dtype)", () => {
    const c = loadModelConfig(DEMO);
    expect(c).toEqual({
      architecture: "llama", vocabSize: 512, hiddenSize: 256, intermediateSize: 704, numLayers: 6, numHeads: 8,
      numKvHeads: 4, headDim: 32, rmsNormEps: 1e-5, maxPositionEmbeddings: 512, tieWordEmbeddings: false,
      qkvBias: false, oBias: false, mlpBias: false, ropeTheta: 10000, ropeScaling: { type: "none" },
      slidingWindow: null, bosTokenId: 1, eosTokenIds: [2], dtype: "bf16",
    } satisfies ModelConfig);
  });

  it("reads a Llama-2-7B config (rope_theta, MHA, float16)", () => {
    const c = parseModelConfig(LLAMA2_7B);
    expect(c).toMatchObject({ architecture: "llama", numHeads: 32, numKvHeads: 32, headDim: 128, ropeTheta: 10000, dtype: "f16" });
    expect(c.ropeScaling).toEqual({ type: "none" });
    // Llama-2's original config has no rope_theta at all: transformers' default applies.
    expect(parseModelConfig(edit(LLAMA2_7B, { rope_theta: undefined })).ropeTheta).toBe(10000);
  });

  it("reads a Llama-3.1-8B config (llama3 rope_scaling, eos list, GQA)", () => {
    const c = parseModelConfig(LLAMA31_8B);
    expect(c).toMatchObject({ numKvHeads: 8, headDim: 128, ropeTheta: 500000, eosTokenIds: [128001, 128008, 128009], bosTokenId: 128000, maxPositionEmbeddings: 131072 });
    expect(c.ropeScaling).toEqual({ type: "llama3", factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    // Old spelling `type` instead of `rope_type`, and the v5 rope_parameters form, mean the same.
    const { rope_type: _, ...rest } = LLAMA31_8B.rope_scaling;
    expect(parseModelConfig({ ...LLAMA31_8B, rope_scaling: { ...rest, type: "llama3" } }).ropeScaling).toEqual(c.ropeScaling);
    const v5 = edit(LLAMA31_8B, { rope_scaling: undefined, rope_theta: undefined, torch_dtype: undefined, dtype: "bfloat16", rope_parameters: { ...LLAMA31_8B.rope_scaling, rope_theta: 500000.0 } });
    expect(parseModelConfig(v5)).toEqual(c);
  });

  it("reads attention_bias (llama puts it on q, k, v and o) and mlp_bias", () => {
    const c = parseModelConfig({ ...LLAMA2_7B, attention_bias: true, mlp_bias: true });
    expect(c).toMatchObject({ qkvBias: true, oBias: true, mlpBias: true });
  });

  it("reads linear rope scaling", () => {
    const c = parseModelConfig({ ...LLAMA2_7B, rope_scaling: { type: "linear", factor: 4.0 } });
    expect(c.ropeScaling).toEqual({ type: "linear", factor: 4 });
    const base = ropeInvFreq(parseModelConfig(LLAMA2_7B));
    const scaled = ropeInvFreq(c);
    expect(scaled[5]).toBeCloseTo(base[5]! / 4, 12);
  });

  it("reads a Mistral-7B config (sliding window, GQA 32/8)", () => {
    const c = parseModelConfig(MISTRAL_7B);
    expect(c).toMatchObject({ architecture: "mistral", numHeads: 32, numKvHeads: 8, headDim: 128, slidingWindow: 4096, qkvBias: false, oBias: false, tieWordEmbeddings: false });
    expect(parseModelConfig({ ...MISTRAL_7B, sliding_window: null }).slidingWindow).toBeNull();
  });

  it("reads Qwen2.5 configs (qkv bias, no o bias, stated tie_word_embeddings)", () => {
    const big = parseModelConfig(QWEN25_7B);
    expect(big).toMatchObject({
      architecture: "qwen2", hiddenSize: 3584, numHeads: 28, numKvHeads: 4, headDim: 128, qkvBias: true, oBias: false,
      mlpBias: false, tieWordEmbeddings: false, ropeTheta: 1e6, rmsNormEps: 1e-6, eosTokenIds: [151645],
    });
    // use_sliding_window false: the stated window is not used.
    expect(big.slidingWindow).toBeNull();
    expect(parseModelConfig({ ...QWEN25_7B, use_sliding_window: true }).slidingWindow).toBe(131072);
    const small = parseModelConfig(QWEN25_05B);
    expect(small).toMatchObject({ tieWordEmbeddings: true, headDim: 64, numKvHeads: 2, qkvBias: true });
  });

  it("fills defaults: head_dim from hidden/heads, kv heads from heads, dtype bf16", () => {
    const c = parseModelConfig(edit(LLAMA2_7B, { num_key_value_heads: undefined, torch_dtype: undefined, eos_token_id: null, bos_token_id: undefined }));
    expect(c).toMatchObject({ numKvHeads: 32, headDim: 128, dtype: "bf16", eosTokenIds: [], bosTokenId: null });
    expect(parseModelConfig({ ...LLAMA2_7B, head_dim: 64 }).headDim).toBe(64);
    expect(parseModelConfig({ ...LLAMA2_7B, torch_dtype: "float32" }).dtype).toBe("f32");
    // Infers the family from architectures when model_type is missing.
    expect(parseModelConfig(edit(MISTRAL_7B, { model_type: undefined })).architecture).toBe("mistral");
  });

  it("errors name the field, the problem and the file", () => {
    const bad = (changes: Record<string, unknown>, re: RegExp, base: Record<string, unknown> = LLAMA2_7B) =>
      expect(() => parseModelConfig(edit(base, changes), "/m/config.json")).toThrow(re);
    bad({ model_type: "gemma2" }, /^\/m\/config\.json: model_type "gemma2" is not supported; supported: llama, mistral, qwen2$/);
    bad({ model_type: undefined, architectures: ["GPT2LMHeadModel"] }, /architectures \["GPT2LMHeadModel"\] are not supported/);
    bad({ model_type: undefined, architectures: undefined }, /model_type is missing; supported: llama, mistral, qwen2/);
    bad({ num_attention_heads: 7, num_key_value_heads: 7 }, /\/m\/config\.json: num_attention_heads \(7\) must divide hidden_size \(4096\) when head_dim is not given/);
    bad({ num_key_value_heads: 12 }, /num_key_value_heads \(12\) must divide num_attention_heads \(32\)/);
    bad({ hidden_size: undefined }, /\/m\/config\.json: hidden_size is missing/);
    bad({ vocab_size: "32000" }, /vocab_size must be an integer, got "32000"/);
    bad({ num_hidden_layers: 0 }, /num_hidden_layers must be >= 1, got 0/);
    bad({ head_dim: 63 }, /head_dim \(63\) must be even/);
    bad({ rms_norm_eps: -1 }, /rms_norm_eps must be a positive number/);
    bad({ eos_token_id: [2, -1] }, /eos_token_id must be a token id/);
    bad({ torch_dtype: "float64" }, /torch_dtype "float64" is not supported/);
    bad({ hidden_act: "gelu" }, /hidden_act "gelu" is not supported/);
    bad({ tie_word_embeddings: "yes" }, /tie_word_embeddings must be true or false/);
    bad({ rope_scaling: { type: "yarn", factor: 4 } }, /rope type "yarn" \(rope_scaling\.type\) is not supported; supported: default, linear, llama3/);
    bad({ rope_scaling: { rope_type: "dynamic", factor: 2 } }, /rope type "dynamic" \(rope_scaling\.rope_type\)/);
    bad({ rope_parameters: { rope_type: "longrope", rope_theta: 1e4 } }, /rope type "longrope" \(rope_parameters\.rope_type\) is not supported/);
    bad({ rope_scaling: { ...LLAMA31_8B.rope_scaling, original_max_position_embeddings: undefined } }, /rope_scaling\.original_max_position_embeddings is missing/);
    bad({ rope_scaling: { type: "linear" } }, /rope_scaling\.factor is missing/);
    bad({ partial_rotary_factor: 0.5 }, /partial_rotary_factor 0\.5 is not supported/);
    expect(() => parseModelConfig([1, 2])).toThrow(/config\.json: config\.json must be a JSON object/);
  });

  it("loadModelConfig names the path when the file is missing or not JSON", () => {
    expect(() => loadModelConfig(join(tmp, "nope"))).toThrow(/nope\/config\.json: cannot read it/);
    writeFileSync(join(tmp, "config.json"), "{ not json");
    expect(() => loadModelConfig(tmp)).toThrow(/config\.json: not valid JSON/);
  });
});

describe("ropeInvFreq", () => {
  it("is 1/theta^(2i/d) without scaling", () => {
    const inv = ropeInvFreq(loadModelConfig(DEMO));
    expect(inv.length).toBe(16);
    expect(inv[0]).toBe(1);
    expect(inv[1]).toBeCloseTo(1 / 10000 ** (2 / 32), 7);
    expect(inv[15]).toBeCloseTo(1 / 10000 ** (30 / 32), 10);
  });

  it("follows transformers' llama3 rule for Llama-3.1 (theta 5e5, factor 8, low 1, high 4, orig 8192, d 128)", () => {
    const inv = ropeInvFreq(parseModelConfig(LLAMA31_8B));
    expect(inv.length).toBe(64);
    // The f64 values below, rounded once to f32: allow f32 rounding (relative 1e-7).
    const near = (i: number, want: number) => expect(Math.abs(inv[i]! - want)).toBeLessThanOrEqual(want * 1e-7);
    // Wavelengths 2*pi/inv below 8192/4 = 2048 are kept, above 8192/1 = 8192 divided by 8.
    expect(inv[0]).toBe(1);
    // i = 1: inv = 5e5^(-2/128) = 0.81461723..., wavelen 7.7 -> kept.
    near(1, 0.8146172338565447);
    // i = 28: inv = 0.00321144599..., wavelen 1956.5 < 2048 -> kept.
    near(28, 0.0032114459947525913);
    // i = 32: inv = 1/sqrt(5e5) = 0.00141421356..., wavelen = 2*pi*707.107 = 4442.88 (between):
    // smooth = (8192/4442.88 - 1) / (4 - 1) = 0.281283, result = inv*((1 - smooth)/8 + smooth) = 0.000524846...
    near(32, 0.0005248461609929547);
    near(29, 0.002166570763503359); // smooth 0.803621
    near(34, 0.00017850781276799638); // smooth 0.074527
    // i = 35: wavelen 8218.7 > 8192 -> divided by 8.
    near(35, 0.0007644969883171747 / 8);
    near(63, 2.455140791131609e-6 / 8);
  });
});
