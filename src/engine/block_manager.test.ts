import { describe, expect, it } from "vitest";
import { BlockManager } from "./block_manager.js";

describe("BlockManager", () => {
  it("grows tables block by block and refuses without partial allocation", () => {
    const bm = new BlockManager(4, 16);
    const a: number[] = [];
    expect(bm.grow(a, 1)).toBe(true);
    expect(a.length).toBe(1);
    expect(bm.grow(a, 16)).toBe(true);
    expect(a.length).toBe(1);
    expect(bm.grow(a, 17)).toBe(true);
    expect(a.length).toBe(2);
    const b: number[] = [];
    expect(bm.grow(b, 48)).toBe(false);
    expect(b).toEqual([]);
    expect(bm.freeBlocks).toBe(2);
    expect(bm.grow(b, 32)).toBe(true);
    expect(new Set([...a, ...b]).size).toBe(4);
    bm.release(a);
    expect(a).toEqual([]);
    expect(bm.freeBlocks).toBe(2);
    expect(bm.usedBlocks).toBe(2);
  });

  it("rejects an empty cache with a clear message", () => {
    expect(() => new BlockManager(0, 16)).toThrow(/at least one block/);
  });
});
