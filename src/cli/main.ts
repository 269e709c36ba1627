#!/usr/bin/env node
// The `inlaid` command. Exit codes: 0 ok, 1 failure (printed as `inlaid: <message>`,
// with the stack only when INLAID_DEBUG=1), 2 usage error (unknown command or flag,
// bad flag value), 130 interrupted.

import { Command, CommanderError } from "commander";
import { addBenchCommand } from "./bench.js";
import { addEvalCommand } from "./eval.js";
import { addGenerateCommand } from "./generate.js";
import { UsageError } from "./options.js";
import { packageVersion } from "./paths.js";
import { addQuantizeCommand } from "./quantize.js";
import { addServeCommand } from "./serve.js";

const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;

function buildProgram(): Command {
  const program = new Command("inlaid")
    .description("serve one base LLM to many LoRA tasks at once")
    .version(packageVersion(), "-V, --version")
    // Settings set before .command() are inherited by every subcommand.
    .exitOverride()
    .showHelpAfterError("(add --help for usage)")
    .configureOutput({ outputError: (str, write) => write(`inlaid: ${tidyError(str)}`) });
  addServeCommand(program);
  addGenerateCommand(program);
  addEvalCommand(program);
  addBenchCommand(program);
  addQuantizeCommand(program);
  return program;
}

/**
 * Commander says "error: option '--port <port>' argument 'x' is invalid. --port expects ...";
 * our parsers' messages already name the flag, so keep only those.
 */
function tidyError(str: string): string {
  return str.replace(/^error: /, "").replace(/^option '[^']*' argument '.*?' is invalid\. (?=--)/s, "");
}

const debug = (): boolean => process.env.INLAID_DEBUG === "1";

function report(err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has already printed the message or the help; it says 0 for help and
    // --version, and 1 for every parse error, which we report as a usage error.
    return err.exitCode === 0 ? 0 : EXIT_USAGE;
  }
  const msg = err instanceof Error ? err.message : String(err);
  if (debug() && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
  else process.stderr.write(`inlaid: ${msg}\n`);
  if (err instanceof UsageError) {
    process.stderr.write("(add --help for usage)\n");
    return EXIT_USAGE;
  }
  return EXIT_FAILURE;
}

/** Exits once stdout and stderr have flushed (a pipe may still hold the last lines). */
function exit(code: number): void {
  process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
}

async function main(argv: string[]): Promise<void> {
  process.on("unhandledRejection", (err) => exit(report(err)));
  process.on("uncaughtException", (err) => exit(report(err)));
  try {
    await buildProgram().parseAsync(argv);
    exit(typeof process.exitCode === "number" ? process.exitCode : 0);
  } catch (err) {
    exit(report(err));
  }
}

await main(process.argv);
