import { mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { HostTensor } from "../backend/backend.js";
import { bf16ToF32, f32ToBf16, f32ToF16 } from "../backend/tensor.js";
import { SafetensorsDir, SafetensorsFile, writeSafetensors } from "./safetensors.js";

const tmp = mkdtempSync(join(tmpdir(), "inlaid-st-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const DEMO = join(import.meta.dirname, "../../examples/demo/base/model.safetensors");

/** Hand-builds a file from a header object and a data buffer (for malformed cases). */
function rawFile(name: string, header: unknown, data: Uint8Array, headerLen?: bigint): string {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLen ?? BigInt(json.length));
  const p = join(tmp, name);
  writeFileSync(p, Buffer.concat([len, json, data]));
  return p;
}

function sample(): Record<string, HostTensor> {
  const f = Float32Array.from({ length: 6 }, (_, i) => i * 0.5 - 1);
  return {
    "b.f32": { shape: [2, 3], dtype: "f32", data: f },
    "a.bf16": { shape: [3, 2], dtype: "bf16", data: f32ToBf16(f) },
    "c.f16": { shape: [6], dtype: "f16", data: f32ToF16(f) },
    "d.i32": { shape: [1, 3], dtype: "i32", data: Int32Array.of(-7, 0, 2 ** 31 - 1) },
    "e.empty": { shape: [0, 4], dtype: "f32", data: new Float32Array(0) },
  };
}

describe("writeSafetensors / SafetensorsFile", () => {
  it("round-trips f32, bf16, f16 and i32 with metadata", () => {
    const p = join(tmp, "rt.safetensors");
    const tensors = sample();
    writeSafetensors(p, tensors, { format: "pt", note: "hi" });
    expect(readdirSync(tmp).filter((f) => f.includes(".tmp-"))).toEqual([]);

    const raw = readFileSync(p);
    const n = Number(raw.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    // Data laid out sorted by name.
    const header = JSON.parse(raw.subarray(8, 8 + n).toString()) as Record<string, { data_offsets: number[] }>;
    expect(header["a.bf16"]!.data_offsets[0]).toBe(0);

    const f = SafetensorsFile.open(p);
    try {
      expect(f.names()).toEqual(["a.bf16", "b.f32", "c.f16", "d.i32", "e.empty"]);
      expect(f.metadata).toEqual({ format: "pt", note: "hi" });
      for (const [name, t] of Object.entries(tensors)) {
        const got = f.get(name);
        expect(got.dtype).toBe(t.dtype);
        expect(got.shape).toEqual(t.shape);
        expect(got.data.constructor).toBe(t.data.constructor);
        expect(Array.from(got.data)).toEqual(Array.from(t.data));
      }
      expect(f.info("a.bf16")).toEqual({ dtype: "bf16", fileDtype: "BF16", shape: [3, 2], byteLength: 12 });
      expect(() => f.get("nope")).toThrow(/has no tensor named nope/);
    } finally {
      f.close();
    }
    expect(() => f.get("b.f32")).toThrow(/closed/);
  });

  it("writes typed arrays that are views at an offset into a larger buffer", () => {
    const big = new Float32Array([9, 1, 2, 3, 9]);
    const p = join(tmp, "view.safetensors");
    writeSafetensors(p, { x: { shape: [3], dtype: "f32", data: big.subarray(1, 4) } });
    const f = SafetensorsFile.open(p);
    expect(Array.from(f.get("x").data)).toEqual([1, 2, 3]);
    f.close();
  });

  it("refuses data whose typed array does not match the dtype or shape", () => {
    const p = join(tmp, "bad-write.safetensors");
    expect(() => writeSafetensors(p, { x: { shape: [2], dtype: "bf16", data: new Float32Array(2) } })).toThrow(/x is bf16 but its data is a Float32Array/);
    expect(() => writeSafetensors(p, { x: { shape: [3], dtype: "f32", data: new Float32Array(2) } })).toThrow(/shape \[3\] but 2 elements/);
    expect(readdirSync(tmp).filter((f) => f.startsWith("bad-write"))).toEqual([]);
  });

  it("reports a truncated file with the tensor, byte range and file size", () => {
    const p = join(tmp, "trunc.safetensors");
    writeSafetensors(p, sample());
    const size = readFileSync(p).length;
    truncateSync(p, size - 4);
    expect(() => SafetensorsFile.open(p)).toThrow(
      new RegExp(`trunc\\.safetensors is truncated: tensor d\\.i32 needs bytes \\d+\\.\\.${size} but the file has ${size - 4}; re-download or re-save it`),
    );
  });

  it("rejects bad headers with the file name and the reason", () => {
    const data = new Uint8Array(8);
    const ok = { x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
    expect(() => SafetensorsFile.open(rawFile("json.safetensors", "", data))).toThrow(/header is not a JSON object/);
    const notJson = join(tmp, "notjson.safetensors");
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(5n);
    writeFileSync(notJson, Buffer.concat([len, Buffer.from("{oops"), data]));
    expect(() => SafetensorsFile.open(notJson)).toThrow(/notjson\.safetensors is not a valid safetensors file: header is not JSON/);
    expect(() => SafetensorsFile.open(rawFile("huge.safetensors", ok, data, 1n << 40n))).toThrow(/huge\.safetensors .*header length \d+ exceeds/);
    expect(() => SafetensorsFile.open(rawFile("long.safetensors", ok, data, 4096n))).toThrow(/long\.safetensors is truncated: its header needs bytes 8\.\.4104/);
    const tiny = join(tmp, "tiny.safetensors");
    writeFileSync(tiny, Buffer.from([1, 2, 3]));
    expect(() => SafetensorsFile.open(tiny)).toThrow(/tiny\.safetensors .*fewer than the 8-byte header length/);
    expect(() => SafetensorsFile.open(rawFile("size.safetensors", { x: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, data))).toThrow(
      /x \(F32 \[3\]\) should span 12 bytes but data_offsets \[0, 8\] span 8/,
    );
    const overlap = { x: { dtype: "F32", shape: [1], data_offsets: [0, 4] }, y: { dtype: "F32", shape: [1], data_offsets: [2, 6] } };
    expect(() => SafetensorsFile.open(rawFile("overlap.safetensors", overlap, data))).toThrow(/overlap\.safetensors .*tensors x .* and y .* overlap/);
    expect(() => SafetensorsFile.open(rawFile("offs.safetensors", { x: { dtype: "F32", shape: [1], data_offsets: [4, 0] } }, data))).toThrow(/invalid data_offsets/);
    expect(() => SafetensorsFile.open(rawFile("dtype.safetensors", { x: { dtype: "Q4", shape: [1], data_offsets: [0, 1] } }, data))).toThrow(/unknown dtype Q4/);
    expect(() => SafetensorsFile.open(join(tmp, "missing.safetensors"))).toThrow(/cannot open .*missing\.safetensors/);
  });

  it("reads metadata of an I64 tensor but refuses to get it", () => {
    const header = {
      ids: { dtype: "I64", shape: [2], data_offsets: [0, 16] },
      w: { dtype: "F32", shape: [2], data_offsets: [16, 24] },
    };
    const data = new Uint8Array(24);
    new Float32Array(data.buffer, 16, 2).set([1.5, -2]);
    const f = SafetensorsFile.open(rawFile("i64.safetensors", header, data));
    expect(f.info("ids")).toEqual({ dtype: null, fileDtype: "I64", shape: [2], byteLength: 16 });
    expect(() => f.get("ids")).toThrow(/tensor ids has dtype I64, which cannot be loaded/);
    expect(Array.from(f.get("w").data)).toEqual([1.5, -2]);
    f.close();
  });

  it("reads the demo checkpoint", () => {
    const f = SafetensorsFile.open(DEMO);
    expect(f.info("model.embed_tokens.weight")).toMatchObject({ dtype: "bf16", shape: [512, 256], byteLength: 512 * 256 * 2 });
    const t = f.get("model.embed_tokens.weight");
    expect(t.data).toBeInstanceOf(Uint16Array);
    expect(t.data.length).toBe(512 * 256);
    const x = bf16ToF32(t.data as Uint16Array);
    expect(x.every(Number.isFinite)).toBe(true);
    expect(x.some((v) => v !== 0)).toBe(true);
    expect(f.names()).toContain("model.layers.5.mlp.down_proj.weight");
    f.close();
  });
});

describe("SafetensorsDir", () => {
  it("opens a sharded folder through model.safetensors.index.json", () => {
    const dir = mkdtempSync(join(tmp, "sharded-"));
    const t = sample();
    writeSafetensors(join(dir, "model-00001-of-00002.safetensors"), { "a.bf16": t["a.bf16"]!, "b.f32": t["b.f32"]! });
    writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), { "c.f16": t["c.f16"]!, "d.i32": t["d.i32"]! });
    const weightMap = {
      "a.bf16": "model-00001-of-00002.safetensors",
      "b.f32": "model-00001-of-00002.safetensors",
      "c.f16": "model-00002-of-00002.safetensors",
      "d.i32": "model-00002-of-00002.safetensors",
    };
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }));
    const d = SafetensorsDir.open(dir);
    expect(d.names()).toEqual(["a.bf16", "b.f32", "c.f16", "d.i32"]);
    expect(d.has("c.f16")).toBe(true);
    expect(d.has("e.empty")).toBe(false);
    expect(d.info("d.i32").shape).toEqual([1, 3]);
    expect(Array.from(d.get("d.i32").data)).toEqual([-7, 0, 2 ** 31 - 1]);
    expect(Array.from(d.get("b.f32").data)).toEqual(Array.from(t["b.f32"]!.data));
    expect(() => d.get("zzz")).toThrow(/has no tensor named zzz/);
    d.close();

    // An index that names a tensor its shard does not hold.
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: { ...weightMap, ghost: "model-00002-of-00002.safetensors" } }));
    expect(() => SafetensorsDir.open(dir)).toThrow(/says ghost is in model-00002-of-00002\.safetensors, but that file has no such tensor/);
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: { x: "model-00003-of-00003.safetensors" } }));
    expect(() => SafetensorsDir.open(dir)).toThrow(/names shard model-00003-of-00003\.safetensors, which is missing/);
  });

  it("falls back to every *.safetensors in the folder and rejects duplicate names", () => {
    const dir = mkdtempSync(join(tmp, "glob-"));
    const t = sample();
    writeSafetensors(join(dir, "part1.safetensors"), { "a.bf16": t["a.bf16"]! });
    writeSafetensors(join(dir, "part2.safetensors"), { "b.f32": t["b.f32"]! });
    const d = SafetensorsDir.open(dir);
    expect(d.names()).toEqual(["a.bf16", "b.f32"]);
    d.close();
    writeSafetensors(join(dir, "part3.safetensors"), { "b.f32": t["b.f32"]! });
    expect(() => SafetensorsDir.open(dir)).toThrow(/b\.f32 is in both part2\.safetensors and part3\.safetensors/);
  });

  it("opens model.safetensors, or a file path, and names pickled checkpoints it will not read", () => {
    const demo = SafetensorsDir.open(join(DEMO, ".."));
    expect(demo.info("lm_head.weight").shape).toEqual([512, 256]);
    demo.close();
    const one = SafetensorsDir.open(DEMO);
    expect(one.has("model.norm.weight")).toBe(true);
    one.close();
    const dir = mkdtempSync(join(tmp, "bin-"));
    writeFileSync(join(dir, "pytorch_model.bin"), "x");
    expect(() => SafetensorsDir.open(dir)).toThrow(/has no \*\.safetensors files \(pickled .* never loaded/);
  });
});
