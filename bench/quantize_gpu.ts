// MLGPTQ on the GPU at a real model's shape (issue 4: Llama-2-7B, 4 tasks x 32
// sequences x 512 tokens in <= 10 minutes with <= 8 GB extra GPU memory). The base is
// random weights of a bench/configs shape (--load-format dummy, made on the GPU layer
// by layer), the tasks synthetic rank-16 LoRA adapters on all seven projections
// (src/bench/synthetic_adapter.ts), the calibration random token ids. Runs
// quantizeOnDevice (src/quant/stream_quantize.ts: layer-streamed capture + GPTQ solver)
// and writes a real GPTQ checkpoint with its mlgptq/ folder, which
// `inlaid bench --model OUT --device cuda` loads. Prints one JSON object: seconds per
// phase, total, peak extra device memory (cuMemGetInfo against the start).
//
//   node --import tsx bench/quantize_gpu.ts --config llama-2-7b --tasks 4 --seqs 32 --len 512 --bits 4
//     [--group-size 128] [--rank 16] [--step-tokens 2048] [--layers N] [--solver cuda|cpu]
//     [--out DIR] [--keep] [--seed 0]
//   --layers N   only the first N layers of the shape (a quick look at per-layer cost)
//   --solver     cuda (default; fails if the CUDA GPTQ solver is unavailable) or cpu
//   --out        the checkpoint folder (default $TMPDIR/inlaid-quantize-gpu-CONFIG); removed
//                after the run unless --keep (a 7B one is 3.9 GB + 22 GB of mlgptq/ Hessians)

import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { CudaBackend } from "../src/backend/cuda/cuda_backend.js";
import { syntheticAdapters } from "../src/bench/synthetic_adapter.js";
import { loadModelConfig } from "../src/model/config.js";
import { cpuGptqSolver, cudaGptqSolver, type GptqSolver } from "../src/quant/gpu_gptq.js";
import type { QuantTask } from "../src/quant/methods.js";
import { quantizeOnDevice } from "../src/quant/stream_quantize.js";
import type { QuantBits } from "../src/quant/types.js";

const { values } = parseArgs({
  options: {
    config: { type: "string", default: "llama-2-7b" },
    tasks: { type: "string", default: "4" },
    seqs: { type: "string", default: "32" },
    len: { type: "string", default: "512" },
    bits: { type: "string", default: "4" },
    "group-size": { type: "string", default: "128" },
    rank: { type: "string", default: "16" },
    "step-tokens": { type: "string", default: "2048" },
    layers: { type: "string" },
    solver: { type: "string", default: "cuda" },
    out: { type: "string" },
    keep: { type: "boolean", default: false },
    seed: { type: "string", default: "0" },
  },
});

