// The quantization quality harness (`npm run quality`): quantizes the bundled demo with
// every method - RTN, GPTQ-mixed, per-task GPTQ, MLGPTQ with each aggregate - at 4, 3 and
// 2 bits (group size 64, asymmetric), and scores each with the same exact-match eval as
// `inlaid eval` (src/eval/exact_match.ts: greedy, 48 tokens, the full 200-line eval set
// of every task), next to the unquantized base. CPU backend throughout.
//
// Besides exact match it reports, per method and task, the relative output error of the
// quantized linears on that task's own activations (adapter on):
//   sum_linears tr(ΔW H_t ΔW^T) / sum_linears tr(W H_t W^T),
// the quantity GPTQ minimizes layer by layer - to tell whether a method loses on a task
// because its layers fit that task's activations worse, or for some other reason.
//
//   node --import tsx bench/quality.ts [--bits 4,3,2] [--methods rtn,gptq-mixed,gptq,mlgptq]
//     [--aggregates max,mean,max-diag,inv-max] [--group-size 64] [--calib-limit N]
//     [--eval-limit N] [--work DIR] [--json]   (--json: JSON on stdout, the table on stderr)
// Per-task Hessians are cached in the work folder (default: the OS temp folder), so a
// second run only solves and evaluates.

import { mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { toF32 } from "../src/backend/tensor.js";
import { DEMO_ADAPTERS, DEMO_BASE, DEMO_DIR, DEMO_TASKS } from "../src/cli/paths.js";
import { createEngine } from "../src/engine/engine.js";
import { EVAL_MAX_TOKENS, readEvalJsonl, runExactMatch } from "../src/eval/exact_match.js";
import { SafetensorsDir } from "../src/model/safetensors.js";
import { AGGREGATES, type Aggregate } from "../src/quant/aggregate.js";
import { readQuantizedWeights } from "../src/quant/checkpoint.js";
import { HessianSource, quantize, type Method, type QuantTask } from "../src/quant/methods.js";
import { dequantize, type QuantBits, type QuantSpec } from "../src/quant/types.js";

const { values } = parseArgs({
  options: {
    bits: { type: "string", default: "4,3,2" },
    methods: { type: "string", default: "rtn,gptq-mixed,gptq,mlgptq" },
    aggregates: { type: "string", default: AGGREGATES.join(",") },
    "group-size": { type: "string", default: "64" },
    "calib-limit": { type: "string" },
    "eval-limit": { type: "string" },
    work: { type: "string", default: join(tmpdir(), "inlaid-quality") },
    json: { type: "boolean", default: false },
    "no-base": { type: "boolean", default: false },
  },
});

const bitsList = values.bits!.split(",").map((b) => Number(b) as QuantBits);
const methods = values.methods!.split(",") as Method[];
const aggregates = values.aggregates!.split(",") as Aggregate[];
const groupSize = Number(values["group-size"]);
const calibLimit = values["calib-limit"] ? Number(values["calib-limit"]) : undefined;
const evalLimit = values["eval-limit"] ? Number(values["eval-limit"]) : undefined;
const work = values.work!;
const hessianDir = join(work, "hessians");
mkdirSync(work, { recursive: true });

const tasks: QuantTask[] = DEMO_TASKS.map((t) => ({ name: t, adapterDir: DEMO_ADAPTERS[t]!, calibPath: join(DEMO_DIR, "data", t, "calib.jsonl") }));
const evalRows = Object.fromEntries(DEMO_TASKS.map((t) => [t, readEvalJsonl(join(DEMO_DIR, "data", t, "eval.jsonl"), evalLimit)]));
const say = (m: string): void => void process.stderr.write(`${m}\n`);
const quiet = { note() {}, start() {}, update() {}, stop() {} };

interface Row {
  label: string;
  bits: number | null;
  method: string;
  aggregate: string | null;
  exact: Record<string, number>;
  mean: number;
  relError: Record<string, number> | null;
  quantizeSeconds: number;
  evalSeconds: number;
}

/** Exact match of each task, evaluating `modelFor(task)` (one engine per distinct folder). */
async function evaluate(modelFor: (task: string) => string): Promise<{ exact: Record<string, number>; seconds: number }> {
  const t0 = performance.now();
  const exact: Record<string, number> = {};
  const byDir = new Map<string, string[]>();
  for (const t of DEMO_TASKS) byDir.set(modelFor(t), [...(byDir.get(modelFor(t)) ?? []), t]);
  for (const [dir, ts] of byDir) {
    const engine = await createEngine({
      modelDir: dir, device: "cpu", adapters: Object.fromEntries(ts.map((t) => [t, DEMO_ADAPTERS[t]!])), maxBatch: 256, maxWaiting: 4096,
    });
    try {
      for (const t of ts) exact[t] = (await runExactMatch(engine, t, evalRows[t]!, { maxTokens: EVAL_MAX_TOKENS })).exactMatch;
    } finally {
      await engine.close();
    }
  }
  return { exact, seconds: (performance.now() - t0) / 1000 };
}

// ---- output error on each task's own activations (adapter on)
const source = new HessianSource(DEMO_BASE, hessianDir, calibLimit, 512, quiet);
const base = SafetensorsDir.open(DEMO_BASE);
const dense = new Map<string, Float32Array>();
for (const s of source.sites) for (const l of s.linears) dense.set(l, toF32(base.get(`${l}.weight`).data, base.get(`${l}.weight`).dtype));
base.close();

/** tr(D H D^T) and tr(W H W^T) summed over a site's linears. */
function siteErrors(h: Float32Array, K: number, pairs: Array<[Float32Array, Float32Array]>): [number, number] {
  let err = 0, ref = 0;
  const d = new Float64Array(K), hd = new Float64Array(K), hw = new Float64Array(K);
  for (const [w, q] of pairs) {
    const N = w.length / K;
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) d[k] = w[n * K + k]! - q[n * K + k]!;
      for (let i = 0; i < K; i++) {
        let a = 0, b = 0;
        for (let j = 0; j < K; j++) {
          a += h[i * K + j]! * d[j]!;
          b += h[i * K + j]! * w[n * K + j]!;
        }
        hd[i] = a;
        hw[i] = b;
      }
      for (let i = 0; i < K; i++) {
        err += d[i]! * hd[i]!;
        ref += w[n * K + i]! * hw[i]!;
      }
    }
  }
  return [err, ref];
}

