// Sums an ncu CSV of kernel durations (scripts/gpu-checks.sh profile) per kernel name and
// launch shape: where a step's device time goes, kind by kind. Prints JSON, largest first.
//
//   node --import tsx bench/kernel_profile.ts FILE.log [--steps N]
//
// --steps N divides each total by N (e.g. the number of decode steps, for kernels that only
// decode steps launch). ncu runs kernels one at a time, so these are isolated kernel times:
// no overlap between a kernel and the next (PDL), no gaps between them.

import { readFileSync } from "node:fs";

/** One CSV line's fields (ncu quotes every field; no embedded quotes in its output). */
export function csvFields(line: string): string[] {
  const out: string[] = [];
  const re = /"((?:[^"]|"")*)"(?:,|$)/g;
  for (let m = re.exec(line); m; m = re.exec(line)) out.push(m[1]!.replace(/""/g, '"'));
  return out;
}

export interface KernelTotal {
  readonly kernel: string;
  readonly grid: string;
  readonly block: string;
  launches: number;
  total_us: number;
}

/** Per (kernel, grid, block) launch counts and summed gpu__time_duration (µs). */
export function sumProfile(text: string): KernelTotal[] {
  let header: string[] | null = null;
  const byKey = new Map<string, KernelTotal>();
  for (const line of text.split("\n")) {
    if (!line.startsWith('"')) continue;
    const f = csvFields(line);
    if (f[0] === "ID") {
      header = f;
      continue;
    }
    if (!header) continue;
    const col = (name: string): string => f[header!.indexOf(name)] ?? "";
    if (col("Metric Name") !== "gpu__time_duration.sum") continue;
    const unit = col("Metric Unit"), raw = Number(col("Metric Value").replace(/,/g, ""));
    const us = unit === "nsecond" || unit === "ns" ? raw / 1e3 : unit === "usecond" || unit === "us" ? raw : unit === "msecond" || unit === "ms" ? raw * 1e3 : NaN;
    if (!Number.isFinite(us)) throw new Error(`kernel_profile: unknown duration unit "${unit}"`);
    const kernel = col("Kernel Name"), grid = col("Grid Size"), block = col("Block Size");
    const key = `${kernel}|${grid}|${block}`;
    const e = byKey.get(key) ?? { kernel, grid, block, launches: 0, total_us: 0 };
    e.launches += 1;
    e.total_us += us;
    byKey.set(key, e);
  }
  if (!header) throw new Error("kernel_profile: no ncu CSV header (\"ID\",...) in the input");
  return [...byKey.values()].sort((a, b) => b.total_us - a.total_us);
}

function main(argv: string[]): void {
  const file = argv.find((a) => !a.startsWith("--"));
  const si = argv.indexOf("--steps");
  const steps = si >= 0 ? Number(argv[si + 1]) : 1;
  if (!file || !(steps > 0)) throw new Error("usage: node --import tsx bench/kernel_profile.ts FILE.log [--steps N]");
  const rows = sumProfile(readFileSync(file, "utf8"));
  const all = rows.reduce((a, r) => a + r.total_us, 0);
  for (const r of rows) {
    console.log(JSON.stringify({
      kernel: r.kernel.slice(0, 80), grid: r.grid, block: r.block, launches: r.launches,
      us_per_step: +(r.total_us / steps).toFixed(1), avg_us: +(r.total_us / r.launches).toFixed(2), share: +(r.total_us / all).toFixed(4),
    }));
  }
  console.log(JSON.stringify({ total_us_per_step: +(all / steps).toFixed(1), kinds: rows.length }));
}

if (process.argv[1]?.endsWith("kernel_profile.ts")) {
  try {
    main(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(2);
  }
}
