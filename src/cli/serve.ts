// `inlaid serve`: the OpenAI-compatible server over one engine, until SIGINT/SIGTERM.

import { Command, Option } from "commander";
import type { DeviceName } from "../backend/select.js";
import { POLICIES } from "../scheduler/index.js";
import { loadEngine } from "./load.js";
import {
  type AdapterSpec,
  UsageError,
  adaptersRecord,
  collectAdapter,
  deviceOption,
  maxBatchOption,
  parsePort,
  parsePositiveInt,
  schedulerStepsOption,
} from "./options.js";
import { DEMO_ADAPTERS, DEMO_BASE, DEMO_PROMPT } from "./paths.js";
import { createProgress } from "./progress.js";

interface ServeFlags {
  model?: string;
  demo?: boolean;
  adapter?: AdapterSpec[];
  host: string;
  port: number;
  device: DeviceName;
  apiKey?: string;
  maxBatch?: number;
  policy: string;
  maxModelLen?: number;
  servedModelName?: string;
  maxLoras?: number;
  maxLoraRank?: number;
  numSchedulerSteps?: number;
}

/** A second signal while shutting down gives up waiting after this long. */
const SHUTDOWN_TIMEOUT_MS = 10_000;

export function addServeCommand(program: Command): Command {
  return program
    .command("serve")
    .description("serve the base model and its adapters over an OpenAI-compatible HTTP API")
    .addOption(new Option("--model <dir>", "base model folder (Hugging Face layout or an inlaid/GPTQ quantized one)").conflicts("demo"))
    .option("--demo", "serve the bundled demo model with its adapters reverse, sort, caesar, mirror")
    .addOption(
      new Option("--adapter <NAME=DIR>", "LoRA adapter (PEFT folder) served as model NAME; repeatable").argParser(collectAdapter),
    )
    .option("--host <host>", "address to listen on", "127.0.0.1")
    .addOption(new Option("--port <port>", "port to listen on (0 = any free port)").argParser(parsePort).default(8000))
    .addOption(deviceOption())
    .addOption(new Option("--api-key <key>", "require 'Authorization: Bearer KEY' on every request").env("INLAID_API_KEY"))
    .addOption(maxBatchOption())
    .addOption(new Option("--policy <name>", "scheduling policy").choices(POLICIES).default("fcfs"))
    .addOption(new Option("--max-model-len <n>", "context window (default: the model's)").argParser(parsePositiveInt("--max-model-len")))
    .option("--served-model-name <name>", "the `model` name that selects the base model (default: the model folder's name)")
    .addOption(new Option("--max-loras <n>", "adapter slots resident at once; others wait in host memory (LRU)").argParser(parsePositiveInt("--max-loras")))
    .addOption(new Option("--max-lora-rank <n>", "largest adapter rank accepted (default 64)").argParser(parsePositiveInt("--max-lora-rank")))
    .addOption(schedulerStepsOption())
    .action(async (flags: ServeFlags) => {
      await serve(flags);
    });
}

async function serve(flags: ServeFlags): Promise<void> {
  if (!flags.demo && flags.model === undefined) throw new UsageError("serve needs --model DIR (or --demo for the bundled demo)");
  const modelDir = flags.demo ? DEMO_BASE : flags.model!;
  const adapters = { ...(flags.demo ? DEMO_ADAPTERS : {}), ...adaptersRecord(flags.adapter ?? []) };
  const progress = createProgress();
  const engine = await loadEngine(
    {
      modelDir,
      adapters,
      device: flags.device,
      policy: flags.policy,
      ...(flags.maxBatch !== undefined && { maxBatch: flags.maxBatch }),
      ...(flags.maxModelLen !== undefined && { maxModelLen: flags.maxModelLen }),
      ...(flags.servedModelName !== undefined && { modelId: flags.servedModelName }),
      ...(flags.maxLoras !== undefined && { maxLoras: flags.maxLoras }),
      ...(flags.maxLoraRank !== undefined && { maxLoraRank: flags.maxLoraRank }),
      ...(flags.numSchedulerSteps !== undefined && { schedulerSteps: flags.numSchedulerSteps }),
    },
    progress,
  );
  const { startServer } = await import("../server/app.js");
  let server: Awaited<ReturnType<typeof startServer>>;
  try {
    server = await startServer(engine, { host: flags.host, port: flags.port, ...(flags.apiKey && { apiKey: flags.apiKey }) });
  } catch (err) {
    await engine.close();
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "EADDRINUSE") throw new Error(`${flags.host}:${flags.port} is already in use; pick another --port`);
    throw err;
  }

  const names = Object.keys(adapters);
  const model = flags.demo ? "reverse" : names[0] ?? engine.modelId;
  const prompt = flags.demo ? DEMO_PROMPT : "Hello";
  const body = JSON.stringify({ model, prompt, max_tokens: 12, temperature: 0 });
  const auth = flags.apiKey ? ` -H "Authorization: Bearer $INLAID_API_KEY"` : "";
  process.stdout.write(
    [
      `inlaid: serving ${engine.modelId}${names.length ? ` with adapters ${names.join(", ")}` : ""} at ${server.url}`,
      "try:",
      `  curl ${server.url}/v1/completions -H 'Content-Type: application/json'${auth} -d '${body}'`,
      "",
    ].join("\n"),
  );

  await new Promise<void>((resolve) => {
    const shutdown = (signal: NodeJS.Signals): void => {
      process.off("SIGINT", shutdown);
      process.off("SIGTERM", shutdown);
      // A second signal (or a hung close) ends the process without waiting further.
      process.once("SIGINT", () => process.exit(130));
      process.once("SIGTERM", () => process.exit(143));
      setTimeout(() => {
        process.stderr.write("inlaid: shutdown timed out; exiting\n");
        process.exit(1);
      }, SHUTDOWN_TIMEOUT_MS).unref();
      process.stderr.write(`inlaid: ${signal}, shutting down\n`);
      void server
        .close()
        .finally(() => engine.close())
        .catch((err: unknown) => process.stderr.write(`inlaid: error while shutting down: ${(err as Error).message}\n`))
        .finally(resolve);
    };
    process.on("SIGINT", shutdown);
    process.on("SIGTERM", shutdown);
  });
}
