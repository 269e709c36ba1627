// `inlaid generate`: one prompt, streamed to stdout; a stats line on stderr.

import { Command, Option } from "commander";
import type { DeviceName } from "../backend/select.js";
import type { SamplingParams } from "../engine/types.js";
import { loadEngine } from "./load.js";
import {
  type AdapterSpec,
  deviceOption,
  parseAdapterSpec,
  parsePositiveInt,
  parseSeed,
  parseTemperature,
  parseTopK,
  parseTopP,
} from "./options.js";
import { createProgress } from "./progress.js";

interface GenerateFlags {
  model: string;
  adapter?: AdapterSpec;
  prompt: string;
  maxTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed?: number;
  device: DeviceName;
}

export function addGenerateCommand(program: Command): Command {
  return program
    .command("generate")
    .description("generate a completion for one prompt, streamed to stdout")
    .requiredOption("--model <dir>", "base model folder (Hugging Face layout)")
    .addOption(new Option("--adapter <NAME=DIR>", "LoRA adapter (PEFT folder) to apply").argParser(parseAdapterSpec))
    .requiredOption("--prompt <text>", "prompt text")
    .addOption(new Option("--max-tokens <n>", "most tokens to generate").argParser(parsePositiveInt("--max-tokens")).default(64))
    .addOption(new Option("--temperature <t>", "sampling temperature; 0 = greedy").argParser(parseTemperature).default(0))
    .addOption(new Option("--top-p <p>", "nucleus sampling mass; 1 = off").argParser(parseTopP).default(1))
    .addOption(new Option("--top-k <k>", "sample from the k most likely tokens; 0 = off").argParser(parseTopK).default(0))
    .addOption(new Option("--seed <n>", "seed for reproducible sampling").argParser(parseSeed))
    .addOption(deviceOption())
    .action(async (flags: GenerateFlags) => {
      await generate(flags);
    });
}

async function generate(flags: GenerateFlags): Promise<void> {
  const progress = createProgress();
  const adapters = flags.adapter ? { [flags.adapter.name]: flags.adapter.dir } : {};
  const engine = await loadEngine({ modelDir: flags.model, adapters, device: flags.device, maxBatch: 1 }, progress);
  try {
    const params: SamplingParams = {
      maxTokens: flags.maxTokens,
      temperature: flags.temperature,
      topP: flags.topP,
      topK: flags.topK,
      ...(flags.seed !== undefined && { seed: flags.seed }),
      stop: [],
      ignoreEos: false,
      logprobs: -1,
    };
    const promptIds = engine.tokenizer.encode(flags.prompt);
    const abort = new AbortController();
    const onSigint = (): void => abort.abort();
    process.once("SIGINT", onSigint);
    const t0 = performance.now();
    let firstAt: number | null = null;
    let completionTokens = 0;
    let finish: string | null = null;
    try {
      const stream = engine.generate({ id: "generate-0", promptIds, adapter: flags.adapter?.name ?? null, params }, abort.signal);
      for await (const out of stream) {
        if (out.text) process.stdout.write(out.text);
        if (firstAt === null && out.completionTokens > 0) firstAt = performance.now();
        completionTokens = out.completionTokens;
        finish = out.finishReason ?? finish;
      }
    } finally {
      process.off("SIGINT", onSigint);
    }
    if (process.stdout.isTTY) process.stdout.write("\n");
    const secs = (performance.now() - t0) / 1000;
    const ttft = firstAt === null ? "-" : `${(firstAt - t0).toFixed(0)} ms`;
    const tps = secs > 0 ? (completionTokens / secs).toFixed(1) : "-";
    process.stderr.write(
      `prompt tokens: ${promptIds.length}, generated tokens: ${completionTokens}, ${tps} tokens/s ` +
        `(${secs.toFixed(2)} s, first token ${ttft}), finish: ${finish ?? "-"}\n`,
    );
    if (finish === "abort") process.exitCode = 130;
    if (finish === "error") throw new Error("generation failed inside the engine (see the warning above)");
  } finally {
    await engine.close();
  }
}
