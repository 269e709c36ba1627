// Runs the `inlaid` CLI from source (through tsx, the same code the build emits to
// dist/cli/main.js) as a child process, for the end-to-end command tests.

import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { ROOT } from "./demo.js";

export const CLI_MAIN = join(ROOT, "src", "cli", "main.ts");

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Starts `inlaid ...args` in the repository root; the caller's INLAID_DEBUG and
 * INLAID_API_KEY are dropped so they cannot change what a test sees. */
export function startCli(args: readonly string[]): ChildProcess {
  const env = { ...process.env };
  delete env.INLAID_DEBUG;
  delete env.INLAID_API_KEY;
  return spawn(process.execPath, ["--import", "tsx", CLI_MAIN, ...args], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
}

/** Collects a started child's output until it exits; `onStderr` sees all stderr so far after each chunk. */
export function finishCli(child: ChildProcess, onStderr?: (all: string) => void): Promise<CliRun> {
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => {
    stderr += d.toString();
    onStderr?.(stderr);
  });
  return new Promise((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

/** `inlaid ...args` to completion. */
export const runCli = (...args: string[]): Promise<CliRun> => finishCli(startCli(args));
