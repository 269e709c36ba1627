// Finding and opening the CUDA shared libraries with koffi. Nothing here runs at
// import time: each library is opened on first use and the result (or the reason it
// could not be opened) is remembered.

import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import koffi from "koffi";
import { CudaLoadError } from "./errors.js";

export type KoffiLib = ReturnType<typeof koffi.load>;
export type KoffiFn = ReturnType<KoffiLib["func"]>;

/** Toolkit library folders to search, most specific first (env vars, then the usual installs). */
export function toolkitLibDirs(): string[] {
  const dirs: string[] = [];
  for (const v of ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]) {
    const root = process.env[v];
    if (root) dirs.push(join(root, "lib64"), join(root, "lib"), join(root, "targets", "x86_64-linux", "lib"));
  }
  dirs.push("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda/lib");
  try {
    // Versioned installs (/usr/local/cuda-13.0) when /usr/local/cuda is not a link.
    for (const e of readdirSync("/usr/local").filter((n) => /^cuda-\d+/.test(n)).sort().reverse()) {
      dirs.push(join("/usr/local", e, "lib64"), join("/usr/local", e, "targets", "x86_64-linux", "lib"));
    }
  } catch {
    // no /usr/local: nothing to add
  }
  dirs.push("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib");
  dirs.push(...pipNvidiaLibDirs());
  return [...new Set(dirs)];
}

/**
 * Last resort: the CUDA libraries pip ships (nvidia-cuda-nvrtc, nvidia-cublas) inside a
 * Python environment: $VIRTUAL_ENV, /opt/<name>/.venv, and the system site folders.
 */
function pipNvidiaLibDirs(): string[] {
  const ls = (d: string): string[] => {
    try {
      return readdirSync(d);
    } catch {
      return [];
    }
  };
  const envs = [process.env.VIRTUAL_ENV, ...ls("/opt").map((o) => join("/opt", o, ".venv")), "/usr/local", "/usr"]
    .filter((e): e is string => !!e);
  const out: string[] = [];
  for (const env of envs) {
    for (const py of ls(join(env, "lib")).filter((n) => n.startsWith("python3"))) {
      for (const site of ["site-packages", "dist-packages"]) {
        const nv = join(env, "lib", py, site, "nvidia");
        for (const pkg of ls(nv)) out.push(join(nv, pkg, "lib"));
      }
    }
  }
  return out;
}

/**
 * Opens the first library that loads: each soname through the dynamic loader's own
 * search (LD_LIBRARY_PATH, ldconfig), then each soname in each folder of `dirs`.
 * `override` (a full path from an env var) is tried first and alone when it is set.
 */
export function openLibrary(what: string, sonames: readonly string[], dirs: readonly string[], override?: string): { lib: KoffiLib; path: string } {
  const tried: string[] = [];
  const attempt = (p: string): KoffiLib | null => {
    tried.push(p);
    try {
      return koffi.load(p);
    } catch {
      return null;
    }
  };
  if (override) {
    const lib = attempt(override);
    if (lib) return { lib, path: override };
    throw new CudaLoadError(`${what}: could not open ${override}`, tried);
  }
  for (const s of sonames) {
    const lib = attempt(s);
    if (lib) return { lib, path: s };
  }
  for (const d of dirs) {
    for (const s of sonames) {
      const p = join(d, s);
      if (!existsSync(p)) continue;
      const lib = attempt(p);
      if (lib) return { lib, path: p };
    }
  }
  throw new CudaLoadError(`${what} not found`, tried);
}

/**
 * Binds the first prototype whose symbol the library exports (versioned symbols
 * change across CUDA releases: cuEventElapsedTime_v2 replaces cuEventElapsedTime).
 */
export function bind(lib: KoffiLib, what: string, ...prototypes: string[]): KoffiFn {
  const errors: string[] = [];
  for (const p of prototypes) {
    try {
      return lib.func(p);
    } catch (e) {
      errors.push(e instanceof Error ? e.message : String(e));
    }
  }
  throw new CudaLoadError(`${what}: none of the symbols exist (${errors.join("; ")})`);
}
