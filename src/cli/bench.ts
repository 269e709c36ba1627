// `inlaid bench`: offline mixed-adapter throughput (src/bench/offline.ts says what is
// measured and how), on a model folder or on one of the shapes in bench/configs/.

import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { Command, InvalidArgumentError, Option } from "commander";
import type { DeviceName } from "../backend/select.js";
import type { OfflineBenchResult } from "../bench/offline.js";
import { deviceOption, parsePositiveInt, schedulerStepsOption, UsageError } from "./options.js";
import { PACKAGE_ROOT } from "./paths.js";
import { createProgress } from "./progress.js";

/** Model shapes shipped for benchmarks (config.json + a stand-in tokenizer each). */
export const BENCH_CONFIGS_DIR = join(PACKAGE_ROOT, "bench", "configs");

const LOAD_FORMATS = ["safetensors", "dummy"] as const;
type LoadFormat = (typeof LOAD_FORMATS)[number];

interface BenchFlags {
  model?: string;
  config?: string;
  loadFormat?: LoadFormat;
  device: DeviceName;
  batch: number;
  promptLen: number;
  gen: number;
  adapters: number;
  rank: number;
  warmup: boolean;
  bandwidthGbs?: number;
  maxBatchedTokens?: number;
  adapterCache?: string;
  seed: number;
  numSchedulerSteps?: number;
  json?: boolean;
}

function parseNonNegativeInt(flag: string): (value: string) => number {
  return (value: string) => {
    const n = /^\+?\d+$/.test(value.trim()) ? Number(value) : NaN;
    if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`${flag} expects an integer >= 0, got '${value}'`);
    return n;
  };
}

function parseBandwidth(value: string): number {
  const n = value.trim() === "" ? NaN : Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError(`--bandwidth-gbs expects a number > 0 (GB/s), got '${value}'`);
  return n;
}

export function benchConfigNames(): string[] {
  if (!existsSync(BENCH_CONFIGS_DIR)) return [];
  return readdirSync(BENCH_CONFIGS_DIR).filter((n) => existsSync(join(BENCH_CONFIGS_DIR, n, "config.json"))).sort();
}

export function addBenchCommand(program: Command): Command {
  return program
    .command("bench")
    .description("offline throughput: B requests of P random tokens, G generated each, K adapters round-robin; tokens/s, prefill, decode step and its roofline")
    .option("--model <dir>", "model folder (Hugging Face layout; weights optional with --load-format dummy)")
    .option("--config <name>", `a shape from bench/configs/ instead of --model (${benchConfigNames().join(", ") || "none found"})`)
    .addOption(new Option("--load-format <format>", "read the checkpoint, or random weights from config.json alone (default: dummy when the folder has no *.safetensors)").choices(LOAD_FORMATS))
    .addOption(deviceOption())
    .addOption(new Option("--batch <n>", "requests, all submitted at once").argParser(parsePositiveInt("--batch")).default(32))
    .addOption(new Option("--prompt-len <n>", "prompt tokens per request (random ids)").argParser(parsePositiveInt("--prompt-len")).default(128))
    .addOption(new Option("--gen <n>", "tokens generated per request (EOS ignored)").argParser(parsePositiveInt("--gen")).default(128))
    .addOption(new Option("--adapters <k>", "synthetic LoRA adapters, round-robin over the requests (0 = base model only)").argParser(parseNonNegativeInt("--adapters")).default(8))
    .addOption(new Option("--rank <r>", "rank of the synthetic adapters (all seven projections)").argParser(parsePositiveInt("--rank")).default(16))
    .option("--warmup", "run a short untimed batch first (same batch, 4 tokens)", true)
    .option("--no-warmup", "skip the warm-up run")
    .addOption(new Option("--bandwidth-gbs <x>", "device memory bandwidth for the roofline, GB/s (default: measured)").argParser(parseBandwidth))
    .addOption(new Option("--max-batched-tokens <n>", "prompt tokens prefilled per step (default: all prompts at once, at most 8192)").argParser(parsePositiveInt("--max-batched-tokens")))
    .option("--adapter-cache <dir>", "where synthetic adapters are written and reused (default: $TMPDIR/inlaid-bench-adapters)")
    .addOption(new Option("--seed <n>", "seed of the random prompts").argParser(parseNonNegativeInt("--seed")).default(0))
    .addOption(schedulerStepsOption())
    .option("--json", "print one JSON object on stdout instead of the summary")
    .action(async (flags: BenchFlags) => {
      await bench(flags);
    });
}

