// Exact-match evaluation of one adapter (or the base) on {prompt, completion} rows:
// every prompt is greedy-decoded, all submitted at once so the engine batches them;
// a row matches when the generated text (EOS ends it) equals the completion exactly.
// Used by `inlaid eval` and by the quantization quality harness; bench/serve_eval.ts
// sends the same requests (evalSamplingParams) through the HTTP server and scores the
// answers with the same rule (scoreRow, summarize).

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import type { FinishReason, GenerateOutput, SamplingParams, ServingEngine } from "../engine/types.js";

export interface EvalRow {
  readonly prompt: string;
  readonly completion: string;
}

export interface EvalRowResult {
  readonly prompt: string;
  readonly expected: string;
  readonly got: string;
  readonly exact: boolean;
  /** Equal after trimming whitespace at both ends. */
  readonly trimmed: boolean;
  readonly finishReason: FinishReason | null;
  readonly promptTokens: number;
  readonly completionTokens: number;
  /** Why the request could not run (prompt too long...); such rows count as misses. */
  readonly error?: string;
}

export interface EvalResult {
  readonly adapter: string | null;
  readonly n: number;
  /** Fraction of rows whose output equals the completion exactly. */
  readonly exactMatch: number;
  /** Fraction equal after trimming whitespace. */
  readonly exactMatchTrimmed: number;
  /** Wall time from the first submission to the last finish. */
  readonly seconds: number;
  /** Generated tokens per second of wall time. */
  readonly tokensPerS: number;
  readonly promptTokens: number;
  readonly completionTokens: number;
  /** One per row, in input order. */
  readonly rows: readonly EvalRowResult[];
}

/** The generation budget of `inlaid eval` and the quality harness. */
export const EVAL_MAX_TOKENS = 48;

export interface ExactMatchOptions {
  /** Generation budget per row. */
  readonly maxTokens: number;
  /** Called after each row finishes. */
  readonly onProgress?: (done: number, total: number) => void;
  /** Aborts every row still running. */
  readonly signal?: AbortSignal;
}

/** Raised for unreadable eval data; names the file and line. */
export class EvalDataError extends Error {
  constructor(
    message: string,
    readonly path: string,
    readonly line: number | null,
  ) {
    super(message);
    this.name = "EvalDataError";
  }
}

/** Reads {prompt, completion} rows from a jsonl file (blank lines skipped); `limit` keeps the first N. */
export function readEvalJsonl(path: string, limit?: number): EvalRow[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new EvalDataError(code === "ENOENT" ? `${path}: no such file` : `${path}: cannot read (${code ?? String(err)})`, path, null);
  }
  const rows: EvalRow[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (limit !== undefined && rows.length >= limit) break;
    const line = lines[i]!.trim();
    if (!line) continue;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (err) {
      throw new EvalDataError(`${path}:${i + 1}: not valid JSON (${(err as Error).message})`, path, i + 1);
    }
    const v = value as { prompt?: unknown; completion?: unknown } | null;
    if (typeof v !== "object" || v === null || Array.isArray(v) || typeof v.prompt !== "string" || typeof v.completion !== "string") {
      throw new EvalDataError(`${path}:${i + 1}: expected {"prompt": string, "completion": string}`, path, i + 1);
    }
    rows.push({ prompt: v.prompt, completion: v.completion });
  }
  if (rows.length === 0) throw new EvalDataError(`${path}: no rows`, path, null);
  return rows;
}

/** What every eval row is generated with: greedy, no stop strings (EOS ends it), `maxTokens` at most. */
export function evalSamplingParams(maxTokens: number): SamplingParams {
  return { maxTokens, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: false, logprobs: -1 };
}

/** How one row's generation ended, as far as scoring needs. */
export interface RowOutcome {
  readonly got: string;
  /** null when the request never ran (then `error` says why). */
  readonly finishReason: FinishReason | null;
  readonly promptTokens: number;
  readonly completionTokens: number;
  readonly error?: string;
}

/** The scoring rule: a row matches when it finished normally and its text equals the completion. */
export function scoreRow(row: EvalRow, outcome: RowOutcome): EvalRowResult {
  const ok = outcome.error === undefined && outcome.finishReason !== null && outcome.finishReason !== "error" && outcome.finishReason !== "abort";
  return {
    prompt: row.prompt,
    expected: row.completion,
    got: outcome.got,
    exact: ok && outcome.got === row.completion,
    trimmed: ok && outcome.got.trim() === row.completion.trim(),
    finishReason: outcome.finishReason,
    promptTokens: outcome.promptTokens,
    completionTokens: outcome.completionTokens,
    ...(outcome.error !== undefined && { error: outcome.error }),
  };
}

/** Totals over scored rows (in input order); `seconds` is the wall time they took. */
export function summarize(adapter: string | null, results: readonly EvalRowResult[], seconds: number): EvalResult {
  const n = results.length;
  const completionTokens = results.reduce((a, r) => a + r.completionTokens, 0);
  return {
    adapter,
    n,
    exactMatch: n ? results.filter((r) => r.exact).length / n : 0,
    exactMatchTrimmed: n ? results.filter((r) => r.trimmed).length / n : 0,
    seconds,
    tokensPerS: seconds > 0 ? completionTokens / seconds : 0,
    promptTokens: results.reduce((a, r) => a + r.promptTokens, 0),
    completionTokens,
    rows: results,
  };
}

export async function runExactMatch(
  engine: ServingEngine,
  adapter: string | null,
  rows: readonly EvalRow[],
  opts: ExactMatchOptions,
): Promise<EvalResult> {
  const params = evalSamplingParams(opts.maxTokens);
  const tag = randomUUID().slice(0, 8);
  const t0 = performance.now();
  let done = 0;
  const finishRow = (r: EvalRowResult): EvalRowResult => {
    done++;
    opts.onProgress?.(done, rows.length);
    return r;
  };

  // Submit everything before consuming anything so the engine batches the whole set.
  type Started = { promptIds: number[] } & ({ stream: AsyncIterable<GenerateOutput> } | { error: string });
  const started = rows.map((row, i): Started => {
    const promptIds = engine.tokenizer.encode(row.prompt);
    try {
      return { promptIds, stream: engine.generate({ id: `eval-${tag}-${i}`, promptIds, adapter, params }, opts.signal) };
    } catch (err) {
      return { promptIds, error: err instanceof Error ? err.message : String(err) };
    }
  });

  const results = await Promise.all(
    started.map(async (s, i): Promise<EvalRowResult> => {
      const row = rows[i]!;
      if (!("stream" in s)) {
        return finishRow(scoreRow(row, { got: "", finishReason: null, promptTokens: s.promptIds.length, completionTokens: 0, error: s.error }));
      }
      let got = "";
      let last: GenerateOutput | null = null;
      for await (const out of s.stream) {
        got += out.text;
        last = out;
      }
      return finishRow(scoreRow(row, {
        got,
        finishReason: last?.finishReason ?? null,
        promptTokens: last?.promptTokens ?? s.promptIds.length,
        completionTokens: last?.completionTokens ?? 0,
      }));
    }),
  );

  return summarize(adapter, results, (performance.now() - t0) / 1000);
}

/** The rows that did not match exactly, in input order. */
export function failures(result: EvalResult): EvalRowResult[] {
  return result.rows.filter((r) => !r.exact);
}
