// Exact match through the HTTP server: starts `inlaid serve` (a child process running the
// real CLI, or in this process with --server in-process) on a free port, sends every eval
// line of every task through the OpenAI API with the official `openai` client
// (completions, --concurrency requests in flight, the tasks interleaved so batches mix
// adapters), and scores the answers with the rule of `inlaid eval`
// (src/eval/exact_match.ts: the same sampling parameters - greedy, 48 tokens, no stop
// strings - and the same comparison). Then it evaluates the same lines in-process with
// the eval module on a fresh engine, and prints both side by side as JSON, with the
// lines whose text differs between the two.
//
//   node --import tsx bench/serve_eval.ts --model DIR [--adapter NAME=DIR]... [--device cpu]
//     [--data DIR] [--limit N] [--concurrency 32] [--server child|in-process]
//
// Without --adapter, the demo's four adapters. Task NAME's lines are DATA/NAME/eval.jsonl
// (--data defaults to examples/demo/data). Exits 1 when any line's text differs, 2 on errors.
// The 4-bit MLGPTQ demo checkpoint (the README's quantization table):
//   node --import tsx src/cli/main.ts quantize --model examples/demo/base --method mlgptq \
//     --bits 4 --group-size 64 --task reverse=examples/demo/adapters/reverse:examples/demo/data/reverse/calib.jsonl \
//     ... (sort, caesar, mirror) --out /tmp/demo-mlgptq4
//   node --import tsx bench/serve_eval.ts --model /tmp/demo-mlgptq4 --device cpu

import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import OpenAI from "openai";
import type { DeviceName } from "../src/backend/select.js";
import { DEMO_ADAPTERS, DEMO_DIR, PACKAGE_ROOT } from "../src/cli/paths.js";
import { createEngine } from "../src/engine/engine.js";
import type { FinishReason } from "../src/engine/types.js";
import {
  EVAL_MAX_TOKENS,
  evalSamplingParams,
  readEvalJsonl,
  runExactMatch,
  scoreRow,
  summarize,
  type EvalResult,
  type EvalRow,
  type EvalRowResult,
  type RowOutcome,
} from "../src/eval/exact_match.js";
import { startServer } from "../src/server/app.js";

export interface ServeEvalOptions {
  readonly modelDir: string;
  /** Adapter name -> PEFT folder; each name is a task, served as `model` NAME. */
  readonly adapters: Readonly<Record<string, string>>;
  /** Task -> eval lines. */
  readonly rows: Readonly<Record<string, readonly EvalRow[]>>;
  readonly device: DeviceName;
  /** "child": `inlaid serve` in a child process (what users run); "in-process": startServer here. */
  readonly server: "child" | "in-process";
  /** HTTP requests in flight at once. */
  readonly concurrency: number;
  readonly maxTokens?: number;
  readonly log?: (message: string) => void;
}

export interface TaskComparison {
  readonly task: string;
  readonly server: EvalResult;
  readonly inProcess: EvalResult;
  /** Indices of lines whose generated text differs between the two. */
  readonly differing: readonly number[];
}

export interface ServeEvalReport {
  readonly url: string;
  readonly tasks: readonly TaskComparison[];
  /** Wall time of all HTTP requests / of all in-process evals. */
  readonly serverSeconds: number;
  readonly inProcessSeconds: number;
}

interface Running {
  readonly url: string;
  close(): Promise<void>;
}

const MAIN = join(PACKAGE_ROOT, "src", "cli", "main.ts");