function relativeErrors(modelFor: (task: string) => string): Record<string, number> {
  const out: Record<string, number> = {};
  const deqCache = new Map<string, Map<string, Float32Array>>();
  for (const t of tasks) {
    const dir = modelFor(t.name);
    if (!deqCache.has(dir)) deqCache.set(dir, new Map([...readQuantizedWeights(dir)].map(([k, v]) => [k, dequantize(v)])));
    const deq = deqCache.get(dir)!;
    const { hs } = source.get(t, true);
    let err = 0, ref = 0;
    for (const s of source.sites) {
      const [e, r] = siteErrors(hs.h.get(s.name)!, s.inDim, s.linears.map((l) => [dense.get(l)!, deq.get(l)!]));
      err += e;
      ref += r;
    }
    out[t.name] = err / ref;
  }
  return out;
}

// ---- the runs
const rows: Row[] = [];
const t0 = performance.now();
const meanOf = (e: Record<string, number>): number => DEMO_TASKS.reduce((a, t) => a + e[t]!, 0) / DEMO_TASKS.length;

if (!values["no-base"]) {
  say("eval: unquantized base");
  const ev = await evaluate(() => DEMO_BASE);
  rows.push({ label: "base (bf16)", bits: null, method: "none", aggregate: null, exact: ev.exact, mean: meanOf(ev.exact), relError: null, quantizeSeconds: 0, evalSeconds: ev.seconds });
}

