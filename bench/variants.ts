// `inlaid bench` under several environment variants in one command, one line of JSON per
// run: the comparisons of the README (graph launch, LoRA paths, 4-bit against bf16) are
// made this way, every variant on the same machine in the same command. Each run is a
// separate process (the switches are read at start-up) with INLAID_PROFILE_STEPS=1, so its
// host phases are reported too. From the repository root (GPU machine):
//
//   node --import tsx bench/variants.ts [--rounds 1] [--device cuda] VARIANT... [-- BENCH ARGS...]
//
//   VARIANT   NAME[:ENV=VAL[,ENV=VAL...]][@CONFIG[/ADAPTERS]]
//             e.g.  a8@llama-2-7b  a0@llama-2-7b/0  host:INLAID_GRAPH_LAUNCH=host@llama-2-7b
//                   q8@llama-2-7b-gptq4  q8s:INLAID_LORA_SLOTS_SHRINK=1@llama-2-7b-gptq4
//             CONFIG is a folder of bench/configs (default llama-2-7b), ADAPTERS the
//             --adapters count (default the bench's, 8).
//   --rounds N  run the whole list N times, interleaved (a1 b1 a2 b2 ...), so that a drift of
//             the machine during the command shows in every variant alike.
//   BENCH ARGS  passed to every run (e.g. --batch 16 --gen 64).
//
// Prints, per run: {"variant","round","config","adapters","env","decode_step_ms",
// "output_tokens_per_s","host_us_per_decode_step","device_idle_us_per_decode_step",
// "roofline_ratio","graph_launch","host_p50_us","host_phase_p50_us"} (the p50 of each host phase
// of a decode step: where a slow run's host time went); a failed run prints {"variant","error"}.

import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

export interface Variant {
  readonly name: string;
  readonly env: Readonly<Record<string, string>>;
  readonly config: string;
  readonly adapters: number | null;
}

/** Parses NAME[:ENV=VAL[,ENV=VAL...]][@CONFIG[/ADAPTERS]]. */
export function parseVariant(spec: string): Variant {
  const at = spec.indexOf("@");
  const head = at >= 0 ? spec.slice(0, at) : spec;
  const where = at >= 0 ? spec.slice(at + 1) : "";
  const colon = head.indexOf(":");
  const name = colon >= 0 ? head.slice(0, colon) : head;
  if (!/^[\w.-]+$/.test(name)) throw new Error(`variant "${spec}": the name must be letters, digits, '.', '_' or '-'`);
  const env: Record<string, string> = {};
  if (colon >= 0) {
    for (const kv of head.slice(colon + 1).split(",").filter((x) => x !== "")) {
      const eq = kv.indexOf("=");
      if (eq <= 0 || !/^[A-Z_][A-Z0-9_]*$/.test(kv.slice(0, eq))) throw new Error(`variant "${spec}": "${kv}" is not ENV=VALUE`);
      env[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
  }
  const [config = "llama-2-7b", adapters] = where === "" ? [] : where.split("/");
  if (!/^[\w-][\w.-]*$/.test(config)) throw new Error(`variant "${spec}": "${config}" is not a bench/configs folder name`);
  let n: number | null = null;
  if (adapters !== undefined) {
    n = Number(adapters);
    if (!Number.isInteger(n) || n < 0) throw new Error(`variant "${spec}": the adapter count "${adapters}" is not a non-negative integer`);
  }
  return { name, env, config, adapters: n };
}

/** The `inlaid bench` arguments of one variant's run. */
export function benchArgs(v: Variant, extra: readonly string[], device = "cuda"): string[] {
  return ["bench", "--config", v.config, "--device", device, "--json", ...(v.adapters === null ? [] : ["--adapters", String(v.adapters)]), ...extra];
}

function main(argv: string[]): void {
  const dash = argv.indexOf("--");
  const own = dash >= 0 ? argv.slice(0, dash) : argv;
  const extra = dash >= 0 ? argv.slice(dash + 1) : [];
  let rounds = 1, device = "cuda";
  const specs: string[] = [];
  for (let i = 0; i < own.length; i++) {
    if (own[i] === "--rounds") rounds = Number(own[++i]);
    else if (own[i] === "--device") device = own[++i] ?? "";
    else if (own[i] === "--help" || own[i] === "-h") {
      process.stdout.write("usage: node --import tsx bench/variants.ts [--rounds N] [--device cuda|cpu|auto] NAME[:ENV=VAL,...][@CONFIG[/ADAPTERS]]... [-- BENCH ARGS]\n");
      return;
    } else specs.push(own[i]!);
  }
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error("--rounds must be a positive integer");
  if (specs.length === 0) throw new Error("give at least one variant, e.g. a8@llama-2-7b (see the header of bench/variants.ts)");
  const variants = specs.map(parseVariant);
  const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "src", "cli", "main.ts");
  for (let r = 1; r <= rounds; r++) {
    for (const v of variants) {
      const res = spawnSync(process.execPath, ["--import", "tsx", cli, ...benchArgs(v, extra, device)], {
        env: { ...process.env, INLAID_PROFILE_STEPS: "1", ...v.env },
        encoding: "utf8",
        maxBuffer: 64 << 20,
      });
      const line = res.stdout.trim().split("\n").pop() ?? "";
      if (res.status !== 0 || !line.startsWith("{")) {
        const why = (res.stderr || res.error?.message || "").trim().split("\n").slice(-3).join(" | ");
        console.log(JSON.stringify({ variant: v.name, round: r, error: `exit ${res.status}: ${why}` }));
        continue;
      }
      const b = JSON.parse(line) as {
        decode_step_ms: { mean: number } | null; output_tokens_per_s: number; host_us_per_decode_step: number;
        device_idle_us_per_decode_step: number; roofline: { ratio: number | null }; graph_launch: string | null;
        host_phases_us?: Record<string, { p50: number }>;
      };
      console.log(JSON.stringify({
        variant: v.name, round: r, config: v.config, adapters: v.adapters, env: v.env,
        decode_step_ms: b.decode_step_ms?.mean ?? null, output_tokens_per_s: b.output_tokens_per_s,
        host_us_per_decode_step: b.host_us_per_decode_step, device_idle_us_per_decode_step: b.device_idle_us_per_decode_step,
        roofline_ratio: b.roofline.ratio, graph_launch: b.graph_launch, host_p50_us: b.host_phases_us?.host?.p50 ?? null,
        host_phase_p50_us: b.host_phases_us ? Object.fromEntries(Object.entries(b.host_phases_us).map(([k, v]) => [k, v.p50])) : null,
      }));
    }
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    main(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`bench/variants: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(2);
  }
}
