// The `mlgptq/` folder inside a quantized checkpoint: everything incremental
// quantization (`inlaid quantize --from`) needs to add tasks without redoing the old
// ones (DESIGN §1 Files, §3 Incremental):
//
//   mlgptq/manifest.json       method, spec, aggregate, the unquantized base (path and
//                              fingerprint), calibration settings, the tasks in order
//                              (name, adapter, calibration file, tokens, capture key),
//                              and which linears share each Hessian site
//   mlgptq/hessians.safetensors the aggregate's state per site, f32: tensor
//                              `${site}.${part}` (e.g. model.layers.0.self_attn.q_proj.max),
//                              [K, K] or [K]; absent for methods with nothing to add to
//
// The state is the running aggregate (aggregate.ts), not a finished Ĥ: for `max` it is
// Ĥ itself; for `mean` the sum over tasks; for GPTQ-mixed the token-weighted sum.

import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { SafetensorsFile, writeSafetensors } from "../model/safetensors.js";
import type { HostTensor } from "../backend/backend.js";
import type { AggregateKind, AggState } from "./aggregate.js";
import { writeFileDurable } from "./durable.js";
import type { HessianSite } from "./hessian.js";
import type { QuantSpec } from "./types.js";

export const MLGPTQ_DIR = "mlgptq";
export const MANIFEST_FORMAT = "inlaid-mlgptq/1";

export interface ManifestTask {
  readonly name: string;
  /** Absolute adapter folder (null when none was given). */
  readonly adapter: string | null;
  /** Absolute calibration jsonl. */
  readonly calib: string;
  /** Calibration tokens its Hessians were computed over. */
  readonly tokens: number;
  /** Capture key (hessian_cache.ts) of the Hessians folded in for it. */
  readonly key: string;
}

export interface Manifest {
  readonly format: typeof MANIFEST_FORMAT;
  readonly method: string;
  /** How per-task Hessians were combined (null for rtn and per-task gptq). */
  readonly aggregate: AggregateKind | null;
  readonly spec: { readonly bits: number; readonly group_size: number; readonly sym: boolean; readonly desc_act: boolean };
  readonly static_groups: boolean;
  readonly damp_percent: number;
  /** The unquantized base every Hessian came from. */
  readonly base: { readonly path: string; readonly fingerprint: string };
  readonly calibration: {
    readonly recipe: string; readonly limit: number | null; readonly step_tokens: number; readonly adapters_active: boolean;
    /** Where Hessians were captured when not the CPU's one-pass capture (e.g. "stream-cuda": layer-streamed on
     * the GPU, bf16 activations); absent in checkpoints written before it was recorded. */
    readonly device?: string;
  };
  readonly tasks: readonly ManifestTask[];
  readonly sites: readonly { readonly name: string; readonly in_dim: number; readonly linears: readonly string[] }[];
}

export function specOfManifest(m: Manifest): QuantSpec {
  const { bits, group_size, sym, desc_act } = m.spec;
  if (![2, 3, 4, 8].includes(bits)) throw new Error(`mlgptq/manifest.json: bits ${bits} is not 2, 3, 4 or 8`);
  return { bits: bits as QuantSpec["bits"], groupSize: group_size, sym, descAct: desc_act };
}

export function manifestSites(sites: readonly HessianSite[]): Manifest["sites"] {
  return sites.map((s) => ({ name: s.name, in_dim: s.inDim, linears: [...s.linears] }));
}

/** Writes `mlgptq/` under `root` (a checkpoint's temp folder). */
export function writeMlgptqDir(root: string, manifest: Manifest, state: ReadonlyMap<string, AggState> | null): void {
  const dir = join(root, MLGPTQ_DIR);
  mkdirSync(dir, { recursive: true });
  writeFileDurable(join(dir, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  if (!state) return;
  const tensors: Record<string, HostTensor> = {};
  for (const [site, parts] of state) {
    const K = manifest.sites.find((s) => s.name === site)?.in_dim;
    if (K === undefined) throw new Error(`internal: state for unknown site ${site}`);
    for (const [part, data] of Object.entries(parts)) {
      tensors[`${site}.${part}`] = { shape: data.length === K ? [K] : [K, K], dtype: "f32", data };
    }
  }
  writeSafetensors(join(dir, "hessians.safetensors"), tensors, { format: MANIFEST_FORMAT });
}

/** Reads `QUANT_DIR/mlgptq/manifest.json`, with errors that say what to do. */
export function readManifest(quantDir: string): Manifest {
  const path = join(quantDir, MLGPTQ_DIR, "manifest.json");
  if (!existsSync(path)) {
    throw new Error(`${quantDir} has no ${MLGPTQ_DIR}/manifest.json: it was not written by \`inlaid quantize\`, so tasks cannot be added to it; quantize from the unquantized base with every task instead`);
  }
  let m: Manifest;
  try {
    m = JSON.parse(readFileSync(path, "utf8")) as Manifest;
  } catch (e) {
    throw new Error(`${path} is not valid JSON (${(e as Error).message})`);
  }
  if (m.format !== MANIFEST_FORMAT) throw new Error(`${path} has format ${JSON.stringify(m.format)}; this version reads ${MANIFEST_FORMAT}`);
  return m;
}

/** The cached aggregate state per site, with the parts the manifest's aggregate needs. */
export function readState(quantDir: string, manifest: Manifest, parts: readonly string[]): Map<string, AggState> {
  const path = join(quantDir, MLGPTQ_DIR, "hessians.safetensors");
  if (!existsSync(path)) throw new Error(`${path} is missing; the checkpoint's Hessian cache was deleted, so tasks cannot be added incrementally`);
  const f = SafetensorsFile.open(path);
  try {
    const out = new Map<string, AggState>();
    for (const s of manifest.sites) {
      const st: AggState = {};
      for (const p of parts) {
        const name = `${s.name}.${p}`;
        if (!f.has(name)) throw new Error(`${path} has no tensor ${name}; the cache is incomplete`);
        const t = f.get(name);
        const want = p === "diag_max" ? s.in_dim : s.in_dim * s.in_dim;
        if (t.dtype !== "f32" || t.data.length !== want) throw new Error(`${path}: ${name} is not ${want} f32 values`);
        st[p] = t.data as Float32Array;
      }
      out.set(s.name, st);
    }
    return out;
  } finally {
    f.close();
  }
}
