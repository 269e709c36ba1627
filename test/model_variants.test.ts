// Mistral, Qwen2 (q/k/v bias, tied embeddings) and Llama-3 (rope scaling) shapes with
// random weights: the engine's paged, batched forward against a plain dense forward
// written here from the equations, and the same greedy tokens.

import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { HostTensor } from "../src/backend/backend.js";
import { uniform } from "../src/backend/rng.js";
import { createEngine } from "../src/engine/engine.js";
import { parseModelConfig, type ModelConfig } from "../src/model/config.js";
import { ropeInvFreq } from "../src/model/rope.js";
import { writeSafetensors } from "../src/model/safetensors.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_BASE } from "./helpers/demo.js";

const H = 64, I = 96, V = 512, L = 2, NH = 4, NKV = 2, D = 16;

const CONFIGS: Record<string, object> = {
  mistral: {
    architectures: ["MistralForCausalLM"], model_type: "mistral", hidden_size: H, intermediate_size: I, num_hidden_layers: L,
    num_attention_heads: NH, num_key_value_heads: NKV, head_dim: D, vocab_size: V, max_position_embeddings: 256,
    rms_norm_eps: 1e-5, rope_theta: 1000000.0, sliding_window: null, tie_word_embeddings: false, torch_dtype: "bfloat16",
    bos_token_id: 1, eos_token_id: 2,
  },
  qwen2: {
    architectures: ["Qwen2ForCausalLM"], model_type: "qwen2", hidden_size: H, intermediate_size: I, num_hidden_layers: L,
    num_attention_heads: NH, num_key_value_heads: NKV, vocab_size: V, max_position_embeddings: 256, rms_norm_eps: 1e-6,
    rope_theta: 10000.0, tie_word_embeddings: true, use_sliding_window: false, torch_dtype: "float32", bos_token_id: 1, eos_token_id: 2,
  },
  llama3: {
    architectures: ["LlamaForCausalLM"], model_type: "llama", hidden_size: H, intermediate_size: I, num_hidden_layers: L,
    num_attention_heads: NH, num_key_value_heads: NKV, vocab_size: V, max_position_embeddings: 256, rms_norm_eps: 1e-5,
    rope_theta: 500000.0, rope_scaling: { rope_type: "llama3", factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 },
    tie_word_embeddings: false, torch_dtype: "float16", bos_token_id: 1, eos_token_id: 2,
  },
};

type W = Record<string, Float32Array>;

function randomWeights(cfg: ModelConfig, seed: number): { w: W; shapes: Record<string, number[]> } {
  const w: W = {}, shapes: Record<string, number[]> = {};
  let s = seed;
  const add = (name: string, shape: number[], scale: number, offset = 0) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const x = new Float32Array(n);
    s++;
    for (let i = 0; i < n; i++) x[i] = offset + (uniform(s, i) * 2 - 1) * scale;
    w[name] = x;
    shapes[name] = shape;
  };
  const qd = cfg.numHeads * cfg.headDim, kvd = cfg.numKvHeads * cfg.headDim;
  add("model.embed_tokens.weight", [V, H], 1);
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [H], 0.2, 1);
    add(`${p}.post_attention_layernorm.weight`, [H], 0.2, 1);
    add(`${p}.self_attn.q_proj.weight`, [qd, H], 0.3);
    add(`${p}.self_attn.k_proj.weight`, [kvd, H], 0.3);
    add(`${p}.self_attn.v_proj.weight`, [kvd, H], 0.3);
    add(`${p}.self_attn.o_proj.weight`, [H, qd], 0.2);
    if (cfg.qkvBias) {
      add(`${p}.self_attn.q_proj.bias`, [qd], 0.5);
      add(`${p}.self_attn.k_proj.bias`, [kvd], 0.5);
      add(`${p}.self_attn.v_proj.bias`, [kvd], 0.5);
    }
    add(`${p}.mlp.gate_proj.weight`, [I, H], 0.2);
    add(`${p}.mlp.up_proj.weight`, [I, H], 0.2);
    add(`${p}.mlp.down_proj.weight`, [H, I], 0.2);
  }
  add("model.norm.weight", [H], 0.2, 1);
  if (!cfg.tieWordEmbeddings) add("lm_head.weight", [V, H], 0.3);
  return { w, shapes };
}

