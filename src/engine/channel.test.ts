import { describe, expect, it } from "vitest";
import { Channel } from "./channel.js";

describe("Channel", () => {
  it("delivers items pushed before and after the consumer waits, then ends", async () => {
    const ch = new Channel<number>(() => {});
    ch.push(1);
    const got: number[] = [];
    const done = (async () => {
      for await (const x of ch) got.push(x);
    })();
    await new Promise((r) => setTimeout(r, 5));
    ch.push(2);
    ch.push(3);
    ch.close();
    await done;
    expect(got).toEqual([1, 2, 3]);
  });

  it("calls onCancel when the consumer stops early, not after a normal end", async () => {
    let cancelled = 0;
    const ch = new Channel<number>(() => cancelled++);
    ch.push(1);
    ch.push(2);
    for await (const x of ch) if (x === 1) break;
    expect(cancelled).toBe(1);
    const ch2 = new Channel<number>(() => cancelled++);
    ch2.push(1);
    ch2.close();
    for await (const _ of ch2) {
      /* drain */
    }
    expect(cancelled).toBe(1);
  });
});