for (const bits of bitsList) {
  const spec: QuantSpec = { bits, groupSize, sym: false, descAct: false };
  const configs: Array<{ method: Method; aggregate?: Aggregate }> = [];
  for (const m of methods) {
    if (m === "mlgptq") for (const a of aggregates) configs.push({ method: m, aggregate: a });
    else configs.push({ method: m });
  }
  for (const c of configs) {
    const label = `${c.method}${c.aggregate ? `[${c.aggregate}]` : ""} ${bits}-bit`;
    const out = join(work, "ckpt", `${c.method}-${c.aggregate ?? "x"}-${bits}`);
    say(`quantize: ${label}`);
    const q = quantize({
      baseDir: DEMO_BASE, outDir: out, method: c.method, spec, tasks: c.method === "rtn" ? [] : tasks,
      ...(c.aggregate && { aggregate: c.aggregate }),
      ...(calibLimit !== undefined && { calibLimit }),
      workDir: hessianDir, keepWork: true, progress: quiet,
    });
    const modelFor = (t: string): string => (c.method === "gptq" ? join(out, t) : out);
    say(`eval: ${label} (quantized in ${q.seconds.toFixed(1)} s)`);
    const ev = await evaluate(modelFor);
    const relError = relativeErrors(modelFor);
    rows.push({ label, bits, method: c.method, aggregate: c.aggregate ?? null, exact: ev.exact, mean: meanOf(ev.exact), relError, quantizeSeconds: q.seconds, evalSeconds: ev.seconds });
    say(`  ${DEMO_TASKS.map((t) => `${t} ${ev.exact[t]!.toFixed(3)}`).join(", ")}; mean ${meanOf(ev.exact).toFixed(3)} (${ev.seconds.toFixed(0)} s)`);
    rmSync(out, { recursive: true, force: true });
  }
}
const seconds = (performance.now() - t0) / 1000;

{
  const pct = (x: number): string => (100 * x).toFixed(1).padStart(6);
  const head = `| ${"model".padEnd(22)} | ${DEMO_TASKS.map((t) => t.padStart(7)).join(" | ")} |    mean |`;
  const lines = [
    `Exact match (%) on the demo's eval sets (${evalRows[DEMO_TASKS[0]]!.length} lines each); group size ${groupSize}, asymmetric; calibration: ${calibLimit ?? "all 256"} lines per task`,
    head,
    `|${"-".repeat(24)}|${DEMO_TASKS.map(() => "-".repeat(9)).join("|")}|${"-".repeat(9)}|`,
    ...rows.map((r) => `| ${r.label.padEnd(22)} | ${DEMO_TASKS.map((t) => ` ${pct(r.exact[t]!)}`).join(" | ")} |  ${pct(r.mean)} |`),
    "",
    "Relative output error of the quantized linears on each task's activations, sum tr(dW H_t dW^T) / sum tr(W H_t W^T), x1e-3",
    head,
    `|${"-".repeat(24)}|${DEMO_TASKS.map(() => "-".repeat(9)).join("|")}|${"-".repeat(9)}|`,
    ...rows.filter((r) => r.relError).map((r) => {
      const e = r.relError!;
      const m = DEMO_TASKS.reduce((a, t) => a + e[t]!, 0) / DEMO_TASKS.length;
      return `| ${r.label.padEnd(22)} | ${DEMO_TASKS.map((t) => ` ${(1000 * e[t]!).toFixed(2).padStart(6)}`).join(" | ")} |  ${(1000 * m).toFixed(2).padStart(6)} |`;
    }),
    "",
    `total ${(seconds / 60).toFixed(1)} min`,
  ];
  // With --json the table still goes to stderr, so one run gives both.
  (values.json ? process.stderr : process.stdout).write(`${lines.join("\n")}\n`);
}
if (values.json) {
  process.stdout.write(`${JSON.stringify({ group_size: groupSize, calib_limit: calibLimit ?? null, eval_rows: evalLimit ?? 200, seconds, rows }, null, 2)}\n`);
}
