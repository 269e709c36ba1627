// The launcher's kernelParams marshalling, checked without a GPU: a fake driver
// receives the launch and reads the native `void*[]` table and the argument slots
// back through libc's memcpy, exactly as cuLaunchKernel would dereference them.

import koffi from "koffi";
import { describe, expect, it } from "vitest";
import type { CudaDriver } from "./ffi/driver.js";
import { KernelLauncher } from "./launcher.js";

const linux = process.platform === "linux";

interface Seen {
  fn: bigint;
  dims: number[];
  shared: number;
  stream: bigint;
  slots: ArrayBuffer[];
}

function fakeDriver(functions: Record<string, bigint>, nargs: () => number, seen: Seen[], attrs: [bigint, number][]): CudaDriver {
  const libc = koffi.load("libc.so.6");
  const memcpy = libc.func("void *memcpy(void *dst, uint64_t src, size_t n)");
  const fake = {
    moduleLoadData: (_img: Uint8Array) => 0x1000n,
    moduleUnload: () => {},
    moduleGetFunction: (_mod: bigint, name: string) => functions[name] ?? null,
    funcSetAttribute: (fn: bigint, _attr: number, value: number) => attrs.push([fn, value]),
    launchKernel: (fn: bigint, gx: number, gy: number, gz: number, bx: number, by: number, bz: number, shared: number, stream: bigint, params: bigint) => {
      const table = new BigUint64Array(nargs());
      memcpy(table, params, table.byteLength);
      const slots = Array.from(table, (addr) => {
        const b = new ArrayBuffer(8);
        memcpy(new Uint8Array(b), addr, 8);
        return b;
      });
      seen.push({ fn, dims: [gx, gy, gz, bx, by, bz], shared, stream, slots });
    },
  };
  return fake as unknown as CudaDriver;
}

