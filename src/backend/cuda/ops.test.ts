// CPU-runnable checks of the kernel seam: every launch ops.ts makes names a kernel that
// the .cu sources define, with the argument count and kinds the kernel declares, and
// grid / block shapes the hardware accepts; the .cu files only include what NVRTC has;
// nvcc compiles them when it is on PATH (skipped otherwise). The kernels' numerics are
// checked against the CPU backend on the GPU machine (test/gpu/ops.test.ts).

import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { uniform } from "../rng.js";
import type { DeviceKv, DeviceLora, DeviceStep, Operand, StepRun } from "./device_ops.js";
import type { Dim3, KernelArg, Launcher } from "./launch.js";
import {
  CudaOps, CudaOpsError, KERNEL_FILES, SUPPORTED_HEAD_DIMS, attentionScratchBytes, decodeCounterOffset, decodeSmemBytes, decodeSplit,
  dummyWeightValue, expandPerThread, kernelNames, PDL_KERNELS,
  type StepKinds,
} from "./ops.js";
import {
  QuantOps, dequantChunkCols, fusedCarriesShrink, fusedSmemBytes, kSplitApplies, kSplitCandidates, kSplitLaunch, kSplitSmem, quantKernelNames,
  type DeviceQuantWeight,
} from "./quant_ops.js";
import type { QuantBits } from "../../quant/types.js";

const KERNEL_DIR = dirname(KERNEL_FILES[0]!);

type Kind = "ptr" | "i32" | "u32" | "f32";

/** Kernel name -> parameter kinds (and body), from the sources with their instantiation macros expanded. */
function parseKernels(): Map<string, Kind[]> {
  return parseSources().kinds;
}

