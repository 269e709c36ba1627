// Safetensors reader and writer, written here so that no pickle is ever loaded and no
// third-party parser sits between the disk and the model.
//
// Format: u64 little-endian header length N, N bytes of JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {str: str}},
// then the data buffer; offsets are relative to the start of the data buffer.
//
// Files can be many GB: opening reads only the header, and `get` reads exactly one
// tensor's bytes with positioned reads.

import { closeSync, existsSync, fstatSync, fsyncSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { endianness } from "node:os";
import { basename, dirname, join } from "node:path";
import type { HostTensor } from "../backend/backend.js";
import { bytesPerElement, numel, type DType, type Shape } from "../backend/tensor.js";

/** Headers larger than this are refused (the reference implementation's limit). */
const MAX_HEADER_BYTES = 100_000_000;
/** readSync moves at most ~2 GiB per call; large tensors are read in chunks of this size. */
const READ_CHUNK = 1 << 30;

/** Safetensors dtypes we can hand to a backend, and what they map to. */
const LOADABLE: Readonly<Record<string, DType>> = { F32: "f32", F16: "f16", BF16: "bf16", I32: "i32" };
const FILE_DTYPE: Readonly<Record<DType, string>> = { f32: "F32", f16: "F16", bf16: "BF16", i32: "I32" };

/** Element sizes of every safetensors dtype, so offsets can be checked even for tensors we cannot load. */
const ELEMENT_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, F8_E8M0: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8, C64: 8,
};

// Typed arrays over file bytes are only correct on a little-endian host, like every
// machine Node ships for today; fail loudly rather than return byte-swapped weights.
if (endianness() !== "LE") throw new Error("safetensors: big-endian hosts are not supported");

export interface TensorInfo {
  /** Our dtype, or null when the file's dtype cannot be loaded (see `fileDtype`). */
  readonly dtype: DType | null;
  /** The dtype as the file spells it ("BF16", "I64", ...). */
  readonly fileDtype: string;
  readonly shape: Shape;
  readonly byteLength: number;
}

interface Entry extends TensorInfo {
  /** Offsets relative to the data buffer. */
  readonly begin: number;
  readonly end: number;
}

