import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { TextTokenizer } from "../model/tokenizer.js";
import { RequestError, type GenerateOutput, type GenerateRequest, type ServingEngine } from "../engine/types.js";
import { EvalDataError, readEvalJsonl, runExactMatch } from "./exact_match.js";

/** Answers each prompt with its words reversed, one word per increment, after every request has been submitted. */
function fakeEngine(): ServingEngine & { submitted: GenerateRequest[]; maxConcurrent: number } {
  const words = new Map<number, string>();
  const tokenizer = {
    encode: (text: string) => text.split(" ").map((w) => {
      const id = words.size + 1;
      words.set(id, w);
      return id;
    }),
  } as unknown as TextTokenizer;
  let live = 0;
  const engine = {
    modelId: "fake", maxModelLen: 64, tokenizer, submitted: [] as GenerateRequest[], maxConcurrent: 0,
    generate(req: GenerateRequest): AsyncIterable<GenerateOutput> {
      if (req.promptIds.length > 6) throw new RequestError("prompt too long", 413, "context_length_exceeded");
      engine.submitted.push(req);
      live++;
      engine.maxConcurrent = Math.max(engine.maxConcurrent, live);
      const prompt = req.promptIds.map((id) => words.get(id)!).filter((w) => w !== "=");
      const answer = prompt.reverse().map((w) => ` ${w}`);
      return (async function* () {
        await new Promise((r) => setTimeout(r, 5));
        for (let i = 0; i < answer.length; i++) {
          const last = i === answer.length - 1;
          if (last) live--;
          yield { text: answer[i]!, tokenIds: [i], logprobs: [], finishReason: last ? "stop" : null,
            promptTokens: req.promptIds.length, completionTokens: i + 1 } satisfies GenerateOutput;
        }
      })();
    },
    listAdapters: () => [], loadAdapter: async () => ({ name: "", path: "", rank: 0 }), unloadAdapter: async () => {},
    stats: () => ({ running: new Map(), waiting: new Map(), kvBlocksUsed: 0, kvBlocksTotal: 0, steps: 0, decodeSteps: 0, decodeHostUs: 0, decodeIdleSteps: 0, decodeIdleUs: 0 }),
    close: async () => {},
  };
  return engine;
}

describe("runExactMatch", () => {
  it("submits every row at once, greedy, and scores exact and trimmed matches", async () => {
    const engine = fakeEngine();
    const rows = [
      { prompt: "a b c =", completion: " c b a" },
      { prompt: "x y =", completion: " y x " }, // trailing space: trimmed match only
      { prompt: "p q =", completion: " p q" }, // wrong
      { prompt: "1 2 3 4 5 6 7 =", completion: " 7" }, // too long: an error row, a miss
    ];
    const progress: number[] = [];
    const r = await runExactMatch(engine, "rev", rows, { maxTokens: 8, onProgress: (d, n) => progress.push(d / n) });
    expect(engine.submitted).toHaveLength(3);
    expect(engine.maxConcurrent).toBe(3);
    for (const req of engine.submitted) {
      expect(req.adapter).toBe("rev");
      expect(req.params).toMatchObject({ maxTokens: 8, temperature: 0, topK: 0, topP: 1, stop: [], ignoreEos: false });
    }
    expect(r.n).toBe(4);
    expect(r.exactMatch).toBe(0.25);
    expect(r.exactMatchTrimmed).toBe(0.5);
    expect(r.rows.map((x) => x.got)).toEqual([" c b a", " y x", " q p", ""]);
    expect(r.rows[3]!.error).toMatch(/too long/);
    expect(r.completionTokens).toBe(7);
    expect(progress).toEqual([0.25, 0.5, 0.75, 1]);
  });
});

describe("readEvalJsonl", () => {
  const dir = mkdtempSync(join(tmpdir(), "inlaid-eval-"));
  const file = (name: string, text: string): string => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };

  it("reads rows, skips blank lines and honours the limit", () => {
    const p = file("ok.jsonl", '{"prompt":"a =","completion":" a"}\n\n{"prompt":"b =","completion":" b"}\n{"prompt":"c =","completion":" c"}\n');
    expect(readEvalJsonl(p)).toHaveLength(3);
    expect(readEvalJsonl(p, 2)).toEqual([{ prompt: "a =", completion: " a" }, { prompt: "b =", completion: " b" }]);
  });

  it("names the line of bad JSON or a bad shape", () => {
    const bad = file("bad.jsonl", '{"prompt":"a","completion":"b"}\n{"prompt": oops}\n');
    expect(() => readEvalJsonl(bad)).toThrow(/bad\.jsonl:2: not valid JSON/);
    const shape = file("shape.jsonl", '{"prompt":"a","completion":"b"}\n\n{"prompt":"a"}\n');
    expect(() => readEvalJsonl(shape)).toThrow(/shape\.jsonl:3: expected \{"prompt": string, "completion": string\}/);
    try {
      readEvalJsonl(shape);
    } catch (err) {
      expect(err).toBeInstanceOf(EvalDataError);
      expect((err as EvalDataError).line).toBe(3);
    }
  });

  it("refuses a missing or empty file", () => {
    expect(() => readEvalJsonl(join(dir, "nope.jsonl"))).toThrow(/no such file/);
    expect(() => readEvalJsonl(file("empty.jsonl", "\n"))).toThrow(/no rows/);
  });
});
