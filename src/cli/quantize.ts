// `inlaid quantize`: a quantized checkpoint (GPTQ layout + mlgptq/) from an unquantized
// base and tasks (adapter + calibration data), or, with --from, an existing checkpoint
// with tasks added (incremental: only the new tasks' Hessians are computed).
// src/quant/methods.ts says what each method does.

import { existsSync, statSync } from "node:fs";
import { Command, InvalidArgumentError, Option } from "commander";
import type { DeviceName } from "../backend/select.js";
import { collectTask, deviceOption, parsePositiveInt, type TaskSpec, UsageError } from "./options.js";
import { createProgress } from "./progress.js";

// Mirrors of quant/methods.ts and quant/aggregate.ts, kept here so `--help` and usage
// errors do not load the quantization code; a test checks they agree.
export const QUANT_METHODS = ["mlgptq", "gptq", "gptq-mixed", "rtn"] as const;
export const QUANT_AGGREGATES = ["max", "mean", "max-psd", "max-diag", "inv-max"] as const;

interface QuantizeFlags {
  model?: string;
  from?: string;
  task?: TaskSpec[];
  method?: (typeof QUANT_METHODS)[number];
  bits?: 2 | 3 | 4 | 8;
  groupSize?: number;
  actOrder?: boolean;
  sym?: boolean;
  staticGroups?: boolean;
  aggregate?: (typeof QUANT_AGGREGATES)[number];
  damp?: number;
  calibLimit?: number;
  work?: string;
  keepWork?: boolean;
  out: string;
  json?: boolean;
  device: DeviceName;
}

function parseBits(value: string): 2 | 3 | 4 | 8 {
  const b = Number(value);
  if (![2, 3, 4, 8].includes(b) || !/^\d$/.test(value.trim())) throw new InvalidArgumentError(`--bits expects 2, 3, 4 or 8, got '${value}'`);
  return b as 2 | 3 | 4 | 8;
}

function parseGroupSize(value: string): number {
  const n = /^-?\d+$/.test(value.trim()) ? Number(value) : NaN;
  if (!(n === -1 || (Number.isSafeInteger(n) && n > 0))) throw new InvalidArgumentError(`--group-size expects a positive integer or -1 (one group per row), got '${value}'`);
  return n;
}

function parseDamp(value: string): number {
  const n = value.trim() === "" ? NaN : Number(value);
  if (!Number.isFinite(n) || n <= 0 || n >= 1) throw new InvalidArgumentError(`--damp expects a fraction in (0, 1) of the mean Hessian diagonal, got '${value}'`);
  return n;
}

