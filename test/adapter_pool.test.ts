// More adapters than pool slots: requests wait for a slot (LRU eviction of unpinned
// adapters) and still get their own adapter's answer; unload/reload keeps serving.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createEngine, type Engine } from "../src/engine/engine.js";
import { RequestError } from "../src/engine/types.js";
import { GREEDY, collect } from "./helpers/collect.js";
import { DEMO_ADAPTERS, DEMO_BASE } from "./helpers/demo.js";

const EXPECT: Record<string, string> = {
  reverse: " zu bram kto", sort: " bram kto zu", caesar: " lup csbn av", mirror: " otk marb uz",
};

describe("adapter pool with 2 slots for 4 adapters", () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ modelDir: DEMO_BASE, adapters: DEMO_ADAPTERS, device: "cpu", maxLoras: 2 });
  });
  afterAll(async () => engine?.close());

  const ask = (adapter: string | null, i: number) =>
    collect(engine.generate({ id: `p${i}`, promptIds: engine.tokenizer.encode("kto bram zu ="), adapter, params: { ...GREEDY, maxTokens: 12 } }));

  it("serves 16 concurrent requests over 4 adapters correctly", async () => {
    const names = Object.keys(EXPECT);
    const outs = await Promise.all(Array.from({ length: 16 }, (_, i) => ask(names[i % 4]!, i)));
    outs.forEach((o, i) => expect(o.text).toBe(EXPECT[names[i % 4]!]));
    expect(engine.stats().kvBlocksUsed).toBe(0);
  });

  it("unload makes the name unknown (404); reload serves it again", async () => {
    await engine.unloadAdapter("caesar");
    expect(() => ask("caesar", 99)).toThrow(RequestError);
    await expect(engine.unloadAdapter("caesar")).rejects.toMatchObject({ status: 404 });
    await engine.loadAdapter("caesar", DEMO_ADAPTERS.caesar!);
    expect((await ask("caesar", 100)).text).toBe(EXPECT.caesar);
    await expect(engine.loadAdapter("caesar", DEMO_ADAPTERS.caesar!)).rejects.toMatchObject({ status: 400 });
  });
});