function resolveModel(flags: BenchFlags): { dir: string; name: string } {
  if (flags.model !== undefined && flags.config !== undefined) throw new UsageError("give either --model or --config, not both");
  if (flags.config !== undefined) {
    const dir = join(BENCH_CONFIGS_DIR, flags.config);
    if (!existsSync(join(dir, "config.json"))) {
      throw new UsageError(`--config: no shape '${flags.config}' in ${BENCH_CONFIGS_DIR}; known: ${benchConfigNames().join(", ") || "none"}`);
    }
    return { dir, name: flags.config };
  }
  if (flags.model === undefined) throw new UsageError("give --model DIR or --config NAME");
  let isDir = false;
  try {
    isDir = statSync(flags.model).isDirectory();
  } catch {
    // reported below
  }
  if (!isDir) throw new UsageError(`--model: no such folder '${flags.model}'`);
  return { dir: flags.model, name: flags.model.replace(/\/+$/, "").split("/").pop() ?? flags.model };
}

function hasSafetensors(dir: string): boolean {
  return readdirSync(dir).some((f) => f.endsWith(".safetensors"));
}

async function bench(flags: BenchFlags): Promise<void> {
  const { dir, name } = resolveModel(flags);
  const loadFormat = flags.loadFormat ?? (hasSafetensors(dir) ? "safetensors" : "dummy");
  if (loadFormat === "safetensors" && !hasSafetensors(dir)) {
    throw new UsageError(`--load-format safetensors: ${dir} has no *.safetensors; use --load-format dummy for random weights`);
  }
  const progress = createProgress();
  // Loaded here, not at the top: `inlaid --help` stays instant.
  const { runOfflineBench } = await import("../bench/offline.js");
  const result = await runOfflineBench(
    {
      modelDir: dir,
      modelName: name,
      loadFormat,
      device: flags.device,
      batch: flags.batch,
      promptLen: flags.promptLen,
      gen: flags.gen,
      adapters: flags.adapters,
      rank: flags.rank,
      warmup: flags.warmup,
      ...(flags.bandwidthGbs !== undefined && { bandwidthGbs: flags.bandwidthGbs }),
      ...(flags.maxBatchedTokens !== undefined && { maxBatchedTokens: flags.maxBatchedTokens }),
      ...(flags.adapterCache !== undefined && { adapterCache: flags.adapterCache }),
      seed: flags.seed,
      ...(flags.numSchedulerSteps !== undefined && { schedulerSteps: flags.numSchedulerSteps }),
    },
    progress,
  );
  process.stdout.write(flags.json ? `${JSON.stringify(result)}\n` : summary(result));
}

function summary(r: OfflineBenchResult): string {
  const gb = (b: number): string => `${(b / 1e9).toFixed(3)} GB`;
  const d = r.decode_step_ms;
  const rf = r.roofline;
  const lines = [
    `model        ${r.model} (${r.shape.architecture}, ${r.shape.layers} layers, hidden ${r.shape.hidden}, ${r.load_format} weights)`,
    `device       ${r.device} (${r.backend} backend) on ${r.machine}`,
    `workload     ${r.batch} requests x (${r.prompt_len} prompt + ${r.gen} generated) tokens, ${r.adapters ? `${r.adapters} adapters of rank ${r.rank} round-robin` : "no adapters"}`,
    `wall time    ${r.seconds.toFixed(3)} s in ${r.steps} steps`,
    `throughput   ${r.output_tokens_per_s.toFixed(1)} output tokens/s, ${r.total_tokens_per_s.toFixed(1)} total tokens/s`,
    `prefill      ${r.prefill_s.toFixed(3)} s (until every request has its first token)`,
    d ? `decode step  mean ${d.mean.toFixed(3)} ms, p50 ${d.p50.toFixed(3)} ms, p99 ${d.p99.toFixed(3)} ms (${d.n} steps; ${r.decode_tokens_per_s?.toFixed(1)} tokens/s)` : "decode step  none (--gen 1)",
    `roofline     ${gb(rf.bytes_per_step)} per step (weights ${gb(rf.weights_bytes)}, adapters ${gb(rf.adapter_bytes)}, KV ${gb(rf.kv_bytes)})` +
      (rf.step_ms !== null ? ` / ${rf.bandwidth_gbs} GB/s (${rf.bandwidth_source}) = ${rf.step_ms.toFixed(3)} ms` : " (bandwidth unknown: pass --bandwidth-gbs)"),
  ];
  if (rf.ratio !== null) lines.push(`vs roofline  ${rf.ratio.toFixed(2)}x the roofline step time`);
  if (d) lines.push(`host         ${r.host_us_per_decode_step.toFixed(1)} us per decode step (device idle ${r.device_idle_us_per_decode_step.toFixed(1)} us)${r.graph_launch ? `, graphs launched from the ${r.graph_launch === "host" ? "host" : "device"}` : ""}`);
  return `${lines.join("\n")}\n`;
}
