// The on-disk cache of compiled kernels (CUBIN): where it lives, what a key covers,
// and how an entry is written. Pure Node: no CUDA library is touched here.

import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { basename, dirname, join } from "node:path";

/** Folder for cached CUBINs: $INLAID_CACHE_DIR/kernels, else ~/.cache/inlaid/kernels. */
export function kernelCacheDir(env: NodeJS.ProcessEnv = process.env, home: string = homedir()): string {
  const root = env.INLAID_CACHE_DIR || join(env.XDG_CACHE_HOME || join(home, ".cache"), "inlaid");
  return join(root, "kernels");
}

export interface KernelCacheInput {
  /** The .cu file's name (only for readability of the cache folder). */
  readonly file: string;
  readonly source: string;
  /** In-memory headers handed to NVRTC, [includeName, contents]. */
  readonly headers: readonly (readonly [string, string])[];
  /** Every compiler option, the --gpu-arch one included. */
  readonly options: readonly string[];
  /** NVRTC's version, e.g. "13.0": a new compiler may generate different code. */
  readonly nvrtcVersion: string;
}

/**
 * A content hash over everything that decides the CUBIN: the source, the headers it
 * may include, the options (arch among them) and the compiler version. Lengths are
 * hashed before contents so no two different inputs concatenate to the same bytes.
 */
export function kernelCacheKey(k: KernelCacheInput): string {
  const h = createHash("sha256");
  const put = (s: string): void => {
    const b = Buffer.from(s, "utf8");
    h.update(`${b.length}:`);
    h.update(b);
  };
  put("inlaid-kernel-cache-v1");
  put(k.nvrtcVersion);
  put(k.source);
  put(String(k.headers.length));
  for (const [name, text] of [...k.headers].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))) {
    put(name);
    put(text);
  }
  put(String(k.options.length));
  for (const o of k.options) put(o);
  return h.digest("hex");
}

/** File name of a cache entry: readable stem plus the key. */
export function kernelCachePath(dir: string, k: KernelCacheInput): string {
  const stem = basename(k.file).replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_-]/g, "_");
  return join(dir, `${stem}-${kernelCacheKey(k).slice(0, 40)}.cubin`);
}

/** The cached bytes, or null when absent or unreadable. */
export function readCacheEntry(path: string): Uint8Array | null {
  try {
    const b = readFileSync(path);
    return b.length > 0 ? new Uint8Array(b.buffer, b.byteOffset, b.length) : null;
  } catch {
    return null;
  }
}

/**
 * Writes `data` so that readers see either the old file or the whole new one, never a
 * torn write: a uniquely named temp file in the same folder, then rename (atomic on
 * POSIX within one file system). Concurrent writers of one key write identical bytes.
 */
export function writeFileAtomic(path: string, data: Uint8Array): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
  try {
    writeFileSync(tmp, data);
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
}
