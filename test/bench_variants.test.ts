// bench/variants.ts: the variant syntax, the bench arguments it makes, and a failed run
// reported as an error line (the runs themselves need a GPU).
import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { benchArgs, parseVariant } from "../bench/variants.js";

describe("bench/variants", () => {
  it("parses NAME[:ENV=VAL,...][@CONFIG[/ADAPTERS]]", () => {
    expect(parseVariant("a8")).toEqual({ name: "a8", env: {}, config: "llama-2-7b", adapters: null });
    expect(parseVariant("a0@llama-2-7b/0")).toEqual({ name: "a0", env: {}, config: "llama-2-7b", adapters: 0 });
    expect(parseVariant("q8s:INLAID_LORA_SLOTS_SHRINK=1,INLAID_GRAPH_LAUNCH=host@llama-2-7b-gptq4")).toEqual({
      name: "q8s", env: { INLAID_LORA_SLOTS_SHRINK: "1", INLAID_GRAPH_LAUNCH: "host" }, config: "llama-2-7b-gptq4", adapters: null,
    });
  });

  it("refuses malformed variants with the reason", () => {
    expect(() => parseVariant("a b")).toThrow(/name/);
    expect(() => parseVariant("x:NOEQUALS")).toThrow(/ENV=VALUE/);
    expect(() => parseVariant("x:lower=1")).toThrow(/ENV=VALUE/);
    expect(() => parseVariant("x@llama-2-7b/-1")).toThrow(/adapter count/);
    expect(() => parseVariant("x@../etc")).toThrow(/configs folder/);
  });

  it("makes the bench arguments, the extra ones last", () => {
    expect(benchArgs(parseVariant("a0@qwen2.5-7b/0"), ["--batch", "16"])).toEqual(
      ["bench", "--config", "qwen2.5-7b", "--device", "cuda", "--json", "--adapters", "0", "--batch", "16"]);
    expect(benchArgs(parseVariant("a8"), [], "cpu")).toEqual(["bench", "--config", "llama-2-7b", "--device", "cpu", "--json"]);
  });

  it("reports a run that fails as an error line and goes on", () => {
    const out = execFileSync(process.execPath, ["--import", "tsx", "bench/variants.ts", "--device", "cpu", "bad@no-such-config", "--", "--gen", "2"], { encoding: "utf8" });
    const line = JSON.parse(out.trim().split("\n").pop()!) as { variant: string; error?: string };
    expect(line.variant).toBe("bad");
    expect(line.error).toMatch(/no-such-config|config/);
  });
});