/** Plain dense forward over the whole prompt; returns logits at every position. */
function denseForward(cfg: ModelConfig, w: W, ids: number[]): Float64Array[] {
  const T = ids.length, qd = cfg.numHeads * cfg.headDim;
  const mm = (x: Float64Array[], wt: Float32Array, out: number, bias?: Float32Array) =>
    x.map((row) => {
      const y = new Float64Array(out);
      for (let j = 0; j < out; j++) {
        let acc = bias ? bias[j]! : 0;
        for (let k = 0; k < row.length; k++) acc += row[k]! * wt[j * row.length + k]!;
        y[j] = acc;
      }
      return y;
    });
  const norm = (x: Float64Array[], g: Float32Array) =>
    x.map((row) => {
      const ms = row.reduce((a, b) => a + b * b, 0) / row.length;
      return row.map((v, i) => (v / Math.sqrt(ms + cfg.rmsNormEps)) * g[i]!);
    });
  const inv = ropeInvFreq(cfg);
  const rope = (x: Float64Array[], heads: number) =>
    x.forEach((row, pos) => {
      for (let h = 0; h < heads; h++) {
        const o = h * cfg.headDim, half = cfg.headDim / 2;
        for (let i = 0; i < half; i++) {
          const a = pos * inv[i]!, c = Math.cos(a), s = Math.sin(a);
          const x1 = row[o + i]!, x2 = row[o + i + half]!;
          row[o + i] = x1 * c - x2 * s;
          row[o + i + half] = x2 * c + x1 * s;
        }
      }
    });
  let h = ids.map((id) => Float64Array.from(w["model.embed_tokens.weight"]!.subarray(id * H, (id + 1) * H)));
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}`;
    const x = norm(h, w[`${p}.input_layernorm.weight`]!);
    const q = mm(x, w[`${p}.self_attn.q_proj.weight`]!, qd, w[`${p}.self_attn.q_proj.bias`]);
    const k = mm(x, w[`${p}.self_attn.k_proj.weight`]!, cfg.numKvHeads * cfg.headDim, w[`${p}.self_attn.k_proj.bias`]);
    const v = mm(x, w[`${p}.self_attn.v_proj.weight`]!, cfg.numKvHeads * cfg.headDim, w[`${p}.self_attn.v_proj.bias`]);
    rope(q, cfg.numHeads);
    rope(k, cfg.numKvHeads);
    const att = q.map((qr, t) => {
      const out = new Float64Array(qd);
      for (let hh = 0; hh < cfg.numHeads; hh++) {
        const g = Math.floor(hh / (cfg.numHeads / cfg.numKvHeads));
        const sc = Array.from({ length: t + 1 }, (_, j) => {
          let d = 0;
          for (let e = 0; e < cfg.headDim; e++) d += qr[hh * cfg.headDim + e]! * k[j]![g * cfg.headDim + e]!;
          return d / Math.sqrt(cfg.headDim);
        });
        const m = Math.max(...sc), ex = sc.map((s) => Math.exp(s - m)), z = ex.reduce((a, b) => a + b, 0);
        for (let e = 0; e < cfg.headDim; e++) {
          let acc = 0;
          for (let j = 0; j <= t; j++) acc += (ex[j]! / z) * v[j]![g * cfg.headDim + e]!;
          out[hh * cfg.headDim + e] = acc;
        }
      }
      return out;
    });
    const o = mm(att, w[`${p}.self_attn.o_proj.weight`]!, H);
    h = h.map((row, t) => row.map((val, i) => val + o[t]![i]!));
    const x2 = norm(h, w[`${p}.post_attention_layernorm.weight`]!);
    const gt = mm(x2, w[`${p}.mlp.gate_proj.weight`]!, I), up = mm(x2, w[`${p}.mlp.up_proj.weight`]!, I);
    const act = gt.map((row, t) => row.map((g, i) => (g / (1 + Math.exp(-g))) * up[t]![i]!));
    const dn = mm(act, w[`${p}.mlp.down_proj.weight`]!, H);
    h = h.map((row, t) => row.map((val, i) => val + dn[t]![i]!));
  }
  const head = cfg.tieWordEmbeddings ? w["model.embed_tokens.weight"]! : w["lm_head.weight"]!;
  return mm(norm(h, w["model.norm.weight"]!), head, V);
}

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

describe("model variants with random weights", () => {
  for (const [name, json] of Object.entries(CONFIGS)) {
    it(`${name}: paged engine forward equals a dense forward; greedy tokens agree`, async () => {
      const cfg = parseModelConfig(json);
      const dir = mkdtempSync(join(tmpdir(), `inlaid-${name}-`));
      dirs.push(dir);
      writeFileSync(join(dir, "config.json"), JSON.stringify(json));
      for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(DEMO_BASE, f), join(dir, f));
      const { w, shapes } = randomWeights(cfg, name.length * 1000);
      const tensors: Record<string, HostTensor> = {};
      for (const [k, x] of Object.entries(w)) tensors[k] = { shape: shapes[k]!, dtype: "f32", data: x };
      // Two shards with an index, as large checkpoints come.
      const names = Object.keys(tensors).sort();
      const half = Math.ceil(names.length / 2);
      const shard = (part: string[], file: string) => writeSafetensors(join(dir, file), Object.fromEntries(part.map((k) => [k, tensors[k]!])));
      shard(names.slice(0, half), "model-00001-of-00002.safetensors");
      shard(names.slice(half), "model-00002-of-00002.safetensors");
      const weight_map = Object.fromEntries(names.map((k, i) => [k, i < half ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors"]));
      writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map }));

      const engine = await createEngine({ modelDir: dir, device: "cpu", maxBatch: 4 });
      try {
        const prompt = [1, 40, 41, 300, 7, 99, 250, 3, 77, 500, 12, 64, 65, 66, 70, 80, 90, 100];
        const ref = denseForward(cfg, w, prompt);
        const got = engine.lastLogits(prompt, null);
        const want = ref.at(-1)!;
        let worst = 0;
        for (let i = 0; i < V; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
        expect(worst).toBeLessThan(1e-3);
        // Greedy continuation: each token is the dense model's argmax at that point.
        const out = await collect(engine.generate({ id: name, promptIds: prompt, adapter: null, params: { ...GREEDY, maxTokens: 6, ignoreEos: true } }));
        const ids = [...prompt];
        for (const tok of out.tokenIds) {
          const logits = denseForward(cfg, w, ids).at(-1)!;
          let best = 0;
          for (let i = 1; i < V; i++) if (logits[i]! > logits[best]!) best = i;
          expect(tok).toBe(best);
          ids.push(tok);
        }
      } finally {
        await engine.close();
      }
    });
  }
});
