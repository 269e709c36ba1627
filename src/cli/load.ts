// Loads the engine for a command: checks the folders first (so a typo gets a one-line
// message naming the flag), then reports loading progress on stderr.

import { statSync } from "node:fs";
import type { Engine } from "../engine/engine.js";
import type { DeviceName } from "../backend/select.js";
import type { ProgressReporter } from "./progress.js";

export interface LoadOptions {
  readonly modelDir: string;
  readonly adapters?: Readonly<Record<string, string>>;
  readonly device?: DeviceName;
  readonly maxBatch?: number;
  readonly maxWaiting?: number;
  readonly maxModelLen?: number;
  readonly policy?: string;
  readonly modelId?: string;
  readonly maxLoras?: number;
  readonly maxLoraRank?: number;
  readonly schedulerSteps?: number;
}

/** Raised for problems in what the user passed (missing folders...): printed as one line, exit 1. */
export class CliError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CliError";
  }
}

function requireDir(path: string, what: string): void {
  let isDir: boolean;
  try {
    isDir = statSync(path).isDirectory();
  } catch {
    throw new CliError(`${what}: no such folder '${path}'`);
  }
  if (!isDir) throw new CliError(`${what}: '${path}' is not a folder`);
}

export async function loadEngine(opts: LoadOptions, progress: ProgressReporter): Promise<Engine> {
  requireDir(opts.modelDir, "--model");
  for (const [name, dir] of Object.entries(opts.adapters ?? {})) requireDir(dir, `--adapter ${name}`);
  const t0 = performance.now();
  // Loaded here, not at the top: `inlaid --help` and usage errors stay instant.
  const { createEngine } = await import("../engine/engine.js");
  const engine = await createEngine({
    modelDir: opts.modelDir,
    adapters: opts.adapters ?? {},
    ...(opts.device !== undefined && { device: opts.device }),
    ...(opts.maxBatch !== undefined && { maxBatch: opts.maxBatch }),
    ...(opts.maxWaiting !== undefined && { maxWaiting: opts.maxWaiting }),
    ...(opts.maxModelLen !== undefined && { maxModelLen: opts.maxModelLen }),
    ...(opts.policy !== undefined && { policy: opts.policy }),
    ...(opts.modelId !== undefined && { modelId: opts.modelId }),
    ...(opts.maxLoras !== undefined && { maxLoras: opts.maxLoras }),
    ...(opts.maxLoraRank !== undefined && { maxLoraRank: opts.maxLoraRank }),
    ...(opts.schedulerSteps !== undefined && { schedulerSteps: opts.schedulerSteps }),
    onProgress: (msg) => progress.note(msg),
  });
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  progress.note(`loaded ${engine.modelId} on ${engine.backendName} in ${secs} s`);
  return engine;
}