export function addQuantizeCommand(program: Command): Command {
  return program
    .command("quantize")
    .description(
      "quantize a base model for a set of tasks (GPTQ layout + mlgptq/ cache), or add tasks to a quantized model with --from",
    )
    .option("--model <dir>", "unquantized base model folder (Hugging Face layout); with --from, the base's new location if it moved")
    .option("--from <quant_dir>", "incremental: add --task(s) to this checkpoint (written by inlaid quantize) and re-solve")
    .addOption(
      new Option("--task <NAME=ADAPTER_DIR:CALIB.jsonl>", "a task: its LoRA adapter and {prompt, completion} calibration lines (repeatable; ADAPTER_DIR may be empty for gptq-mixed)")
        .argParser(collectTask),
    )
    .addOption(new Option("--method <method>", "mlgptq: joint, adapters on (default); gptq: one base per task (OUT/TASK); gptq-mixed: pooled, no adapters; rtn").choices(QUANT_METHODS))
    .addOption(new Option("--bits <n>", "bits per weight: 2, 3, 4 or 8").argParser(parseBits))
    .addOption(new Option("--group-size <n>", "inputs per quantization group, -1 for one per row (default 128)").argParser(parseGroupSize))
    .option("--act-order", "solve inputs by decreasing Hessian diagonal (desc_act)")
    .option("--sym", "symmetric quantization (zero point fixed at 2^(bits-1)); default asymmetric")
    .option("--static-groups", "with --act-order: fix groups in input order up front (monotone g_idx)")
    .addOption(new Option("--aggregate <how>", "mlgptq: how per-task Hessians combine (default mean; max is DESIGN §3's element-wise max)").choices(QUANT_AGGREGATES))
    .addOption(new Option("--damp <fraction>", "initial GPTQ damping, fraction of the mean Hessian diagonal (default 0.01)").argParser(parseDamp))
    .addOption(new Option("--calib-limit <n>", "use the first n calibration lines of each task (default: all)").argParser(parsePositiveInt("--calib-limit")))
    .option("--work <dir>", "folder for per-task Hessians, reused when a run is resumed (default OUT.work)")
    .option("--keep-work", "keep the work folder after success (to reuse Hessians for other bit widths or methods)")
    .requiredOption("--out <dir>", "output folder (replaced atomically); per-task gptq writes OUT/TASK/")
    .addOption(deviceOption())
    .option("--json", "print a JSON summary on stdout")
    .addHelpText(
      "after",
      `
Examples:
  inlaid quantize --model base --method mlgptq --bits 4 --group-size 64 \\
    --task reverse=adapters/reverse:data/reverse/calib.jsonl --task sort=adapters/sort:data/sort/calib.jsonl --out base-4bit
  inlaid quantize --from base-4bit --task caesar=adapters/caesar:data/caesar/calib.jsonl --out base-4bit-3tasks

Calibration text is each line's prompt (with BOS) followed by its completion, as the
model reads it while answering in \`inlaid eval\`. A crash resumes from the work folder.

--device cuda (auto: when a GPU is present) streams the base layer by layer through the GPU:
every task's calibration runs one layer at a time with its adapter on, the layer's Hessians
are summed on the device and solved with GPTQ on the GPU while only that layer is resident
(one layer + its Hessians + the tasks' hidden states: under 4 GB for a 7B base). Its
Hessians come from bf16 activations, so they differ slightly from --device cpu's; add tasks
to a checkpoint on the device it was made on for byte-identical results. rtn runs on the CPU.`,
    )
    .action(async (flags: QuantizeFlags) => {
      await quantizeCommand(flags);
    });
}

const FROM_CONFLICTS: ReadonlyArray<[keyof QuantizeFlags, string]> = [
  ["method", "--method"], ["bits", "--bits"], ["groupSize", "--group-size"], ["actOrder", "--act-order"], ["sym", "--sym"],
  ["staticGroups", "--static-groups"], ["aggregate", "--aggregate"], ["damp", "--damp"], ["calibLimit", "--calib-limit"],
];

function requireDir(path: string, flag: string): void {
  if (!existsSync(path) || !statSync(path).isDirectory()) throw new UsageError(`${flag}: no such folder '${path}'`);
}

