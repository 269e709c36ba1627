// The model's plumbing of deferred LoRA expands (INLAID_LORA_FOLD on the CUDA backend): o's
// term goes to the norm after attention, down's to the next layer's input norm (or the final
// norm), each exactly once; linears that cannot defer run their usual forward. Recorded with
// a stand-in backend (the kernels themselves are checked on a GPU: test/gpu/ops.test.ts).
import { describe, expect, it } from "vitest";
import type { Backend, DeferredLora, PreparedStep, Tensor } from "../src/backend/backend.js";
import { DecoderLayer, type LayerScratch, type RopeTables } from "../src/model/llama.js";
import { forwardIntoNorm, type Linear, type LinearGroup } from "../src/model/linear.js";
import type { ModelConfig } from "../src/model/config.js";

interface Term extends DeferredLora {
  readonly from: string;
}

const tensor = (name: string): Tensor => ({ name }) as unknown as Tensor;

function recorder(): { backend: Backend; calls: string[] } {
  const calls: string[] = [];
  const backend = new Proxy({} as Backend, {
    get: (_t, op: string) => (...args: unknown[]) => {
      const names = args.map((a) => (a && typeof a === "object" && "from" in a ? `term:${(a as Term).from}` : (a as { name?: string })?.name ?? String(a)));
      calls.push(`${op}(${names.filter((n) => n !== "undefined").join(",")})`);
    },
  });
  return { backend, calls };
}

function fakeLinear(group: LinearGroup, calls: string[], defers: boolean): Linear {
  return {
    inDim: 8,
    outDim: 8,
    forward: (out: Tensor) => void calls.push(`${group}.forward(${(out as unknown as { name: string }).name})`),
    ...(defers
      ? {
        forwardDeferred: (out: Tensor): DeferredLora | false => {
          calls.push(`${group}.deferred(${(out as unknown as { name: string }).name})`);
          return { deferredLora: true, from: group } as Term;
        },
      }
      : {}),
  };
}

const SCRATCH = Object.fromEntries(
  ["residual", "normed", "qkv", "q", "k", "v", "attn", "hidden", "gateUp", "act"].map((n) => [n, tensor(n)]),
) as unknown as LayerScratch;
const CONFIG = { rmsNormEps: 1e-5, headDim: 4 } as ModelConfig;
const ROPE = { invFreq: tensor("invFreq"), attnScale: 0.5 } as unknown as RopeTables;

function layer(backend: Backend, calls: string[], defers: boolean): DecoderLayer {
  const groups: LinearGroup[] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];
  return new DecoderLayer(backend, CONFIG, 0, {
    inputNorm: tensor("inNorm"), postAttnNorm: tensor("postNorm"), proj: {}, bias: {},
    linears: Object.fromEntries(groups.map((g) => [g, fakeLinear(g, calls, defers)])),
  }, ROPE);
}

describe("deferred LoRA expands through the decoder layer", () => {
  it("o's term reaches the post-attention norm, down's is returned for the next norm", () => {
    const { backend, calls } = recorder();
    const l = layer(backend, calls, true);
    const step = {} as PreparedStep;
    const prev = { deferredLora: true, from: "prev_down" } as Term;
    const out = l.forward(SCRATCH, step, {} as never, 0, true, prev) as Term;
    expect(out.from).toBe("down_proj");
    expect(calls).toEqual([
      "addRmsnorm(normed,residual,hidden,inNorm,0.00001,term:prev_down)",
      "qkv_proj.forward(qkv)",
      "rope(q,k,v,qkv,invFreq,4,[object Object])",
      "attention(attn,q,k,v,[object Object],0,0.5,[object Object])",
      "o_proj.deferred(hidden)",
      "addRmsnorm(normed,residual,hidden,postNorm,0.00001,term:o_proj)",
      "gate_up_proj.forward(gateUp)",
      "siluMul(act,gateUp)",
      "down_proj.deferred(hidden)",
    ]);
  });

  it("linears that cannot defer run their usual forward and leave no term", () => {
    const { backend, calls } = recorder();
    const out = layer(backend, calls, false).forward(SCRATCH, {} as PreparedStep, {} as never, 0, false);
    expect(out).toBeUndefined();
    expect(calls).toContain("o_proj.forward(hidden)");
    expect(calls).toContain("addRmsnorm(normed,residual,hidden,postNorm,0.00001)");
    expect(calls[0]).toBe("rmsnorm(normed,residual,inNorm,0.00001)");
  });

  it("forwardIntoNorm: a declined deferral falls back to forward", () => {
    const calls: string[] = [];
    const lin: Linear = { ...fakeLinear("o_proj", calls, false), forwardDeferred: () => false };
    expect(forwardIntoNorm(lin, tensor("out"), tensor("x"), {} as PreparedStep)).toBeUndefined();
    expect(calls).toEqual(["o_proj.forward(out)"]);
  });
});
