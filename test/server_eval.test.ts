// A quantized checkpoint served by `inlaid serve` (a child process) and evaluated through
// the `openai` client (bench/serve_eval.ts) scores exactly what the in-process eval module
// scores on the same checkpoint and lines: every line's text is the same, so the
// quantization table's numbers hold through the server. 2-bit RTN keeps the scores far
// from 100% (a server that served other weights, another adapter or a re-tokenized
// prompt would differ on many lines) and is quick to make.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { reportJson, serveEval, type ServeEvalOptions } from "../bench/serve_eval.js";
import { readEvalJsonl } from "../src/eval/exact_match.js";
import { DEMO, DEMO_ADAPTERS, DEMO_TASKS } from "./helpers/demo.js";
import { quantizeDemo } from "./helpers/quant_demo.js";

const LINES = 24;

describe("exact match through the server equals the in-process eval", () => {
  let work: string;
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), "inlaid-serve-eval-"));
    quantizeDemo(join(work, "q2"), { bits: 2, groupSize: 64, sym: false, descAct: false });
  });
  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it(`2-bit RTN demo, ${LINES} lines per task, 32 requests in flight across the four adapters`, async () => {
    const opts: ServeEvalOptions = {
      modelDir: join(work, "q2"),
      adapters: DEMO_ADAPTERS,
      rows: Object.fromEntries(DEMO_TASKS.map((t) => [t, readEvalJsonl(join(DEMO, "data", t, "eval.jsonl"), LINES)])),
      device: "cpu",
      server: "child",
      concurrency: 32,
    };
    const report = await serveEval(opts);
    const json = JSON.stringify(reportJson(report, opts));
    expect(report.tasks.map((t) => t.task)).toEqual([...DEMO_TASKS]);
    for (const t of report.tasks) {
      expect(t.server.n, t.task).toBe(LINES);
      expect(t.server.rows.filter((r) => r.error !== undefined), t.task).toEqual([]);
      expect(t.server.exactMatch, `${t.task}: ${json}`).toBe(t.inProcess.exactMatch);
      expect(t.differing, `${t.task}: ${json}`).toEqual([]);
    }
    // Not a degenerate agreement: the adapters answer some lines right and 2 bits get others wrong.
    const exact = report.tasks.reduce((a, t) => a + t.inProcess.rows.filter((r) => r.exact).length, 0);
    expect(exact).toBeGreaterThan(0);
    expect(exact).toBeLessThan(LINES * DEMO_TASKS.length);
  });
});
