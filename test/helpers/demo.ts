// Paths of the bundled demo and a loader for its reference outputs.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const DEMO = join(ROOT, "examples", "demo");
export const DEMO_BASE = join(DEMO, "base");
export const DEMO_TASKS = ["reverse", "sort", "caesar", "mirror"] as const;
export const DEMO_ADAPTERS: Record<string, string> = Object.fromEntries(
  DEMO_TASKS.map((t) => [t, join(DEMO, "adapters", t)]),
);

export interface ReferenceLine {
  adapter: string | null;
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
  greedy_text: string;
  last_logits_top8: { ids: number[]; values: number[] };
  logits_sum_abs_per_pos: number[];
}

export function readReference(): ReferenceLine[] {
  return readFileSync(join(DEMO, "reference.jsonl"), "utf8")
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as ReferenceLine);
}

export function readJsonl<T>(path: string): T[] {
  return readFileSync(path, "utf8")
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as T);
}