/** One .safetensors file; holds an open file descriptor until `close()`. */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  #fd: number | null;
  readonly #dataStart: number;
  readonly #entries: ReadonlyMap<string, Entry>;

  private constructor(path: string, fd: number, dataStart: number, entries: Map<string, Entry>, metadata: Record<string, string>) {
    this.path = path;
    this.#fd = fd;
    this.#dataStart = dataStart;
    this.#entries = entries;
    this.metadata = metadata;
  }

  /** Opens `path` and parses and validates its header; reads no tensor data. */
  static open(path: string): SafetensorsFile {
    let fd: number;
    try {
      fd = openSync(path, "r");
    } catch (e) {
      throw new Error(`cannot open ${path}: ${(e as Error).message}`);
    }
    try {
      const fileSize = fstatSync(fd).size;
      const { dataStart, entries, metadata } = parseHeader(path, fd, fileSize);
      return new SafetensorsFile(path, fd, dataStart, entries, metadata);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  /** Tensor names, sorted. */
  names(): string[] {
    return [...this.#entries.keys()].sort();
  }

  has(name: string): boolean {
    return this.#entries.has(name);
  }

  info(name: string): TensorInfo {
    const e = this.#entry(name);
    return { dtype: e.dtype, fileDtype: e.fileDtype, shape: e.shape, byteLength: e.byteLength };
  }

  /** Reads one tensor into a freshly allocated (hence aligned) typed array. */
  get(name: string): HostTensor {
    const e = this.#entry(name);
    if (e.dtype === null) {
      throw new Error(`${this.path}: tensor ${name} has dtype ${e.fileDtype}, which cannot be loaded (supported: F32, F16, BF16, I32)`);
    }
    if (this.#fd === null) throw new Error(`${this.path} is closed`);
    // A new ArrayBuffer rather than a view into a shared Buffer pool: the typed array
    // must start at an offset that is a multiple of its element size.
    const buf = new ArrayBuffer(e.byteLength);
    const bytes = new Uint8Array(buf);
    let done = 0;
    while (done < e.byteLength) {
      const want = Math.min(READ_CHUNK, e.byteLength - done);
      const got = readSync(this.#fd, bytes, done, want, this.#dataStart + e.begin + done);
      if (got === 0) {
        throw new Error(`${this.path} is truncated: tensor ${name} ended early while reading; re-download or re-save it`);
      }
      done += got;
    }
    return { shape: e.shape, dtype: e.dtype, data: typedView(e.dtype, buf) };
  }

  close(): void {
    if (this.#fd !== null) closeSync(this.#fd);
    this.#fd = null;
  }

  #entry(name: string): Entry {
    const e = this.#entries.get(name);
    if (!e) throw new Error(`${this.path} has no tensor named ${name}`);
    return e;
  }
}

function typedView(dtype: DType, buf: ArrayBuffer): HostTensor["data"] {
  switch (dtype) {
    case "f32":
      return new Float32Array(buf);
    case "bf16":
    case "f16":
      return new Uint16Array(buf);
    case "i32":
      return new Int32Array(buf);
    default:
      return dtype satisfies never;
  }
}

function readExactly(fd: number, length: number, position: number): Buffer {
  const out = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const got = readSync(fd, out, done, length - done, position + done);
    if (got === 0) break;
    done += got;
  }
  return out.subarray(0, done);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

function parseHeader(path: string, fd: number, fileSize: number): { dataStart: number; entries: Map<string, Entry>; metadata: Record<string, string> } {
  const bad = (why: string) => new Error(`${path} is not a valid safetensors file: ${why}`);
  if (fileSize < 8) throw bad(`it has ${fileSize} bytes, fewer than the 8-byte header length`);
  const lenBuf = readExactly(fd, 8, 0);
  const headerLen = lenBuf.readBigUInt64LE(0);
  if (headerLen > BigInt(MAX_HEADER_BYTES)) throw bad(`header length ${headerLen} exceeds ${MAX_HEADER_BYTES} bytes`);
  const n = Number(headerLen);
  if (8 + n > fileSize) {
    throw new Error(`${path} is truncated: its header needs bytes 8..${8 + n} but the file has ${fileSize}; re-download or re-save it`);
  }
  let header: unknown;
  try {
    header = JSON.parse(readExactly(fd, n, 8).toString("utf8"));
  } catch (e) {
    throw bad(`header is not JSON (${(e as Error).message})`);
  }
  if (!isObject(header)) throw bad("header is not a JSON object");

  const dataStart = 8 + n;
  const dataSize = fileSize - dataStart;
  const entries = new Map<string, Entry>();
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header)) {
    if (name === "__metadata__") {
      if (!isObject(raw) || !Object.values(raw).every((v) => typeof v === "string")) {
        throw bad("__metadata__ must map strings to strings");
      }
      metadata = raw as Record<string, string>;
      continue;
    }
    if (!isObject(raw)) throw bad(`entry for tensor ${name} is not an object`);
    const { dtype, shape, data_offsets: offsets } = raw;
    if (typeof dtype !== "string") throw bad(`tensor ${name} has no dtype string`);
    if (!Array.isArray(shape) || !shape.every(isNonNegInt)) throw bad(`tensor ${name} has an invalid shape ${JSON.stringify(shape)}`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegInt) || offsets[0] > offsets[1]) {
      throw bad(`tensor ${name} has invalid data_offsets ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as [number, number];
    const elem = ELEMENT_BYTES[dtype];
    if (elem === undefined) throw bad(`tensor ${name} has unknown dtype ${dtype}`);
    const expected = numel(shape as number[]) * elem;
    if (end - begin !== expected) {
      throw bad(`tensor ${name} (${dtype} [${shape.join(", ")}]) should span ${expected} bytes but data_offsets [${begin}, ${end}] span ${end - begin}`);
    }
    if (end > dataSize) {
      throw new Error(
        `${path} is truncated: tensor ${name} needs bytes ${dataStart + begin}..${dataStart + end} but the file has ${fileSize}; re-download or re-save it`,
      );
    }
    entries.set(name, { dtype: LOADABLE[dtype] ?? null, fileDtype: dtype, shape: Object.freeze([...(shape as number[])]), byteLength: expected, begin, end });
  }

  // Two tensors sharing bytes would mean one of them is silently wrong.
  const sorted = [...entries.entries()].filter(([, e]) => e.end > e.begin).sort((x, y) => x[1].begin - y[1].begin);
  for (let i = 1; i < sorted.length; i++) {
    const [pn, p] = sorted[i - 1]!;
    const [cn, c] = sorted[i]!;
    if (c.begin < p.end) throw bad(`tensors ${pn} [${p.begin}, ${p.end}) and ${cn} [${c.begin}, ${c.end}) overlap`);
  }
  return { dataStart, entries, metadata };
}

/**
 * A model's tensors across one or more files: a single file path, a folder with
 * `model.safetensors`, a sharded folder with `model.safetensors.index.json`, or
 * (fallback) every `*.safetensors` in the folder.
 */
export class SafetensorsDir {
  readonly path: string;
  readonly files: readonly SafetensorsFile[];
  readonly #byName: ReadonlyMap<string, SafetensorsFile>;

  private constructor(path: string, files: SafetensorsFile[], byName: Map<string, SafetensorsFile>) {
    this.path = path;
    this.files = files;
    this.#byName = byName;
  }

  static open(path: string): SafetensorsDir {
    if (!existsSync(path)) throw new Error(`${path} does not exist`);
    if (statSync(path).isFile()) return SafetensorsDir.#fromFiles(path, [path]);

    const index = join(path, "model.safetensors.index.json");
    if (existsSync(index)) return SafetensorsDir.#fromIndex(path, index);
    const single = join(path, "model.safetensors");
    if (existsSync(single)) return SafetensorsDir.#fromFiles(path, [single]);
    const all = readdirSync(path).filter((f) => f.endsWith(".safetensors")).sort();
    if (all.length === 0) {
      const pickled = readdirSync(path).some((f) => f.endsWith(".bin") || f.endsWith(".pt") || f.endsWith(".pth"));
      throw new Error(
        `${path} has no *.safetensors files` +
          (pickled ? " (pickled .bin/.pt checkpoints are never loaded; convert them to safetensors first)" : ""),
      );
    }
    return SafetensorsDir.#fromFiles(path, all.map((f) => join(path, f)));
  }

  static #fromFiles(path: string, paths: string[]): SafetensorsDir {
    const files: SafetensorsFile[] = [];
    const byName = new Map<string, SafetensorsFile>();
    try {
      for (const p of paths) {
        const f = SafetensorsFile.open(p);
        files.push(f);
        for (const name of f.names()) {
          const prev = byName.get(name);
          if (prev) throw new Error(`tensor ${name} is in both ${basename(prev.path)} and ${basename(p)} in ${path}`);
          byName.set(name, f);
        }
      }
    } catch (e) {
      for (const f of files) f.close();
      throw e;
    }
    return new SafetensorsDir(path, files, byName);
  }

  static #fromIndex(path: string, indexPath: string): SafetensorsDir {
    let weightMap: Record<string, unknown>;
    try {
      const idx: unknown = JSON.parse(readFileSync(indexPath, "utf8"));
      if (!isObject(idx) || !isObject(idx["weight_map"])) throw new Error("it has no weight_map object");
      weightMap = idx["weight_map"];
    } catch (e) {
      throw new Error(`${indexPath} is not a valid index: ${(e as Error).message}`);
    }
    const shardNames = [...new Set(Object.values(weightMap))];
    for (const s of shardNames) {
      // Shard names are plain file names; anything else could point outside the folder.
      if (typeof s !== "string" || s !== basename(s)) throw new Error(`${indexPath}: weight_map value ${JSON.stringify(s)} is not a file name`);
    }
    const opened = new Map<string, SafetensorsFile>();
    const byName = new Map<string, SafetensorsFile>();
    try {
      for (const s of shardNames as string[]) {
        const p = join(path, s);
        if (!existsSync(p)) throw new Error(`${indexPath} names shard ${s}, which is missing from ${path}; re-download it`);
        opened.set(s, SafetensorsFile.open(p));
      }
      // The index decides which shard owns each name; the shard must actually hold it.
      for (const [name, s] of Object.entries(weightMap)) {
        const f = opened.get(s as string)!;
        if (!f.has(name)) throw new Error(`${indexPath} says ${name} is in ${s}, but that file has no such tensor`);
        byName.set(name, f);
      }
    } catch (e) {
      for (const f of opened.values()) f.close();
      throw e;
    }
    return new SafetensorsDir(path, [...opened.values()], byName);
  }

  /** Tensor names across all shards, sorted. */
  names(): string[] {
    return [...this.#byName.keys()].sort();
  }

  has(name: string): boolean {
    return this.#byName.has(name);
  }

  info(name: string): TensorInfo {
    return this.#file(name).info(name);
  }

  get(name: string): HostTensor {
    return this.#file(name).get(name);
  }

  close(): void {
    for (const f of this.files) f.close();
  }

  #file(name: string): SafetensorsFile {
    const f = this.#byName.get(name);
    if (!f) throw new Error(`checkpoint ${this.path} has no tensor named ${name}`);
    return f;
  }
}

/** Whether `data` is the typed array HostTensor promises for `dtype`. */
function dataMatches(dtype: DType, data: HostTensor["data"]): boolean {
  switch (dtype) {
    case "f32":
      return data instanceof Float32Array;
    case "bf16":
    case "f16":
      return data instanceof Uint16Array;
    case "i32":
      return data instanceof Int32Array;
    default:
      return dtype satisfies never;
  }
}

/**
 * Writes `tensors` to `path` atomically: a temp file beside it is written, fsynced and
 * renamed over `path`, so readers never see a half-written file. Tensors are laid out
 * sorted by name; the header is space-padded so the data buffer starts 8-aligned.
 */
export function writeSafetensors(path: string, tensors: Readonly<Record<string, HostTensor>>, metadata?: Readonly<Record<string, string>>): void {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header["__metadata__"] = metadata;
  let offset = 0;
  for (const name of names) {
    if (name === "__metadata__") throw new Error(`writeSafetensors ${path}: "__metadata__" is reserved and cannot name a tensor`);
    const t = tensors[name]!;
    if (!dataMatches(t.dtype, t.data)) {
      throw new Error(`writeSafetensors ${path}: tensor ${name} is ${t.dtype} but its data is a ${t.data.constructor.name}`);
    }
    if (t.data.length !== numel(t.shape)) {
      throw new Error(`writeSafetensors ${path}: tensor ${name} has shape [${t.shape.join(", ")}] but ${t.data.length} elements`);
    }
    const size = numel(t.shape) * bytesPerElement(t.dtype);
    header[name] = { dtype: FILE_DTYPE[t.dtype], shape: [...t.shape], data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBytes = Buffer.from(json, "utf8");
  const lenBytes = Buffer.alloc(8);
  lenBytes.writeBigUInt64LE(BigInt(headerBytes.length));

  const tmp = `${path}.tmp-${process.pid}`;
  try {
    const fd = openSync(tmp, "w");
    try {
      writeAll(fd, lenBytes);
      writeAll(fd, headerBytes);
      for (const name of names) {
        const d = tensors[name]!.data;
        writeAll(fd, new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  // Make the rename itself durable; some filesystems refuse fsync on a directory.
  try {
    const dfd = openSync(dirname(path), "r");
    try {
      fsyncSync(dfd);
    } finally {
      closeSync(dfd);
    }
  } catch {
    /* best effort */
  }
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) done += writeSync(fd, bytes, done, Math.min(READ_CHUNK, bytes.length - done));
}
