// POST /v1/completions: the legacy OpenAI completions API (plus vLLM's top_k and
// ignore_eos). One choice per prompt and n; streamed as text_completion chunks.

import { randomUUID } from "node:crypto";
import type { Context } from "hono";
import { readJson, validate } from "./body.js";
import { ApiError } from "./errors.js";
import {
  Generation,
  MAX_CHOICES,
  collectChoices,
  failureStatus,
  openAiFinishReason,
  withOutcome,
  type Choice,
  type ServerContext,
} from "./generation.js";
import { completionLogprobs } from "./logprobs.js";
import { resolveModel } from "./models.js";
import { checkPromptLength, completionPrompts, resolveMaxTokens, samplingParams } from "./sampling.js";
import { CompletionRequestSchema, refuseUnsupported } from "./schemas.js";
import { sseResponse } from "./sse.js";

/** OpenAI's default when max_tokens is absent (null asks for all the context window leaves). */
const DEFAULT_MAX_TOKENS = 16;

export function completions(ctx: ServerContext) {
  const { engine, metrics } = ctx;
  const tok = engine.tokenizer;
  return async (c: Context): Promise<Response> => {
    const arrival = performance.now();
    const clientSignal = c.req.raw.signal;
    let model = "";
    try {
      const body = validate(CompletionRequestSchema, await readJson(c));
      refuseUnsupported(body);
      const resolved = resolveModel(engine, body.model);
      model = resolved.model;
      const logprobs = body.logprobs ?? -1;
      if (body.echo && logprobs >= 0) {
        throw new ApiError(400, "echo with logprobs is not supported: this server does not compute prompt log-probabilities.", "unsupported_parameter", "echo");
      }
      const prompts = completionPrompts(body.prompt, tok);
      const n = body.n ?? 1;
      if (prompts.length * n > MAX_CHOICES) {
        throw new ApiError(400, `${prompts.length} prompt(s) x n=${n} is more than ${MAX_CHOICES} choices; split the request.`, "invalid_value", "n");
      }
      const choices: Choice[] = [];
      const echoText: string[] = [];
      prompts.forEach((p, pi) => {
        checkPromptLength(p.ids, engine.maxModelLen, "prompt");
        const maxTokens = resolveMaxTokens(body.max_tokens, DEFAULT_MAX_TOKENS, p.ids.length, engine.maxModelLen, "max_tokens");
        for (let i = 0; i < n; i++) {
          echoText.push(body.echo ? p.text : "");
          choices.push({ index: pi * n + i, promptIds: p.ids, params: samplingParams(body, maxTokens, logprobs, i) });
        }
      });
      const promptTokens = prompts.reduce((s, p) => s + p.ids.length, 0);
      const usage = (completionTokens: number) => ({
        prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens,
      });

      const id = `cmpl-${randomUUID().replaceAll("-", "")}`;
      const created = Math.floor(Date.now() / 1000);
      const gen = Generation.start(ctx, id, resolved.adapter, model, choices, clientSignal, arrival);

      if (body.stream) {
        const includeUsage = body.stream_options?.include_usage === true;
        const chunk = (choices: unknown[], usage: unknown = null) => ({
          id, object: "text_completion", created, model, choices, ...(includeUsage && { usage }),
        });
        async function* chunks(): AsyncGenerator<unknown, void> {
          const offsets = echoText.map((t) => t.length);
          if (body.echo) {
            for (const [index, text] of echoText.entries()) yield chunk([{ index, text, logprobs: null, finish_reason: null }]);
          }
          let completionTokens = 0;
          for await (const { index, out } of gen.events()) {
            // Text held back (UTF-8, possible stop string) and no logprobs to show: nothing to send yet.
            if (out.finishReason === null && out.text === "" && (logprobs < 0 || out.tokenIds.length === 0)) continue;
            const finish = out.finishReason === null ? null : openAiFinishReason(out.finishReason);
            let lp = null;
            if (logprobs >= 0) {
              const r = completionLogprobs(out.logprobs, tok, offsets[index]!);
              offsets[index] = r.offset;
              lp = r.logprobs;
            }
            if (finish !== null) completionTokens += out.completionTokens;
            yield chunk([{ index, text: out.text, logprobs: lp, finish_reason: finish }]);
          }
          if (includeUsage) yield chunk([], usage(completionTokens));
        }
        const counted = withOutcome(chunks(), clientSignal, (status) => metrics.requestDone(model, status, arrival));
        return sseResponse(counted, () => gen.abort());
      }

      const results = await collectChoices(gen, choices.length);
      const response = {
        id, object: "text_completion", created, model,
        choices: results.map((r, index) => ({
          index,
          text: echoText[index]! + r.text,
          logprobs: logprobs >= 0 ? completionLogprobs(r.logprobs, tok, echoText[index]!.length).logprobs : null,
          finish_reason: openAiFinishReason(r.finishReason),
        })),
        usage: usage(results.reduce((s, r) => s + r.completionTokens, 0)),
      };
      metrics.requestDone(model, 200, arrival);
      return c.json(response);
    } catch (err) {
      metrics.requestDone(model, failureStatus(err, clientSignal), arrival);
      throw err;
    }
  };
}
