// `inlaid eval`: exact match of one adapter on a {prompt, completion} jsonl file.

import { Command, Option } from "commander";
import type { DeviceName } from "../backend/select.js";
import { EVAL_MAX_TOKENS, failures, readEvalJsonl, runExactMatch, type EvalResult } from "../eval/exact_match.js";
import { loadEngine } from "./load.js";
import { type AdapterSpec, deviceOption, maxBatchOption, parseAdapterSpec, parsePositiveInt } from "./options.js";
import { createProgress } from "./progress.js";

interface EvalFlags {
  model: string;
  adapter: AdapterSpec;
  data: string;
  limit?: number;
  json?: boolean;
  maxTokens: number;
  device: DeviceName;
  maxBatch?: number;
}

const SHOWN_FAILURES = 5;

export function addEvalCommand(program: Command): Command {
  return program
    .command("eval")
    .description("exact-match accuracy of an adapter on a jsonl file of {prompt, completion} lines")
    .requiredOption("--model <dir>", "base model folder (Hugging Face layout)")
    .addOption(
      new Option("--adapter <NAME=DIR>", "LoRA adapter (PEFT folder) to evaluate").argParser(parseAdapterSpec).makeOptionMandatory(),
    )
    .requiredOption("--data <file.jsonl>", 'one {"prompt", "completion"} object per line')
    .addOption(new Option("--limit <n>", "evaluate only the first n lines").argParser(parsePositiveInt("--limit")))
    .option("--json", "print one JSON object on stdout instead of the summary")
    .addOption(new Option("--max-tokens <n>", "most tokens to generate per prompt").argParser(parsePositiveInt("--max-tokens")).default(EVAL_MAX_TOKENS))
    .addOption(deviceOption())
    .addOption(maxBatchOption("default: min(256, rows)"))
    .action(async (flags: EvalFlags) => {
      await evaluate(flags);
    });
}

async function evaluate(flags: EvalFlags): Promise<void> {
  // Read the data first: a bad line should not wait for the model to load.
  const rows = readEvalJsonl(flags.data, flags.limit);
  const progress = createProgress();
  const { name, dir } = flags.adapter;
  const engine = await loadEngine(
    {
      modelDir: flags.model,
      adapters: { [name]: dir },
      device: flags.device,
      // Every row is queued at once: the queue must hold them all, and a batch larger
      // than the row count would only reserve KV cache that is never used.
      maxWaiting: Math.max(4096, rows.length),
      maxBatch: flags.maxBatch ?? Math.min(256, rows.length),
    },
    progress,
  );
  let result: EvalResult;
  try {
    progress.start(`eval ${name}`, rows.length, "prompts");
    try {
      result = await runExactMatch(engine, name, rows, {
        maxTokens: flags.maxTokens,
        onProgress: (done) => progress.update(done),
      });
    } finally {
      progress.stop();
    }
  } finally {
    await engine.close();
  }
  const failed = failures(result).slice(0, SHOWN_FAILURES);
  const errors = result.rows.filter((r) => r.error !== undefined);
  if (errors.length > 0) {
    process.stderr.write(`inlaid: ${errors.length} prompt(s) could not run; first: ${errors[0]!.error}\n`);
  }
  if (flags.json) {
    const out = {
      adapter: name,
      data: flags.data,
      n: result.n,
      exact_match: result.exactMatch,
      exact_match_trimmed: result.exactMatchTrimmed,
      seconds: result.seconds,
      tokens_per_s: result.tokensPerS,
      failures: failed.map((r) => ({ prompt: r.prompt, expected: r.expected, got: r.got })),
    };
    process.stdout.write(`${JSON.stringify(out)}\n`);
    return;
  }
  const exact = result.rows.filter((r) => r.exact).length;
  const trimmed = result.rows.filter((r) => r.trimmed).length;
  const lines = [
    `adapter      ${name}`,
    `data         ${flags.data}`,
    `n            ${result.n}`,
    `exact match  ${result.exactMatch.toFixed(3)} (${exact}/${result.n})`,
    `  trimmed    ${result.exactMatchTrimmed.toFixed(3)} (${trimmed}/${result.n})`,
    `tokens/s     ${result.tokensPerS.toFixed(1)} (${result.completionTokens} generated)`,
    `wall time    ${result.seconds.toFixed(2)} s`,
  ];
  if (failed.length > 0) {
    lines.push(`first ${failed.length} failure(s):`);
    for (const f of failed) lines.push(`  ${JSON.stringify(f.prompt)} expected ${JSON.stringify(f.expected)} got ${JSON.stringify(f.got)}`);
  }
  process.stdout.write(`${lines.join("\n")}\n`);
}
