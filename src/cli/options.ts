// Option parsers and option definitions shared by the commands. Parsers throw
// commander's InvalidArgumentError so a bad value is a usage error (exit code 2).

import { InvalidArgumentError, Option } from "commander";
import { DEVICES, type DeviceName } from "../backend/select.js";

/** A usage error found after parsing (missing or conflicting options): exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export interface AdapterSpec {
  readonly name: string;
  readonly dir: string;
}

/** `NAME=DIR` -> {name, dir}. */
export function parseAdapterSpec(value: string): AdapterSpec {
  const eq = value.indexOf("=");
  const name = eq > 0 ? value.slice(0, eq).trim() : "";
  const dir = eq > 0 ? value.slice(eq + 1).trim() : "";
  if (!name || !dir) throw new InvalidArgumentError(`--adapter expects NAME=DIR, got '${value}'`);
  if (/\s/.test(name)) throw new InvalidArgumentError(`--adapter name must not contain spaces, got '${name}'`);
  return { name, dir };
}

/** Repeatable --adapter: accumulates specs, refusing a name given twice. */
export function collectAdapter(value: string, previous: AdapterSpec[] | undefined): AdapterSpec[] {
  const spec = parseAdapterSpec(value);
  const list = previous ?? [];
  if (list.some((a) => a.name === spec.name)) throw new InvalidArgumentError(`--adapter name '${spec.name}' is given twice`);
  return [...list, spec];
}

export function adaptersRecord(specs: readonly AdapterSpec[]): Record<string, string> {
  return Object.fromEntries(specs.map((a) => [a.name, a.dir]));
}

function intParser(flag: string, min: number, max = Number.MAX_SAFE_INTEGER): (value: string) => number {
  return (value: string) => {
    const n = /^[+-]?\d+$/.test(value.trim()) ? Number(value) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) {
      const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in [${min}, ${max}]`;
      throw new InvalidArgumentError(`${flag} expects an integer ${range}, got '${value}'`);
    }
    return n;
  };
}

function floatParser(flag: string, ok: (x: number) => boolean, what: string): (value: string) => number {
  return (value: string) => {
    const n = value.trim() === "" ? NaN : Number(value);
    if (!Number.isFinite(n) || !ok(n)) throw new InvalidArgumentError(`${flag} expects ${what}, got '${value}'`);
    return n;
  };
}

export const parsePositiveInt = (flag: string) => intParser(flag, 1);
export const parsePort = intParser("--port", 0, 65535);
export const parseSeed = intParser("--seed", 0, 2 ** 32 - 1);
export const parseTopK = intParser("--top-k", 0);
export const parseTemperature = floatParser("--temperature", (x) => x >= 0, "a number >= 0");
export const parseTopP = floatParser("--top-p", (x) => x > 0 && x <= 1, "a number in (0, 1]");

export function deviceOption(): Option {
  return new Option("--device <device>", "where to run").choices(DEVICES).default("auto" satisfies DeviceName);
}

export function maxBatchOption(defaultNote = "default 256"): Option {
  return new Option("--max-batch <n>", `most sequences in one engine step (${defaultNote})`).argParser(parsePositiveInt("--max-batch"));
}

/** --num-scheduler-steps (vLLM's name): decode steps per scheduling round. */
export function schedulerStepsOption(): Option {
  return new Option(
    "--num-scheduler-steps <n>",
    "decode steps run per scheduling round when every running request has room (host work shared by n steps; tokens stream n at a time; default 1)",
  ).argParser(intParser("--num-scheduler-steps", 1, 64)).env("INLAID_SCHEDULER_STEPS");
}

/** One `inlaid quantize --task`: NAME=ADAPTER_DIR:CALIB.jsonl (ADAPTER_DIR may be empty: no adapter). */
export interface TaskSpec {
  readonly name: string;
  /** null when the spec was NAME=:CALIB.jsonl. */
  readonly adapterDir: string | null;
  readonly calibPath: string;
}

/** `NAME=ADAPTER_DIR:CALIB.jsonl` -> TaskSpec. The calibration path follows the last ':'. */
export function parseTaskSpec(value: string): TaskSpec {
  const eq = value.indexOf("=");
  const name = eq > 0 ? value.slice(0, eq).trim() : "";
  const rest = eq > 0 ? value.slice(eq + 1) : "";
  const colon = rest.lastIndexOf(":");
  const adapter = colon >= 0 ? rest.slice(0, colon).trim() : "";
  const calib = colon >= 0 ? rest.slice(colon + 1).trim() : "";
  if (!name || colon < 0 || !calib) throw new InvalidArgumentError(`--task expects NAME=ADAPTER_DIR:CALIB.jsonl, got '${value}'`);
  if (/[\s/]/.test(name)) throw new InvalidArgumentError(`--task name must not contain spaces or '/', got '${name}'`);
  return { name, adapterDir: adapter === "" ? null : adapter, calibPath: calib };
}

/** Repeatable --task: accumulates specs, refusing a name given twice. */
export function collectTask(value: string, previous: TaskSpec[] | undefined): TaskSpec[] {
  const spec = parseTaskSpec(value);
  const list = previous ?? [];
  if (list.some((t) => t.name === spec.name)) throw new InvalidArgumentError(`--task name '${spec.name}' is given twice`);
  return [...list, spec];
}