const int = (name: string, v: string | undefined): number => {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} expects a positive integer, got '${v}'`);
  return n;
};
const numTasks = int("tasks", values.tasks), numSeqs = int("seqs", values.seqs), len = int("len", values.len);
const bits = int("bits", values.bits) as QuantBits;
const groupSize = Number(values["group-size"]);
const rank = int("rank", values.rank);
const stepTokens = int("step-tokens", values["step-tokens"]);
const seed = Number(values.seed);
if (values.solver !== "cuda" && values.solver !== "cpu") throw new Error(`--solver expects cuda or cpu, got '${values.solver}'`);

const say = (m: string): void => void process.stderr.write(`${m}\n`);
const configDir = resolve(import.meta.dirname, "configs", values.config!);
const scratch = mkdtempSync(join(tmpdir(), "inlaid-quantize-gpu-"));

// --layers: the same shape cut to its first N layers, in a folder of its own.
let baseDir = configDir;
if (values.layers !== undefined) {
  const n = int("layers", values.layers);
  baseDir = join(scratch, "base");
  mkdirSync(baseDir);
  for (const f of readdirSync(configDir)) if (statSync(join(configDir, f)).isFile()) copyFileSync(join(configDir, f), join(baseDir, f));
  const cfgJson = JSON.parse(readFileSync(join(configDir, "config.json"), "utf8")) as Record<string, unknown>;
  writeFileSync(join(baseDir, "config.json"), JSON.stringify({ ...cfgJson, num_hidden_layers: n }, null, 2));
}
const config = loadModelConfig(baseDir);
const outDir = resolve(values.out ?? join(tmpdir(), `inlaid-quantize-gpu-${values.config}`));

const t0 = performance.now();
const adapters = syntheticAdapters(config, numTasks, rank, undefined, (d) => say(`wrote synthetic adapter ${d}`));
// Random token ids (xorshift32), one file per task holding them: the cache key hashes it.
let s = (seed ^ 0x2545f491) >>> 0 || 1;
const nextId = (): number => {
  s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
  return 3 + (s % (config.vocabSize - 3)); // past BOS/EOS/pad
};
const ids = new Map<string, number[][]>();
const tasks: QuantTask[] = adapters.map((dir, t) => {
  const name = `task${t}`;
  const seqs = Array.from({ length: numSeqs }, () => Array.from({ length: len }, nextId));
  const calibPath = join(scratch, `${name}.ids.json`);
  writeFileSync(calibPath, JSON.stringify(seqs));
  ids.set(name, seqs);
  return { name, adapterDir: dir, calibPath };
});
const setupSeconds = (performance.now() - t0) / 1000;

const backend = await CudaBackend.create();
let solver: GptqSolver;
try {
  solver = values.solver === "cuda" ? await cudaGptqSolver(backend) : cpuGptqSolver();
} catch (e) {
  backend.dispose();
  throw e;
}
const total = backend.memoryInfo().total;
let lastNote = performance.now();
try {
  const r = quantizeOnDevice({
    backend, solver, loadFormat: "dummy", baseDir, outDir, method: "mlgptq",
    spec: { bits, groupSize, sym: false, descAct: false }, tasks, stepTokens,
    calibrationIds: (t) => ids.get(t.name)!,
    // The work folder is removed after the run: caching per-task Hessians would only cost time
    // (and with --layers the model is small enough that it would, unlike the full 7B).
    cacheLimitBytes: 0,
    progress: {
      note: say,
      start: (label, n, unit) => say(`${label}: 0/${n} ${unit ?? ""}`),
      update: (done) => {
        say(`  ${done} layers, ${((performance.now() - lastNote) / 1000).toFixed(1)} s since the last`);
        lastNote = performance.now();
      },
      stop() {},
    },
  });
  const bytesOf = (dir: string): number => readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile()).reduce((a, e) => a + statSync(join(e.parentPath, e.name)).size, 0);
  const out = {
    config: values.config, layers: config.numLayers, tasks: numTasks, seqs: numSeqs, len, tokens_per_task: numSeqs * len,
    bits, group_size: groupSize, rank, step_tokens: stepTokens, solver: values.solver, device: backend.device.name,
    seconds: {
      setup_adapters_and_ids: +setupSeconds.toFixed(2),
      load: +r.phases.load.toFixed(2), capture: +r.phases.capture.toFixed(2), fold: +r.phases.fold.toFixed(2),
      solve: +r.phases.solve.toFixed(2), cache: +r.phases.cache.toFixed(2), write: +r.phases.write.toFixed(2), total: +r.seconds.toFixed(2),
    },
    peak_extra_gpu_gib: r.peakExtraBytes === null ? null : +(r.peakExtraBytes / 2 ** 30).toFixed(3),
    gpu_total_gib: +(total / 2 ** 30).toFixed(1),
    linears: r.stats.length,
    raised_damping: r.stats.filter((x) => x.attempts > 1).length,
    out: outDir,
    out_gib: +(bytesOf(outDir) / 2 ** 30).toFixed(2),
    kept: values.keep,
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
} finally {
  solver.dispose();
  backend.dispose();
  rmSync(scratch, { recursive: true, force: true });
  if (!values.keep) rmSync(outDir, { recursive: true, force: true });
}