function parseSources(): { kinds: Map<string, Kind[]>; bodies: Map<string, string>; params: Map<string, string[]> } {
  const files = readdirSync(KERNEL_DIR).filter((f) => /\.(cu|cuh)$/.test(f));
  let text = files.map((f) => readFileSync(join(KERNEL_DIR, f), "utf8")).join("\n");
  text = text.replace(/\\\n/g, " ");
  // Macro arguments split at top-level commas (an argument may be __cluster_dims__(1, 1, 2)).
  const list = (args: string): string[] => {
    const out: string[] = [];
    let depth = 0, cur = "";
    for (const ch of args) {
      if (ch === "," && depth === 0) {
        out.push(cur.trim());
        cur = "";
        continue;
      }
      if (ch === "(") depth++;
      else if (ch === ")") depth--;
      cur += ch;
    }
    out.push(cur.trim());
    return out;
  };
  const macros = new Map<string, { args: string[]; body: string }>();
  for (const m of text.matchAll(/^#define\s+(\w+)\(([\w\s,]+)\)\s+(.*)$/gm)) macros.set(m[1]!, { args: list(m[2]!), body: m[3]! });
  const expanded: string[] = [text.replace(/^#define.*$/gm, "")];
  for (const m of text.matchAll(/^(\w+)\(([\w \t,()]*)\)[ \t]*$/gm)) {
    const mac = macros.get(m[1]!);
    if (!mac) continue;
    const values = list(m[2]!);
    let body = mac.body;
    mac.args.forEach((arg, i) => {
      body = body.replace(new RegExp(`##${arg}\\b`, "g"), values[i]!).replace(new RegExp(`\\b${arg}\\b`, "g"), values[i]!);
    });
    expanded.push(body.replace(/##/g, ""));
  }
  const all = expanded.join("\n");
  const out = new Map<string, Kind[]>();
  const bodies = new Map<string, string>();
  const paramsOf = new Map<string, string[]>();
  const re = /extern\s+"C"\s+__global__\s+void\s+(?:__(?:launch_bounds|cluster_dims)__\([^)]*\)\s+)*(\w+)\s*\(([^)]*)\)/g;
  for (const m of all.matchAll(re)) {
    const open = all.indexOf("{", m.index! + m[0].length);
    let depth = 0, end = open;
    for (; end < all.length; end++) {
      if (all[end] === "{") depth++;
      else if (all[end] === "}" && --depth === 0) break;
    }
    bodies.set(m[1]!, all.slice(open + 1, end));
    const params = m[2]!.split(",").map((p) => p.trim()).filter((p) => p.length > 0);
    paramsOf.set(m[1]!, params);
    out.set(m[1]!, params.map((p): Kind => {
      if (p.includes("*")) return "ptr";
      if (/\bfloat\b/.test(p)) return "f32";
      if (/\bunsigned\b/.test(p)) return "u32";
      if (/\bint\b/.test(p)) return "i32";
      throw new Error(`cannot classify kernel parameter '${p}' of ${m[1]}`);
    }));
  }
  return { kinds: out, bodies, params: paramsOf };
}

// PDL kernels that work before pdl_wait(), and the pointer parameters that work may read:
// each must be fixed during a step (weights, adapter slots, the step's metadata), never
// an activation an earlier kernel writes (kernels/common.cuh).
const PRE_WAIT_READS: Record<string, readonly string[]> = {
  lora_bgmv_expand_slots: ["B", "ranks", "scales", "loraSlots", "counts"],
  lora_bgmv_fused: ["ranks", "loraSlots", "queryStart", "counts"],
  quant_gemm: ["qw", "scales", "zeros", "la"],
  quant_gemm_k: ["qw", "scales", "zeros"],
};

/** A __device__ function's parameter list and body (for kernels that only call one). */
function deviceFunction(name: string): { params: string[]; body: string } | null {
  const text = readdirSync(KERNEL_DIR).filter((f) => /\.(cu|cuh)$/.test(f)).map((f) => readFileSync(join(KERNEL_DIR, f), "utf8")).join("\n");
  const m = new RegExp(`__device__[^;{(]*\\b${name}\\s*\\(([^)]*)\\)\\s*\\{`).exec(text);
  if (!m) return null;
  let depth = 0, end = m.index + m[0].length - 1;
  for (; end < text.length; end++) {
    if (text[end] === "{") depth++;
    else if (text[end] === "}" && --depth === 0) break;
  }
  return { params: m[1]!.split(",").map((p) => p.trim()).filter((p) => p.length > 0), body: text.slice(m.index + m[0].length, end) };
}

interface Launch {
  name: string;
  grid: Dim3;
  block: Dim3;
  smem: number;
  args: readonly KernelArg[];
}

class RecordingLauncher implements Launcher {
  readonly launches: Launch[] = [];
  launch(name: string, grid: Dim3, block: Dim3, smem: number, args: readonly KernelArg[]): void {
    this.launches.push({ name, grid, block, smem, args });
  }
}

const kindOf = (a: KernelArg): Kind => ("ptr" in a ? "ptr" : "i32" in a ? "i32" : "u32" in a ? "u32" : "f32");

let nextPtr = 0x10000n;
function operand(dtype: Operand["dtype"], rowsCap: number, cols: number): Operand {
  nextPtr += 0x100000n;
  return { ptr: nextPtr, dtype, rowsCap, cols, liveRows: nextPtr + 8n };
}

function run(padTokens: number, padSeqs: number, kinds: StepKinds = {}): StepRun & StepKinds {
  const step: DeviceStep = {
    counts: 0x100n, tokenIds: 0x200n, positions: 0x300n, slotMapping: 0x400n, loraSlots: 0x500n, queryStart: 0x600n,
    contextLens: 0x700n, sampleRows: 0x800n, blockTables: 0x900n, temperature: 0xa00n, topP: 0xb00n, topK: 0xc00n,
    seeds: 0xd00n, counters: 0xe00n, blocksPerSeq: 64, capTokens: padTokens, capSeqs: padSeqs,
  };
  return { step, padTokens, padSeqs, padSample: padSeqs, maxContext: 64 * 16, ...kinds };
}

/** Calls every op over a model-like set of shapes, in the dtypes the model uses (llama.ts). */
function exerciseAll(ops: CudaOps, o: { T: number; S: number; H: number; nH: number; nKv: number; D: number; I: number; V: number; R: number; kinds?: StepKinds }): void {
  const r = run(o.T, o.S, o.kinds);
  const resid = operand("f32", o.T, o.H), normed = operand("bf16", o.T, o.H), w = operand("bf16", 1, o.H);
  ops.embedding(resid, operand("bf16", o.V, o.H), r);
  ops.rmsnorm(normed, resid, w, 1e-5);
  const hidden = operand("f32", o.T, o.H);
  ops.addRmsnorm(normed, resid, hidden, w, 1e-5);
  const q = operand("f32", o.T, o.nH * o.D), k = operand("f32", o.T, o.nKv * o.D), v = operand("f32", o.T, o.nKv * o.D);
  ops.rope(q, k, v, operand("f32", o.T, (o.nH + 2 * o.nKv) * o.D), operand("f32", 1, o.D / 2), o.D, r);
  const kv: DeviceKv = { k: 0x7000000n, v: 0x8000000n, numBlocks: 100, blockSize: 16, numKvHeads: o.nKv, headDim: o.D };
  ops.attention(operand("bf16", o.T, o.nH * o.D), q, k, v, kv, 0.1, r);
  ops.attention(operand("bf16", o.T, o.nH * o.D), q, k, v, kv, 0.1, r,
    { ptr: 0x9000000n, bytes: ops.attentionScratchBytes(o.S, o.nH, o.D) });
  const gateUp = operand("f32", o.T, 2 * o.I), act = operand("bf16", o.T, o.I);
  ops.siluMul(act, gateUp);
  const stack = (inDim: number, outDims: number[]): DeviceLora => ({
    a: 0xa000000n, b: 0xb000000n, ranks: 0xc000000n, scales: 0xd000000n, numSlots: 4, maxRank: o.R, inDim,
    outDim: outDims.reduce((x, y) => x + y, 0), outDims, scratch: 0xe000000n,
  });
  const qkvCols = (o.nH + 2 * o.nKv) * o.D;
  ops.lora(operand("f32", o.T, qkvCols), normed, stack(o.H, [o.nH * o.D, o.nKv * o.D, o.nKv * o.D]), r);
  ops.lora(gateUp, normed, stack(o.H, [o.I, o.I]), r);
  ops.lora(hidden, act, stack(o.I, [o.H]), r);
  // The all-slots expand (decode-only steps): base and t in one wide row, as linearLora makes them.
  for (const st of [stack(o.H, [o.nH * o.D, o.nKv * o.D, o.nKv * o.D]), stack(o.H, [o.I, o.I]), stack(o.I, [o.H])]) {
    if (!ops.loraSlotsPath(st, r, st.numSlots)) continue;
    const ld = st.outDim + st.numSlots * st.outDims.length * st.maxRank;
    const wide = operand("f32", o.T, ld);
    ops.loraExpandSlots(operand("f32", o.T, st.outDim), wide, wide.ptr + BigInt(4 * st.outDim), ld, st, r);
  }
  const last = operand("bf16", o.S, o.H);
  ops.gatherRows(last, normed, r);
  ops.sample(operand("f32", o.S, o.V), r, {
    tokens: 0x1n << 40n, logprobs: 0x2n << 40n, topIds: 0x3n << 40n, topLogprobs: 0x4n << 40n, numTop: 5, scratch: 0n, scratchBytes: 0,
  });
  ops.fillRandom(operand("bf16", o.V, o.H), o.V * o.H, 7, 0.02);
  ops.fillRandom(operand("f32", 1, o.H), o.H, 7, 0.02);
  ops.convertF32ToBf16(0x1000n, 0x2000n, 1000);
  ops.convertBf16ToF32(0x1000n, 0x2000n, 1000);
  ops.convertF16ToBf16(0x1000n, 0x2000n, 1000);
  ops.convertF16ToF32(0x1000n, 0x2000n, 1000);
  ops.fillU32(0x1000n, 10, 0);
  ops.fillU16(0x1000n, 10, 0x3f80);
}

const SHAPES = [
  { T: 8, S: 8, H: 256, nH: 8, nKv: 4, D: 32, I: 704, V: 512, R: 8 }, // the demo model
  { T: 256, S: 64, H: 4096, nH: 32, nKv: 32, D: 128, I: 11008, V: 32000, R: 16 }, // Llama-2-7B (MHA)
  { T: 2048, S: 256, H: 4096, nH: 32, nKv: 8, D: 128, I: 14336, V: 128256, R: 64 }, // Llama-3-8B (GQA 4)
  { T: 24, S: 24, H: 896, nH: 14, nKv: 2, D: 64, I: 4864, V: 151936, R: 32 }, // Qwen2-0.5B (GQA 7)
  { T: 96, S: 4, H: 3584, nH: 28, nKv: 4, D: 128, I: 18944, V: 152064, R: 128 }, // Qwen2-7B, rank 128
];

describe("CUDA ops seam (CPU checks)", () => {
  const kernels = parseKernels();

  it("KERNEL_FILES are the .cu files of the kernels folder, absolute (but graph_launch.cu, linked on its own: device_graph.ts)", () => {
    const onDisk = readdirSync(KERNEL_DIR).filter((f) => f.endsWith(".cu") && f !== "graph_launch.cu").sort();
    expect(KERNEL_FILES.map((f) => basename(f)).sort()).toEqual(onDisk);
    for (const f of KERNEL_FILES) expect(f.startsWith("/")).toBe(true);
  });

  it("every kernel name ops.ts may launch is defined, extern \"C\", in the sources", () => {
    const missing = kernelNames().filter((n) => !kernels.has(n));
    expect(missing).toEqual([]);
  });

  it("every PDL kernel waits for its predecessor first thing, or reads only step-fixed pointers before", () => {
    const sources = parseSources();
    for (const kernel of PDL_KERNELS) {
      expect(sources.bodies.get(kernel), `${kernel} is not defined`).toBeDefined();
      let name = kernel, body = sources.bodies.get(kernel), kernelParams = sources.params.get(kernel)!;
      // A kernel that only calls a device template (quant_gemm_b4_t1_c2 -> quant_gemm<4, 1, 2>): check that.
      const call = /^\s*(\w+)\s*<[^>]*>\s*\([^;]*\);\s*$/.exec(body!.replace(/\/\/.*$/gm, ""));
      if (call) {
        const fn = deviceFunction(call[1]!);
        expect(fn, `${kernel} calls ${call[1]}, which is not a __device__ function in the sources`).not.toBeNull();
        name = call[1]!;
        body = fn!.body;
        kernelParams = fn!.params;
      }
      const wait = /pdl_wait(<\w+>)?\(\);/.exec(body!);
      expect(wait, `${name} never calls pdl_wait()`).not.toBeNull();
      const before = body!.slice(0, wait!.index).replace(/\/\/.*$/gm, "").replace(/__shared__[^;]*;/g, "").trim();
      const allowed = PRE_WAIT_READS[name];
      if (!allowed) {
        expect(before, `${name} does work before pdl_wait()`).toBe("");
        continue;
      }
      // Pointer parameters mentioned before the wait: only the listed ones, all const (read-only).
      for (const p of kernelParams.filter((q) => q.includes("*"))) {
        const id = /(\w+)\s*$/.exec(p)![1]!;
        if (!new RegExp(`(?<![.\\w])${id}\\b`).test(before)) continue; // not blockIdx.x and the like
        expect(allowed.includes(id), `${name} reads ${id} before pdl_wait(), which is not listed as fixed during a step`).toBe(true);
        expect(/\bconst\b/.test(p), `${name} may write ${id} before pdl_wait()`).toBe(true);
      }
    }
  });

  it("sources include only headers NVRTC has (cuda_bf16.h, cuda_fp16.h) and the folder's own .cuh", () => {
    for (const f of readdirSync(KERNEL_DIR).filter((n) => /\.(cu|cuh)$/.test(n))) {
      const text = readFileSync(join(KERNEL_DIR, f), "utf8");
      for (const m of text.matchAll(/^\s*#\s*include\s*([<"])([^>"]+)[>"]/gm)) {
        const ok = m[1] === "<" ? ["cuda_bf16.h", "cuda_fp16.h"].includes(m[2]!) : /^\w+\.cuh$/.test(m[2]!);
        expect(ok, `${f} includes ${m[2]}`).toBe(true);
      }
      // No host-only types or macros NVRTC lacks without headers.
      expect(/\b(u?int(8|16|32|64)_t|size_t|INFINITY|FLT_MAX|std::)\b/.test(text.replace(/\/\/.*$/gm, "")), `${f} uses a host header's name`).toBe(false);
    }
  });

  for (const shape of SHAPES) {
    for (const [kinds, clusters] of [
      [{}, false], [{ hasPrefill: true, hasDecode: false }, false], [{ hasPrefill: false, hasDecode: true }, false], [{}, true],
    ] as [StepKinds, boolean][]) {
      it(`launches match kernel signatures and hardware limits: H=${shape.H} nH=${shape.nH}/${shape.nKv} D=${shape.D} r=${shape.R} ${JSON.stringify(kinds)}${clusters ? " clusters" : ""}`, () => {
        const rec = new RecordingLauncher();
        exerciseAll(new CudaOps(rec, { smCount: 132, clusters }), { ...shape, kinds });
        // Clustered kernels (8 CTAs per cluster, __cluster_dims__) need grids of whole clusters.
        for (const l of rec.launches.filter((x) => x.name === "lora_bgmv_fused")) expect(l.grid[0] % 8).toBe(0);
        if (clusters && shape.R <= 64) expect(rec.launches.some((x) => x.name === "lora_bgmv_fused")).toBe(true);
        if (kinds.hasPrefill === false) expect(rec.launches.some((x) => x.name === "lora_bgmv_expand_slots"), "decode-only: the all-slots expand").toBe(true);
        expect(rec.launches.length).toBeGreaterThan(10);
        for (const l of rec.launches) {
          const params = kernels.get(l.name);
          expect(params, `kernel ${l.name}`).toBeDefined();
          expect(l.args.map(kindOf), `arguments of ${l.name}`).toEqual(params);
          const [gx, gy, gz] = l.grid;
          const [bx, by, bz] = l.block;
          for (const g of l.grid) expect(Number.isInteger(g) && g >= 1).toBe(true);
          expect(gx).toBeLessThan(2 ** 31);
          expect(gy).toBeLessThanOrEqual(65535);
          expect(gz).toBeLessThanOrEqual(65535);
          expect(bx * by * bz).toBeLessThanOrEqual(1024);
          expect(bx % 32).toBe(0);
          if (l.name.startsWith("attn_decode_d")) {
            // The decode kernel's tiles are dynamic (per-warp rings, opted in above 48 KB by
            // the launcher): within an H100's 227 KB per block, and two CTAs of the largest
            // head dim still fit an SM (its grid assumes that many resident).
            expect(l.smem).toBeLessThanOrEqual(227 * 1024);
            expect(l.smem).toBe(decodeSmemBytes(shape.D, shape.S));
            if (shape.S <= 256) expect(2 * (l.smem + 128 + 1024)).toBeLessThanOrEqual(228 * 1024);
          } else {
            // Static tiles use up to ~39 KB; dynamic shared memory must leave them room in 48 KB.
            expect(l.smem).toBeLessThanOrEqual(9 * 1024);
          }
        }
        const names = new Set(rec.launches.map((l) => l.name));
        if (kinds.hasDecode === false) {
          expect(names.has(`attn_decode_d${shape.D}`)).toBe(false);
          expect(names.has("lora_bgmv_shrink")).toBe(false);
        }
        if (kinds.hasPrefill === false) {
          expect(names.has(`attn_prefill_d${shape.D}`)).toBe(false);
          expect([...names].some((n) => n.startsWith("lora_sgmv"))).toBe(false);
        }
      });
    }
  }

  it("kv_cache_write zeroes the split-decode arrival counters inside the scratch, only when decode splits", () => {
    for (const shape of SHAPES) {
      const rec = new RecordingLauncher();
      const ops = new CudaOps(rec, { smCount: 132 });
      const r = run(shape.T, shape.S);
      const kv: DeviceKv = { k: 0x7000000n, v: 0x8000000n, numBlocks: 100, blockSize: 16, numKvHeads: shape.nKv, headDim: shape.D };
      const q = operand("f32", shape.T, shape.nH * shape.D), k = operand("f32", shape.T, shape.nKv * shape.D);
      const scratch = { ptr: 0x9000000n, bytes: attentionScratchBytes(shape.S, shape.nH, shape.D) };
      ops.attention(operand("bf16", shape.T, shape.nH * shape.D), q, k, k, kv, 0.1, r, scratch);
      ops.attention(operand("bf16", shape.T, shape.nH * shape.D), q, k, k, kv, 0.1, r);
      const writes = rec.launches.filter((l) => l.name === "kv_cache_write_f32");
      expect(writes.length).toBe(2);
      const [zp, zn] = [writes[0]!.args[8]!, writes[0]!.args[9]!];
      expect("ptr" in zp && "i32" in zn).toBe(true);
      const start = (zp as { ptr: bigint }).ptr, n = (zn as { i32: number }).i32;
      expect(start).toBe(scratch.ptr + BigInt(decodeCounterOffset(shape.S, shape.nH, shape.D)));
      // One counter per (sequence slot, group of up to 8 heads of one KV head).
      const G = shape.nH / shape.nKv;
      expect(n).toBe(shape.S * shape.nKv * Math.ceil(G / 8));
      expect(start + BigInt(4 * n)).toBeLessThanOrEqual(scratch.ptr + BigInt(scratch.bytes));
      // Without scratch nothing splits and nothing is zeroed.
      expect(writes[1]!.args[9]).toEqual({ i32: 0 });
      // The decode grid never exceeds one resident wave (2..4 CTAs per SM) and never the items.
      for (const l of rec.launches.filter((x) => x.name.startsWith("attn_decode_d"))) {
        expect(l.grid[0]).toBeLessThanOrEqual(132 * 4);
        expect(l.block[0]).toBe(128);
      }
    }
  });

  it("launch parameters depend only on capacities (a graph replays any step of the bucket)", () => {
    const a = new RecordingLauncher(), b = new RecordingLauncher();
    exerciseAll(new CudaOps(a), { ...SHAPES[2]!, kinds: { hasPrefill: false, hasDecode: true } });
    exerciseAll(new CudaOps(b), { ...SHAPES[2]!, kinds: { hasPrefill: false, hasDecode: true } });
    const strip = (ls: Launch[]) => ls.map((l) => ({ ...l, args: l.args.map((x) => ("ptr" in x ? "p" : x)) }));
    expect(strip(a.launches)).toEqual(strip(b.launches));
  });

  it("the all-slots expand's grid covers N at INLAID_EXPAND_PER outputs per thread (1 by default)", () => {
    const saved = process.env.INLAID_EXPAND_PER;
    try {
      for (const [v, per] of [[undefined, 1], ["4", 4], ["2", 2], ["1", 1]] as const) {
        if (v === undefined) delete process.env.INLAID_EXPAND_PER;
        else process.env.INLAID_EXPAND_PER = v;
        expect(expandPerThread()).toBe(per);
        const rec = new RecordingLauncher();
        exerciseAll(new CudaOps(rec), { ...SHAPES[2]!, kinds: { hasPrefill: false, hasDecode: true } });
        const expands = rec.launches.filter((l) => l.name === "lora_bgmv_expand_slots");
        expect(expands.length).toBeGreaterThan(0);
        for (const l of expands) {
          const N = (l.args[9] as { i32: number }).i32;
          expect(l.grid[0]).toBe(Math.ceil(N / (128 * per)));
        }
      }
      process.env.INLAID_EXPAND_PER = "3";
      expect(() => expandPerThread()).toThrow(/expected 1, 2 or 4/);
    } finally {
      if (saved === undefined) delete process.env.INLAID_EXPAND_PER;
      else process.env.INLAID_EXPAND_PER = saved;
    }
  });

  it("rejects shapes the kernels do not handle, naming the limit", () => {
    const ops = new CudaOps(new RecordingLauncher());
    const r = run(8, 8);
    const kv: DeviceKv = { k: 1n, v: 2n, numBlocks: 4, blockSize: 16, numKvHeads: 2, headDim: 48 };
    const attn = () => ops.attention(operand("bf16", 8, 96), operand("f32", 8, 96), operand("f32", 8, 96), operand("f32", 8, 96), kv, 1, r);
    expect(attn).toThrow(CudaOpsError);
    expect(attn).toThrow(/head dim 48/);
    expect(() => ops.rmsnorm(operand("bf16", 8, 100), operand("f32", 8, 100), operand("bf16", 1, 100), 1e-5)).toThrow(/multiple of 8/);
    expect(() => ops.rmsnorm(operand("bf16", 8, 64), operand("bf16", 8, 64), operand("bf16", 1, 64), 1e-5)).toThrow(/x must be f32/);
    // The pre-f32 forms (bf16 matmul outputs) are refused, naming the operand.
    const kv2: DeviceKv = { ...kv, headDim: 32, numKvHeads: 3 };
    const b16 = operand("bf16", 8, 96);
    expect(() => ops.attention(b16, b16, b16, b16, kv2, 1, r)).toThrow(/q must be f32 \(got bf16\)/);
    expect(() => ops.rope(b16, b16, b16, b16, operand("f32", 1, 16), 32, r)).toThrow(/q must be f32/);
    expect(() => ops.siluMul(b16, b16)).toThrow(/gateUp must be f32/);
    expect(() => ops.addRmsnorm(operand("bf16", 8, 64), operand("f32", 8, 64), operand("bf16", 8, 64), operand("bf16", 1, 64), 1e-5)).toThrow(/x must be f32/);
  });

  it("decode splits depend only on the context: at most 16 chunks of 64-key multiples covering it", () => {
    expect(SUPPORTED_HEAD_DIMS.every((d) => d % 16 === 0)).toBe(true);
    for (let ctx = 1; ctx < 40000; ctx += ctx < 600 ? 1 : 97) {
      const { chunks, chunkLen } = decodeSplit(ctx);
      expect(chunkLen % 64).toBe(0);
      expect(chunks).toBeGreaterThanOrEqual(1);
      expect(chunks).toBeLessThanOrEqual(16);
      expect(chunks * chunkLen).toBeGreaterThanOrEqual(ctx);
      expect((chunks - 1) * chunkLen).toBeLessThan(ctx);
      if (ctx <= 64) expect(chunks).toBe(1);
      if (ctx <= 256) expect(decodeSplit(ctx).chunks).toBe(1);
      if (ctx <= 256) expect(decodeSplit(ctx, 16, 256).chunks).toBe(1);
      expect(decodeSplit(ctx, 1).chunks).toBe(1);
    }
    expect(decodeSplit(3000, 16, 256).chunks).toBe(12);
    expect(decodeSplit(192, 16, 64)).toEqual({ chunks: 3, chunkLen: 64 });
    expect(attentionScratchBytes(2, 4, 32)).toBe(2 * (16 * 4 * 34 + 4) * 4);
  });

  it("dummyWeightValue is the CPU backend's fillRandom formula", () => {
    for (const [seed, i, std] of [[0, 0, 0.02], [7, 12345, 1], [0xffffffff, 4e9, 0.5]] as const) {
      expect(dummyWeightValue(seed, i, std)).toBe(Math.fround(std * Math.sqrt(3) * (2 * uniform(seed, i) - 1)));
    }
  });

  it("low-bit GEMM launches (quant_ops.ts) match kernel signatures and hardware limits", () => {
    const rec = new RecordingLauncher();
    const ops = new QuantOps(rec, 132);
    const shapes: [number, number][] = [[256, 512], [704, 256], [256, 1408], [4096, 12288], [4096, 22016], [11008, 4096], [14336, 4096]];
    for (const bits of [2, 3, 4, 8] as QuantBits[]) {
      for (const [K, N] of shapes) {
        for (const [groupSize, zeros, perm] of [[128, 0n, 0n], [K, 0x5000n, 0x6000n]] as const) {
          const w: DeviceQuantWeight = {
            bits, K, N, groupSize, groups: Math.ceil(K / groupSize), symZero: 1 << (bits - 1), words: 0x1000n, scales: 0x2000n, zeros, perm,
          };
          for (const rows of [1, 2, 7, 8, 16, 24, 32, 48, 100, 128]) {
            const plan = ops.plan(w, rows);
            ops.gather(0x7000n, operand("bf16", rows, K), rows, w);
            ops.fused(0x8000n, 0x9000n, 0xa000n, rows, w, 0xb000n, 0xc000n, 0xd000n, plan);
            // With the LoRA shrink (no act-order; fusedCarriesShrink): 8 slots of rank 16 over 3 splits.
            if (perm === 0n && fusedCarriesShrink(bits, plan.warps)) {
              ops.fused(0x8000n, 0x9000n, 0xa000n, rows, w, 0xb000n, 0n, 0n, plan, { a: 0xf000n, t: 0xf800n, cols: 384, ldT: 384 });
              expect(rec.launches.at(-1)!.grid).toEqual([plan.grid[0], plan.grid[1] + 12, plan.grid[2]]);
            }
            // Same capacities, same launch (graph replay of any step of the bucket).
            expect(ops.plan(w, rows)).toEqual(plan);
            // The K-split kernel's launches (INLAID_QGEMM_KSPLIT), where they apply; never with a shrink.
            if (kSplitApplies(w, rows)) {
              const ks = kSplitCandidates(bits, K, N, rows);
              expect(ks.length).toBeGreaterThan(0);
              for (const k of ks) ops.fused(0x8000n, 0x9000n, 0xa000n, rows, w, 0xb000n, 0n, 0n, k);
              expect(() => ops.fused(0x8000n, 0x9000n, 0xa000n, rows, w, 0xb000n, 0n, 0n, ks[0]!, { a: 0xf000n, t: 0xf800n, cols: 384, ldT: 384 }))
                .toThrow(/does not carry/);
            }
          }
          for (let c0 = 0; c0 < N / 32; c0 += dequantChunkCols(K, N)) ops.dequant(0xe000n, w, c0, Math.min(dequantChunkCols(K, N), N / 32 - c0));
        }
      }
    }
    const names = new Set(rec.launches.map((l) => l.name));
    for (const b of [2, 3, 4, 8]) for (const n of [`quant_gemm_b${b}_t1_c2`, `quant_gemm_b${b}_t4_c1`, `quant_gemm_b${b}_t1_c8`, `quant_dequant_b${b}`, `quant_gemm_k_b${b}_d2`]) expect(names.has(n), n).toBe(true);
    for (const b of [2, 3, 4]) expect(names.has(`quant_gemm_k_b${b}_d4`), `quant_gemm_k_b${b}_d4`).toBe(true);
    for (const n of ["quant_gemm_lora_b4_t1_c2", "quant_gemm_lora_b4_t4_c1", "quant_gemm_lora_b2_t4_c1"]) expect(names.has(n), n).toBe(true);
    for (const n of quantKernelNames()) expect(kernels.has(n), `quant_gemm.cu defines ${n}`).toBe(true);
    expect(names.has("quant_gather_cols")).toBe(true);
    for (const l of rec.launches) {
      const params = kernels.get(l.name);
      expect(params, `kernel ${l.name}`).toBeDefined();
      expect(l.args.map(kindOf), `arguments of ${l.name}`).toEqual(params);
      for (const g of l.grid) expect(Number.isInteger(g) && g >= 1).toBe(true);
      expect(l.grid[0]).toBeLessThan(2 ** 31);
      expect(l.grid[1]).toBeLessThanOrEqual(65535);
      expect(l.grid[2]).toBeLessThanOrEqual(16);
      expect(l.block[0] === 128 || l.block[0] === 256 || (l.block[0] === 512 && l.name.startsWith("quant_gemm_k_")), `${l.name} block`).toBe(true);
      // The fused kernel's ring (two CTAs per SM; the launcher opts in past 48 KB); its grid
      // is whole clusters of _c{C} CTAs along z. The dequant kernel's 34 KB tile is static.
      const fused = /^quant_gemm_(?:lora_)?b(\d)_t(\d)(?:_w4)?_c(\d)$/.exec(l.name);
      if (fused) {
        expect(l.smem).toBe(fusedSmemBytes(Number(fused[1]) as QuantBits, Number(fused[2]), l.block[0] / 32));
        expect(2 * (l.smem + 1024)).toBeLessThanOrEqual(228 * 1024);
        expect(l.grid[2]).toBe(Number(fused[3]));
      } else if (l.name.startsWith("quant_gemm_k_")) {
        // One column per CTA; x of the launch's rows over the padded K, then the warps' sums: two CTAs per SM.
        const [rows, K, N] = [7, 8, 9].map((i) => (l.args[i] as { i32: number }).i32) as [number, number, number];
        expect(l.grid).toEqual([1, N / 32, 1]);
        expect(l.smem).toBe(kSplitSmem(K, rows, l.block[0] / 32));
        expect(2 * (l.smem + 1024)).toBeLessThanOrEqual(228 * 1024);
      } else {
        expect(l.smem).toBe(0);
      }
    }
    // Where it does not apply: more than one token tile, a group that splits a unit, too many k for shared memory.
    const w4 = (K: number, groupSize: number) => ({ K, groupSize, groups: Math.ceil(K / groupSize) });
    expect(kSplitApplies(w4(4096, 128), 8)).toBe(true);
    expect(kSplitApplies(w4(4096, 128), 9)).toBe(false);
    expect(kSplitApplies(w4(4096, 64), 1)).toBe(false);
    expect(kSplitApplies(w4(4160, 4160), 1)).toBe(true);
    expect(kSplitApplies(w4(11008, 128), 8)).toBe(false);
    expect(() => kSplitLaunch(8, 4096, 4096, 1, 8, 4)).toThrow(/depth 4/);
    expect(() => kSplitLaunch(4, 4096, 4096, 9, 8, 2)).toThrow(/9 rows/);
  });

  const nvcc = spawnSync("nvcc", ["--version"], { encoding: "utf8" });
  const hasNvcc = nvcc.status === 0;
  it.skipIf(!hasNvcc)(`nvcc compiles every kernel file for sm_90${hasNvcc ? "" : " (skipped: nvcc is not on PATH)"}`, () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-cu-"));
    try {
      for (const f of KERNEL_FILES) {
        const res = spawnSync("nvcc", ["-arch=sm_90", "-std=c++17", "-cubin", "-DINLAID_NVRTC=1", "-o", join(dir, `${basename(f)}.cubin`), f], { encoding: "utf8" });
        expect(res.status, `${basename(f)}:\n${res.stderr}`).toBe(0);
      }
      // The experiment switches compiled in by environment (cuda_backend.ts) build as well.
      for (const [file, define] of [["lora.cu", "-DINLAID_EXPAND_PER=2"], ["lora.cu", "-DINLAID_EXPAND_PER=4"]] as const) {
        const f = KERNEL_FILES.find((k) => basename(k) === file)!;
        const res = spawnSync("nvcc", ["-arch=sm_90", "-std=c++17", "-cubin", "-DINLAID_NVRTC=1", define, "-o", join(dir, `switch-${file}.cubin`), f], { encoding: "utf8" });
        expect(res.status, `${file} ${define}:\n${res.stderr}`).toBe(0);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 300_000);
});