/** `inlaid serve` as a child on port 0; resolves with its URL once it prints it. */
async function startChild(opts: ServeEvalOptions): Promise<Running> {
  const args = [
    "--import", "tsx", MAIN, "serve", "--model", opts.modelDir, "--host", "127.0.0.1", "--port", "0", "--device", opts.device,
    ...Object.entries(opts.adapters).flatMap(([name, dir]) => ["--adapter", `${name}=${dir}`]),
  ];
  const child: ChildProcess = spawn(process.execPath, args, { cwd: PACKAGE_ROOT, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
  const url = await new Promise<string>((resolve, reject) => {
    child.on("error", reject);
    child.stdout!.on("data", (d: Buffer) => {
      stdout += d.toString();
      const m = /curl (http:\/\/\S+?)\/v1\/completions/.exec(stdout);
      if (m) resolve(m[1]!);
    });
    void exited.then((code) => reject(new Error(`inlaid serve exited with ${code} before it was ready:\n${stderr}`)));
  });
  return {
    url,
    async close() {
      child.kill("SIGTERM");
      const code = await exited;
      if (code !== 0) throw new Error(`inlaid serve exited with ${code} after SIGTERM:\n${stderr}`);
    },
  };
}

async function startInProcess(opts: ServeEvalOptions): Promise<Running> {
  const engine = await createEngine({ modelDir: opts.modelDir, adapters: opts.adapters, device: opts.device });
  const server = await startServer(engine, { host: "127.0.0.1", port: 0 });
  return {
    url: server.url,
    async close() {
      await server.close();
      await engine.close();
    },
  };
}

const FINISH: Readonly<Record<string, FinishReason>> = { stop: "stop", length: "length" };

/** One eval line through POST /v1/completions, with the eval's sampling parameters. */
async function complete(client: OpenAI, model: string, row: EvalRow, maxTokens: number): Promise<RowOutcome> {
  const p = evalSamplingParams(maxTokens);
  const body = {
    model, prompt: row.prompt, max_tokens: p.maxTokens, temperature: p.temperature, top_p: p.topP,
    ...(p.stop.length > 0 && { stop: p.stop }),
    // vLLM's extensions, which this server reads as well.
    top_k: p.topK, ignore_eos: p.ignoreEos,
  } as OpenAI.CompletionCreateParamsNonStreaming;
  try {
    const res = await client.completions.create(body);
    const choice = res.choices[0]!;
    return {
      got: choice.text,
      // Anything but stop/length (content_filter...) is not a normal finish: a miss.
      finishReason: FINISH[choice.finish_reason] ?? "error",
      promptTokens: res.usage?.prompt_tokens ?? 0,
      completionTokens: res.usage?.completion_tokens ?? 0,
    };
  } catch (err) {
    const status = err instanceof OpenAI.APIError ? `${err.status ?? "no status"}: ` : "";
    return { got: "", finishReason: null, promptTokens: 0, completionTokens: 0, error: `${status}${(err as Error).message}` };
  }
}

/** Every line of every task through the server, `concurrency` at a time, tasks interleaved. */
async function evalThroughServer(opts: ServeEvalOptions, url: string): Promise<{ results: Map<string, EvalResult>; seconds: number }> {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 600_000 });
  const served = new Set<string>();
  for await (const m of client.models.list()) served.add(m.id);
  const tasks = Object.keys(opts.rows);
  const missing = tasks.filter((t) => !served.has(t));
  if (missing.length > 0) throw new Error(`the server does not list ${missing.join(", ")} (it serves ${[...served].join(", ")})`);

  // Round-robin over tasks, so requests in flight mix adapters.
  const work: Array<{ task: string; index: number }> = [];
  const longest = Math.max(...tasks.map((t) => opts.rows[t]!.length));
  for (let i = 0; i < longest; i++) for (const t of tasks) if (i < opts.rows[t]!.length) work.push({ task: t, index: i });
  const scored = new Map(tasks.map((t) => [t, new Array<EvalRowResult>(opts.rows[t]!.length)]));
  const maxTokens = opts.maxTokens ?? EVAL_MAX_TOKENS;
  const t0 = performance.now();
  let next = 0;
  let done = 0;
  const worker = async (): Promise<void> => {
    while (next < work.length) {
      const { task, index } = work[next++]!;
      const row = opts.rows[task]![index]!;
      scored.get(task)![index] = scoreRow(row, await complete(client, task, row, maxTokens));
      if (++done % 100 === 0 || done === work.length) opts.log?.(`server: ${done}/${work.length} lines`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency, work.length) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  return { results: new Map(tasks.map((t) => [t, summarize(t, scored.get(t)!, seconds)])), seconds };
}

/** The same lines through the eval module on a fresh engine, as `inlaid eval` runs them. */
async function evalInProcess(opts: ServeEvalOptions): Promise<{ results: Map<string, EvalResult>; seconds: number }> {
  const t0 = performance.now();
  const most = Math.max(...Object.values(opts.rows).map((r) => r.length));
  const engine = await createEngine({
    modelDir: opts.modelDir, adapters: opts.adapters, device: opts.device, maxBatch: Math.min(256, most), maxWaiting: Math.max(4096, most),
  });
  const results = new Map<string, EvalResult>();
  try {
    for (const [task, rows] of Object.entries(opts.rows)) {
      results.set(task, await runExactMatch(engine, task, rows, { maxTokens: opts.maxTokens ?? EVAL_MAX_TOKENS }));
      opts.log?.(`in-process: ${task} done`);
    }
  } finally {
    await engine.close();
  }
  return { results, seconds: (performance.now() - t0) / 1000 };
}

export async function serveEval(opts: ServeEvalOptions): Promise<ServeEvalReport> {
  for (const t of Object.keys(opts.rows)) if (!(t in opts.adapters)) throw new Error(`task ${t} has no adapter; pass --adapter ${t}=DIR`);
  const running = await (opts.server === "child" ? startChild(opts) : startInProcess(opts));
  opts.log?.(`server at ${running.url}`);
  let served: Awaited<ReturnType<typeof evalThroughServer>>;
  try {
    served = await evalThroughServer(opts, running.url);
  } finally {
    await running.close();
  }
  const local = await evalInProcess(opts);
  const tasks = Object.keys(opts.rows).map((task): TaskComparison => {
    const server = served.results.get(task)!, inProcess = local.results.get(task)!;
    const differing = server.rows.flatMap((r, i) => (r.got !== inProcess.rows[i]!.got || r.exact !== inProcess.rows[i]!.exact ? [i] : []));
    return { task, server, inProcess, differing };
  });
  return { url: running.url, tasks, serverSeconds: served.seconds, inProcessSeconds: local.seconds };
}

const mean = (xs: readonly number[]): number => xs.reduce((a, x) => a + x, 0) / xs.length;

/** The report as printed: fractions of exact matches per task and their mean, both ways. */
export function reportJson(report: ServeEvalReport, opts: ServeEvalOptions): unknown {
  const SHOWN = 5;
  return {
    model: opts.modelDir,
    device: opts.device,
    server: opts.server,
    concurrency: opts.concurrency,
    max_tokens: opts.maxTokens ?? EVAL_MAX_TOKENS,
    tasks: Object.fromEntries(
      report.tasks.map((t) => [
        t.task,
        {
          n: t.server.n,
          server_exact_match: t.server.exactMatch,
          in_process_exact_match: t.inProcess.exactMatch,
          server_errors: t.server.rows.filter((r) => r.error !== undefined).length,
          differing_lines: t.differing.length,
          first_differences: t.differing.slice(0, SHOWN).map((i) => ({
            line: i + 1, prompt: t.server.rows[i]!.prompt, server: t.server.rows[i]!.got, in_process: t.inProcess.rows[i]!.got,
            ...(t.server.rows[i]!.error !== undefined && { server_error: t.server.rows[i]!.error }),
          })),
        },
      ]),
    ),
    mean: {
      server_exact_match: mean(report.tasks.map((t) => t.server.exactMatch)),
      in_process_exact_match: mean(report.tasks.map((t) => t.inProcess.exactMatch)),
    },
    identical: report.tasks.every((t) => t.differing.length === 0),
    server_seconds: report.serverSeconds,
    in_process_seconds: report.inProcessSeconds,
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      model: { type: "string" },
      adapter: { type: "string", multiple: true },
      device: { type: "string", default: "cpu" },
      data: { type: "string", default: join(DEMO_DIR, "data") },
      limit: { type: "string" },
      concurrency: { type: "string", default: "32" },
      server: { type: "string", default: "child" },
    },
  });
  if (!values.model) throw new Error("--model DIR is required");
  const adapters: Record<string, string> = values.adapter?.length
    ? Object.fromEntries(values.adapter.map((a) => {
      const eq = a.indexOf("=");
      if (eq <= 0) throw new Error(`--adapter expects NAME=DIR, got '${a}'`);
      return [a.slice(0, eq), a.slice(eq + 1)];
    }))
    : { ...DEMO_ADAPTERS };
  if (!["auto", "cpu", "cuda"].includes(values.device!)) throw new Error(`--device expects auto, cpu or cuda, got '${values.device}'`);
  if (values.server !== "child" && values.server !== "in-process") throw new Error(`--server expects child or in-process, got '${values.server}'`);
  const limit = values.limit === undefined ? undefined : Number(values.limit);
  const concurrency = Number(values.concurrency);
  if (!(Number.isSafeInteger(concurrency) && concurrency > 0)) throw new Error(`--concurrency expects a positive integer, got '${values.concurrency}'`);
  const opts: ServeEvalOptions = {
    modelDir: values.model,
    adapters,
    rows: Object.fromEntries(Object.keys(adapters).map((t) => [t, readEvalJsonl(join(values.data!, t, "eval.jsonl"), limit)])),
    device: values.device as DeviceName,
    server: values.server,
    concurrency,
    log: (m) => void process.stderr.write(`${m}\n`),
  };
  const report = await serveEval(opts);
  const json = reportJson(report, opts) as { identical: boolean };
  process.stdout.write(`${JSON.stringify(json, null, 2)}\n`);
  if (!json.identical) process.exitCode = 1;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main().catch((err: unknown) => {
    process.stderr.write(`serve_eval: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 2;
  });
}
