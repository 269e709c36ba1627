// POST /v1/chat/completions: messages rendered with the tokenizer's chat template, then
// generated like a completion; streamed as chat.completion.chunk deltas.

import { randomUUID } from "node:crypto";
import type { Context } from "hono";
import type { TokenLogprob } from "../engine/types.js";
import { readJson, validate } from "./body.js";
import { ApiError } from "./errors.js";
import {
  Generation,
  collectChoices,
  failureStatus,
  openAiFinishReason,
  withOutcome,
  type Choice,
  type ServerContext,
} from "./generation.js";
import { chatLogprobs } from "./logprobs.js";
import { resolveModel } from "./models.js";
import { chatPromptIds, checkPromptLength, resolveMaxTokens, samplingParams } from "./sampling.js";
import { ChatRequestSchema, refuseUnsupported } from "./schemas.js";
import { sseResponse } from "./sse.js";

export function chatCompletions(ctx: ServerContext) {
  const { engine, metrics } = ctx;
  const tok = engine.tokenizer;
  return async (c: Context): Promise<Response> => {
    const arrival = performance.now();
    const clientSignal = c.req.raw.signal;
    let model = "";
    try {
      const body = validate(ChatRequestSchema, await readJson(c));
      refuseUnsupported(body);
      const resolved = resolveModel(engine, body.model);
      model = resolved.model;
      if (!tok.hasChatTemplate) {
        throw new ApiError(
          400,
          `The model \`${engine.modelId}\` has no chat template (no chat_template in its tokenizer_config.json), so chat ` +
            "messages cannot be formatted; send a plain prompt to /v1/completions instead.",
          "no_chat_template",
          "messages",
        );
      }
      if (body.top_logprobs != null && body.logprobs !== true) {
        throw new ApiError(400, "top_logprobs requires logprobs to be true.", "invalid_value", "top_logprobs");
      }
      const logprobs = body.logprobs === true ? (body.top_logprobs ?? 0) : -1;
      const promptIds = chatPromptIds(tok.applyChatTemplate(body.messages), tok);
      checkPromptLength(promptIds, engine.maxModelLen, "messages");
      const maxParam = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
      const maxTokens = resolveMaxTokens(body.max_completion_tokens ?? body.max_tokens, "fit", promptIds.length, engine.maxModelLen, maxParam);
      const n = body.n ?? 1;
      const choices: Choice[] = Array.from({ length: n }, (_, i) => ({ index: i, promptIds, params: samplingParams(body, maxTokens, logprobs, i) }));
      const usage = (completionTokens: number) => ({
        prompt_tokens: promptIds.length, completion_tokens: completionTokens, total_tokens: promptIds.length + completionTokens,
      });
      const lpOf = (lps: readonly TokenLogprob[]) => (logprobs >= 0 ? chatLogprobs(lps, tok) : null);

      const id = `chatcmpl-${randomUUID().replaceAll("-", "")}`;
      const created = Math.floor(Date.now() / 1000);
      const gen = Generation.start(ctx, id, resolved.adapter, model, choices, clientSignal, arrival);

      if (body.stream) {
        const includeUsage = body.stream_options?.include_usage === true;
        const chunk = (choices: unknown[], usage: unknown = null) => ({
          id, object: "chat.completion.chunk", created, model, choices, ...(includeUsage && { usage }),
        });
        async function* chunks(): AsyncGenerator<unknown, void> {
          for (const ch of choices) {
            yield chunk([{ index: ch.index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]);
          }
          let completionTokens = 0;
          for await (const { index, out } of gen.events()) {
            if (out.finishReason === null && out.text === "" && (logprobs < 0 || out.tokenIds.length === 0)) continue;
            const finish = out.finishReason === null ? null : openAiFinishReason(out.finishReason);
            if (finish !== null) completionTokens += out.completionTokens;
            const delta = out.text === "" && finish !== null ? {} : { content: out.text };
            yield chunk([{ index, delta, logprobs: lpOf(out.logprobs), finish_reason: finish }]);
          }
          if (includeUsage) yield chunk([], usage(completionTokens));
        }
        const counted = withOutcome(chunks(), clientSignal, (status) => metrics.requestDone(model, status, arrival));
        return sseResponse(counted, () => gen.abort());
      }

      const results = await collectChoices(gen, choices.length);
      const response = {
        id, object: "chat.completion", created, model,
        choices: results.map((r, index) => ({
          index,
          message: { role: "assistant", content: r.text },
          logprobs: lpOf(r.logprobs),
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
