// Durable, atomic folder writes: build a folder beside its destination, fsync all of it,
// then swap it into place with renames, so a reader (or a crash) sees the old folder or
// the new one, never a half-written one.

import { randomBytes } from "node:crypto";
import { closeSync, existsSync, fsyncSync, lstatSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";

function fsyncPath(path: string): void {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return;
  }
  try {
    fsyncSync(fd);
  } catch {
    // Some filesystems refuse fsync on a directory; the data files were synced.
  } finally {
    closeSync(fd);
  }
}

/** Writes `data` to `path` and fsyncs it (call inside a temp folder; the folder rename is the atomic step). */
export function writeFileDurable(path: string, data: string | Uint8Array): void {
  const fd = openSync(path, "w");
  try {
    const buf = typeof data === "string" ? Buffer.from(data, "utf8") : data;
    let done = 0;
    while (done < buf.byteLength) done += writeSync(fd, buf, done, buf.byteLength - done);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** fsyncs every file and folder under `root`, then `root` itself. */
export function fsyncTree(root: string): void {
  for (const name of readdirSync(root)) {
    const p = join(root, name);
    const st = lstatSync(p);
    if (st.isDirectory()) fsyncTree(p);
    else if (st.isFile()) fsyncPath(p);
  }
  fsyncPath(root);
}

/** A fresh, empty folder next to `dest` (same filesystem, so rename is atomic). */
export function makeTempDirBeside(dest: string): string {
  mkdirSync(dirname(dest), { recursive: true });
  const tmp = join(dirname(dest), `.${basename(dest)}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(tmp);
  return tmp;
}

/**
 * Moves the finished folder `tmp` to `dest`, replacing an existing `dest`: the old
 * folder is renamed aside first and put back if the second rename fails, then removed.
 */
export function replaceDir(tmp: string, dest: string): void {
  fsyncTree(tmp);
  if (!existsSync(dest)) {
    renameSync(tmp, dest);
  } else {
    const old = join(dirname(dest), `.${basename(dest)}.old-${process.pid}-${randomBytes(4).toString("hex")}`);
    renameSync(dest, old);
    try {
      renameSync(tmp, dest);
    } catch (e) {
      renameSync(old, dest);
      throw e;
    }
    rmSync(old, { recursive: true, force: true });
  }
  fsyncPath(dirname(dest));
}
