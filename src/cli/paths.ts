// Where the package lives, found from this file: src/cli/ and dist/cli/ are both two
// levels below the package root, so the same relative path works from source and build.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE_ROOT = fileURLToPath(new URL("../../", import.meta.url));

/** The bundled demo: a tiny Llama base and four task adapters. */
export const DEMO_DIR = join(PACKAGE_ROOT, "examples", "demo");
export const DEMO_BASE = join(DEMO_DIR, "base");
export const DEMO_TASKS = ["reverse", "sort", "caesar", "mirror"] as const;
export const DEMO_ADAPTERS: Readonly<Record<string, string>> = Object.fromEntries(
  DEMO_TASKS.map((t) => [t, join(DEMO_DIR, "adapters", t)]),
);
/** A prompt every demo adapter answers ("reverse" gives " zu bram kto"). */
export const DEMO_PROMPT = "kto bram zu =";

export function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")) as { version?: unknown };
    return typeof pkg.version === "string" ? pkg.version : "0.0.0";
  } catch {
    return "0.0.0";
  }
}