describe.skipIf(!linux)("KernelLauncher", () => {
  it("passes each argument by address, typed as the kernel declares it, and reuses its buffers", () => {
    const seen: Seen[] = [];
    let n = 0;
    const attrs: [bigint, number][] = [];
    const d = fakeDriver({ k: 0xabcn }, () => n, seen, attrs);
    const l = new KernelLauncher(d, 0x5157n, [{ file: "k.cu", image: new Uint8Array(1), cached: true, ms: 0 }], 227 * 1024);
    const args = [{ ptr: 0x7f0012345600n }, { i32: -5 }, { u32: 0xfffffff0 }, { f32: 0.1 }, { ptr: 0n }];
    n = args.length;
    l.launch("k", [3, 2, 1], [128, 1, 1], 1024, args);
    l.launch("k", [1, 1, 1], [32, 1, 1], 0, [{ i32: 7 }]);
    expect(seen).toHaveLength(2);
    const [a] = seen;
    expect(a!.fn).toBe(0xabcn);
    expect(a!.dims).toEqual([3, 2, 1, 128, 1, 1]);
    expect(a!.shared).toBe(1024);
    expect(a!.stream).toBe(0x5157n);
    expect(new BigUint64Array(a!.slots[0]!)[0]).toBe(0x7f0012345600n);
    expect(new Int32Array(a!.slots[1]!)[0]).toBe(-5);
    expect(new Uint32Array(a!.slots[2]!)[0]).toBe(0xfffffff0);
    expect(new Float32Array(a!.slots[3]!)[0]).toBe(Math.fround(0.1));
    expect(new BigUint64Array(a!.slots[4]!)[0]).toBe(0n);
    expect(new Int32Array(seen[1]!.slots[0]!)[0]).toBe(7);
    expect(l.launches).toBe(2);
    expect(attrs).toEqual([]);
    l.dispose();
  });

  it("raises the dynamic shared memory limit once, and refuses more than the device allows", () => {
    const seen: Seen[] = [];
    const attrs: [bigint, number][] = [];
    const d = fakeDriver({ big: 0x1n }, () => 0, seen, attrs);
    const l = new KernelLauncher(d, 0n, [{ file: "k.cu", image: new Uint8Array(1), cached: true, ms: 0 }], 100_000);
    l.launch("big", [1, 1, 1], [1, 1, 1], 64 * 1024, []);
    l.launch("big", [1, 1, 1], [1, 1, 1], 60 * 1024, []);
    l.launch("big", [1, 1, 1], [1, 1, 1], 80 * 1024, []);
    expect(attrs).toEqual([[0x1n, 64 * 1024], [0x1n, 80 * 1024]]);
    expect(() => l.launch("big", [1, 1, 1], [1, 1, 1], 200_000, [])).toThrow(/device allows 100000/);
    l.dispose();
  });

  it("launches PDL kernels through cuLaunchKernelEx with a CUlaunchConfig laid out as cuda.h declares it", () => {
    const libc = koffi.load("libc.so.6");
    const memcpy = libc.func("void *memcpy(void *dst, uint64_t src, size_t n)");
    const seen: Seen[] = [];
    const configs: { cfg: Uint32Array; stream: bigint; attr: Uint32Array; fn: bigint; arg0: number }[] = [];
    const d = fakeDriver({ p: 0x22n, q: 0x33n }, () => 1, seen, []);
    (d as unknown as { launchKernelEx: unknown }).launchKernelEx = (config: bigint, fn: bigint, params: bigint) => {
      const bytes = new ArrayBuffer(56);
      memcpy(new Uint8Array(bytes), config, 56);
      const attrAddr = new BigUint64Array(bytes, 40, 1)[0]!;
      const attr = new ArrayBuffer(72);
      memcpy(new Uint8Array(attr), attrAddr, 72);
      const slot = new BigUint64Array(1);
      memcpy(slot, params, 8);
      const arg0 = new Int32Array(1);
      memcpy(arg0, slot[0]!, 4);
      configs.push({ cfg: new Uint32Array(bytes.slice(0)), stream: new BigUint64Array(bytes, 32, 1)[0]!, attr: new Uint32Array(attr), fn, arg0: arg0[0]! });
    };
    const l = new KernelLauncher(d, 0x5157n, [{ file: "k.cu", image: new Uint8Array(1), cached: true, ms: 0 }], 227 * 1024, new Set(["p"]));
    l.launch("p", [5, 6, 7], [128, 2, 1], 4096, [{ i32: 9 }]);
    l.launch("q", [1, 1, 1], [32, 1, 1], 0, [{ i32: 1 }]);
    expect(configs).toHaveLength(1);
    expect(seen).toHaveLength(1); // "q" is not a PDL kernel: plain cuLaunchKernel
    const c = configs[0]!;
    expect([...c.cfg.slice(0, 7)]).toEqual([5, 6, 7, 128, 2, 1, 4096]);
    expect(c.stream).toBe(0x5157n);
    expect(c.cfg[12]).toBe(1); // numAttrs
    expect(c.attr[0]).toBe(6); // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    expect(c.attr[2]).toBe(1); // programmaticStreamSerializationAllowed
    expect(c.fn).toBe(0x22n);
    expect(c.arg0).toBe(9);
    l.dispose();
  });

  it("after a library kernel, asks the driver for a launch-order edge for the next early kernel only, and launches it plainly", () => {
    const seen: Seen[] = [];
    const d = fakeDriver({ p: 0x22n, q: 0x33n, e: 0x44n }, () => 0, seen, []);
    const ex: bigint[] = [], asked: bigint[] = [];
    let capturing = true;
    const fake = d as unknown as { launchKernelEx: unknown; captureDependOnLaunchOrder: unknown };
    fake.launchKernelEx = (_config: bigint, fn: bigint) => ex.push(fn);
    fake.captureDependOnLaunchOrder = (stream: bigint) => {
      asked.push(stream);
      return capturing;
    };
    const image = [{ file: "k.cu", image: new Uint8Array(1), cached: true, ms: 0 }];
    const l = new KernelLauncher(d, 0x77n, image, 0, new Set(["p", "e"]), new Set(["e"]));
    l.launch("e", [1, 1, 1], [32, 1, 1], 0, []); // no library kernel before: not asked
    l.noteUntriggered();
    l.launch("q", [1, 1, 1], [32, 1, 1], 0, []); // not a PDL kernel: not asked, and the note is spent
    l.launch("e", [1, 1, 1], [32, 1, 1], 0, []);
    l.noteUntriggered();
    l.launch("p", [1, 1, 1], [32, 1, 1], 0, []); // a PDL kernel not named early: not asked
    expect(asked).toEqual([]);
    l.noteUntriggered();
    l.launch("e", [1, 1, 1], [32, 1, 1], 0, []); // asked; hung on the edge: plain launch
    capturing = false;
    l.noteUntriggered();
    l.launch("e", [1, 1, 1], [32, 1, 1], 0, []); // asked; declined: the usual PDL launch
    expect(asked).toEqual([0x77n, 0x77n]);
    expect(l.launchOrderEdges).toBe(1);
    expect(ex).toEqual([0x44n, 0x44n, 0x22n, 0x44n]);
    expect(seen.map((x) => x.fn)).toEqual([0x33n, 0x44n]);
    l.dispose();
    // With no kernel named (INLAID_GEMM_EARLY=0) the note does nothing.
    const off = new KernelLauncher(d, 0x77n, image, 0, new Set(["p", "e"]));
    asked.length = 0;
    off.noteUntriggered();
    off.launch("e", [1, 1, 1], [32, 1, 1], 0, []);
    expect(asked).toEqual([]);
    off.dispose();
  });

  it("names the loaded files when a kernel is missing", () => {
    const d = fakeDriver({}, () => 0, [], []);
    const l = new KernelLauncher(d, 0n, [{ file: "a.cu", image: new Uint8Array(1), cached: false, ms: 0 }], 0);
    expect(l.has("nope")).toBe(false);
    expect(() => l.launch("nope", [1, 1, 1], [1, 1, 1], 0, [])).toThrow(/'nope' is not defined in any loaded module \(a\.cu\)/);
    l.dispose();
  });
});
