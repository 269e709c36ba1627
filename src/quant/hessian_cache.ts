// Per-task Hessians cached on disk in a work folder, so a quantization that stops
// half-way (crash, Ctrl-C) resumes without recomputing the tasks it had finished, and
// so several methods or bit widths over the same tasks capture each task once.
//
// A cache file is valid only for the exact inputs that produced it: its name and its
// metadata carry a SHA-256 over the calibration recipe, the base model (config.json's
// bytes, and each weight file's name, size and modification time - hashing many GB of
// weights would cost more than it saves), the adapter's files (their bytes), the
// calibration file's bytes, the row limit and the step size (which fixes the summation
// order). Anything else in the folder is ignored.

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { SafetensorsFile, writeSafetensors } from "../model/safetensors.js";
import { CALIBRATION_RECIPE } from "./calibration.js";
import type { CalibrationSet } from "./capture.js";
import type { HessianSite, Hessians } from "./hessian.js";

/** Identifies a base model folder's contents (see the header for what is hashed). */
export function baseFingerprint(baseDir: string): string {
  const dir = resolve(baseDir);
  const h = createHash("sha256");
  h.update(readFileSync(join(dir, "config.json")));
  for (const f of readdirSync(dir).sort()) {
    if (!f.endsWith(".safetensors") && !f.endsWith(".safetensors.index.json")) continue;
    const st = statSync(join(dir, f));
    h.update(`\0${f}\0${st.size}\0${st.mtimeMs}`);
  }
  return h.digest("hex");
}

function fileHash(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** Identifies an adapter folder by the bytes of its config and weights. */
export function adapterFingerprint(adapterDir: string): string {
  const dir = resolve(adapterDir);
  const h = createHash("sha256");
  for (const f of readdirSync(dir).sort()) {
    if (f !== "adapter_config.json" && !f.endsWith(".safetensors")) continue;
    h.update(`\0${f}\0${fileHash(join(dir, f))}`);
  }
  return h.digest("hex");
}

/** The cache key of one task's capture. `device`: where it ran when not the CPU backend's
 * float64 capture (a GPU's bf16 activations give other Hessians); absent keeps CPU keys as they were. */
export function captureKey(baseFp: string, set: CalibrationSet, stepTokens: number, device?: string): string {
  return createHash("sha256")
    .update(JSON.stringify({
      recipe: CALIBRATION_RECIPE,
      base: baseFp,
      adapter: set.adapterDir === null ? null : adapterFingerprint(set.adapterDir),
      calib: fileHash(set.calibPath),
      limit: set.limit ?? null,
      stepTokens,
      ...(device !== undefined && { device }),
    }))
    .digest("hex");
}

export class HessianCache {
  constructor(readonly dir: string) {}

  #path(key: string): string {
    return join(this.dir, `hessians-${key.slice(0, 32)}.safetensors`);
  }

  /** The cached Hessians for `key`, or null when absent or not matching `sites`. */
  load(key: string, sites: readonly HessianSite[]): Hessians | null {
    const path = this.#path(key);
    if (!existsSync(path)) return null;
    let f: SafetensorsFile;
    try {
      f = SafetensorsFile.open(path);
    } catch {
      return null; // unreadable (cut short by a crash before the rename? then it would not exist) - recompute
    }
    try {
      const tokens = Number(f.metadata["tokens"]);
      if (f.metadata["key"] !== key || !(tokens > 0)) return null;
      const h = new Map<string, Float32Array>();
      for (const s of sites) {
        if (!f.has(s.name)) return null;
        const t = f.get(s.name);
        if (t.dtype !== "f32" || t.shape[0] !== s.inDim || t.shape[1] !== s.inDim) return null;
        h.set(s.name, t.data as Float32Array);
      }
      return { tokens, h };
    } finally {
      f.close();
    }
  }

  /** Stores Hessians under `key` (atomically: temp file + rename). */
  save(key: string, hs: Hessians, label: string): void {
    mkdirSync(this.dir, { recursive: true });
    const tensors: Record<string, { shape: number[]; dtype: "f32"; data: Float32Array }> = {};
    for (const [name, m] of hs.h) {
      const K = Math.round(Math.sqrt(m.length));
      tensors[name] = { shape: [K, K], dtype: "f32", data: m };
    }
    writeSafetensors(this.#path(key), tensors, { key, tokens: String(hs.tokens), task: label });
  }
}