async function quantizeCommand(flags: QuantizeFlags): Promise<void> {
  const tasks = flags.task ?? [];
  if (flags.from !== undefined) {
    const given = FROM_CONFLICTS.filter(([k]) => flags[k] !== undefined).map(([, f]) => f);
    if (given.length > 0) throw new UsageError(`--from takes the method, spec and calibration settings from the checkpoint; drop ${given.join(", ")}`);
    if (tasks.length === 0) throw new UsageError("--from needs at least one --task NAME=ADAPTER_DIR:CALIB.jsonl to add");
    requireDir(flags.from, "--from");
    if (flags.model !== undefined) requireDir(flags.model, "--model");
  } else {
    if (flags.model === undefined) throw new UsageError("--model is required (or --from to add tasks to a quantized model)");
    if (flags.bits === undefined) throw new UsageError("--bits is required: 2, 3, 4 or 8");
    flags.method ??= "mlgptq";
    if (flags.aggregate !== undefined && flags.method !== "mlgptq") throw new UsageError(`--aggregate applies to --method mlgptq only`);
    if (flags.staticGroups && !flags.actOrder) throw new UsageError("--static-groups only matters with --act-order");
    if (flags.method === "rtn" && flags.actOrder) throw new UsageError("--act-order needs a Hessian to order inputs by; rtn has none");
    if (flags.method !== "rtn" && tasks.length === 0) throw new UsageError(`--method ${flags.method} needs at least one --task NAME=ADAPTER_DIR:CALIB.jsonl`);
    requireDir(flags.model, "--model");
  }

  const progress = createProgress();
  // Loaded here: `--help` and usage errors stay instant.
  const { quantize, quantizeIncremental } = await import("../quant/methods.js");
  const common = {
    outDir: flags.out,
    tasks: tasks.map((t) => ({ name: t.name, adapterDir: t.adapterDir, calibPath: t.calibPath })),
    ...(flags.work !== undefined && { workDir: flags.work }),
    keepWork: flags.keepWork === true,
    progress,
  };
  const fresh = {
    ...common,
    baseDir: flags.model!,
    method: flags.method!,
    spec: { bits: flags.bits!, groupSize: flags.groupSize ?? 128, sym: flags.sym === true, descAct: flags.actOrder === true },
    ...(flags.aggregate !== undefined && { aggregate: flags.aggregate }),
    ...(flags.staticGroups && { staticGroups: true }),
    ...(flags.damp !== undefined && { percDamp: flags.damp }),
    ...(flags.calibLimit !== undefined && { calibLimit: flags.calibLimit }),
  };
  const incremental = { ...common, fromDir: flags.from!, ...(flags.model !== undefined && { baseDir: flags.model }) };

  let result: Awaited<ReturnType<typeof quantize>> & { phases?: unknown; peakExtraBytes?: number | null; device?: string };
  const device = flags.from === undefined && flags.method === "rtn" ? "cpu" : await resolveDevice(flags.device, flags.from);
  if (device === "cpu") {
    result = flags.from !== undefined ? quantizeIncremental(incremental) : quantize(fresh);
  } else {
    const [{ createBackend }, { quantizeOnDevice, quantizeIncrementalOnDevice }, { cpuGptqSolver, cudaGptqSolver }] = await Promise.all([
      import("../backend/select.js"), import("../quant/stream_quantize.js"), import("../quant/gpu_gptq.js"),
    ]);
    const backend = await createBackend("cuda");
    let solver;
    try {
      solver = await cudaGptqSolver(backend as import("../backend/cuda/cuda_backend.js").CudaBackend);
    } catch (e) {
      progress.note(`GPTQ solves on the CPU: ${e instanceof Error ? e.message : String(e)}`);
      solver = cpuGptqSolver();
    }
    try {
      const dev = { backend, solver };
      result = flags.from !== undefined ? quantizeIncrementalOnDevice({ ...incremental, ...dev }) : quantizeOnDevice({ ...fresh, ...dev });
    } finally {
      solver.dispose();
      (backend as { dispose?: () => void }).dispose?.();
    }
  }

  const worst = result.stats.reduce<(typeof result.stats)[number] | null>((a, s) => (a === null || s.damp > a.damp ? s : a), null);
  if (flags.json) {
    process.stdout.write(`${JSON.stringify({
      out: result.outDirs,
      seconds: result.seconds,
      linears: result.stats.length,
      max_damp: worst?.damp ?? null,
      max_damp_linear: worst?.name ?? null,
      raised_damping: result.stats.filter((s) => s.attempts > 1).length,
      dead_inputs: result.stats.reduce((a, s) => a + s.deadColumns, 0),
      device: result.device ?? "cpu",
      ...(result.phases !== undefined && { phases: result.phases, peak_extra_gpu_bytes: result.peakExtraBytes }),
    })}\n`);
    return;
  }
  const lines = [`wrote ${result.outDirs.join(", ")} in ${result.seconds.toFixed(1)} s`];
  if (worst) {
    const raised = result.stats.filter((s) => s.attempts > 1).length;
    lines.push(`${result.stats.length} linears solved; damping raised above the initial value for ${raised}` + (raised > 0 ? ` (most: ${worst.damp} x mean diag, ${worst.name})` : ""));
  }
  process.stdout.write(`${lines.join("\n")}\n`);
}

/** auto: the device a --from checkpoint's Hessians were captured on (so added tasks fold in
 * byte-identically), else cuda when a GPU is usable, else cpu. */
async function resolveDevice(device: DeviceName, from: string | undefined): Promise<"cpu" | "cuda"> {
  if (device !== "auto") return device;
  if (from !== undefined) {
    const { readManifest } = await import("../quant/mlgptq_dir.js");
    return readManifest(from).calibration.device === "stream-cuda" ? "cuda" : "cpu";
  }
  try {
    const { CudaBackend } = await import("../backend/cuda/cuda_backend.js");
    return CudaBackend.available() ? "cuda" : "cpu";
  } catch {
    return "cpu";
  }
}
