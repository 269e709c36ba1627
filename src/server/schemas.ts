// Request bodies, as zod schemas. Types and ranges are checked here; limits that depend
// on the model or the prompt (max_tokens against the context window) are checked once
// the prompt is tokenized (sampling.ts). Unknown fields are ignored, as OpenAI's
// clients send fields a server may not know; fields we know but cannot honour are
// refused in `refuseUnsupported`.

import { z } from "zod";
import { ApiError } from "./errors.js";

const tokenId = z.number().int().min(0);

export const PromptSchema = z.union(
  [z.string(), z.array(z.string()), z.array(tokenId), z.array(z.array(tokenId))],
  { error: "expected a string, an array of strings, an array of token ids, or an array of token-id arrays" },
);

const StopSchema = z.union([z.string(), z.array(z.string())], { error: "expected a string or an array of strings" }).nullish();

/** Sampling fields shared by both generation endpoints. */
const sampling = {
  model: z.string().nullish(),
  temperature: z.number().min(0).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  // vLLM extension: -1 or 0 turns it off.
  top_k: z.number().int().min(-1).nullish(),
  seed: z.number().int().nullish(),
  stop: StopSchema,
  n: z.number().int().min(1).max(128).nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
  user: z.string().nullish(),
  // vLLM extension.
  ignore_eos: z.boolean().nullish(),
  // Positivity and the context limit are checked after tokenizing, with a message naming the limit.
  max_tokens: z.number().int().nullish(),
  presence_penalty: z.number().nullish(),
  frequency_penalty: z.number().nullish(),
  logit_bias: z.record(z.string(), z.number()).nullish(),
};

export const CompletionRequestSchema = z.object({
  prompt: PromptSchema,
  ...sampling,
  logprobs: z.number().int().min(0).max(20).nullish(),
  echo: z.boolean().nullish(),
  suffix: z.string().nullish(),
  best_of: z.number().int().min(1).nullish(),
});
export type CompletionRequest = z.infer<typeof CompletionRequestSchema>;

const ContentPartSchema = z.looseObject({ type: z.string(), text: z.string().optional() });

// Extra message fields (name, tool_calls...) pass through to the chat template.
const MessageSchema = z.looseObject({
  role: z.string(),
  content: z.union([z.string(), z.array(ContentPartSchema)], {
    error: 'expected a string or an array of {"type": "text", "text": ...} parts',
  }).nullish(),
});

export const ChatRequestSchema = z.object({
  messages: z.array(MessageSchema).min(1),
  ...sampling,
  max_completion_tokens: z.number().int().nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
  tools: z.array(z.unknown()).nullish(),
  response_format: z.looseObject({ type: z.string() }).nullish(),
});
export type ChatRequest = z.infer<typeof ChatRequestSchema>;

export const LoadAdapterSchema = z.object({ lora_name: z.string().min(1), lora_path: z.string().min(1) });
export const UnloadAdapterSchema = z.object({ lora_name: z.string().min(1) });

type Sampling = z.infer<z.ZodObject<typeof sampling>>;

/** Known OpenAI fields this server cannot honour: refused unless they hold their no-op value. */
export function refuseUnsupported(body: Sampling & { suffix?: string | null; best_of?: number | null; tools?: unknown[] | null; response_format?: { type: string } | null }): void {
  const refuse = (param: string, what: string): never => {
    throw new ApiError(400, `${param} is not supported by this server (${what})`, "unsupported_parameter", param);
  };
  if (body.presence_penalty) refuse("presence_penalty", "leave it unset or 0");
  if (body.frequency_penalty) refuse("frequency_penalty", "leave it unset or 0");
  if (body.logit_bias && Object.keys(body.logit_bias).length > 0) refuse("logit_bias", "leave it unset or empty");
  if (body.suffix) refuse("suffix", "leave it unset or empty");
  if (body.best_of != null && body.best_of !== (body.n ?? 1)) refuse("best_of", "leave it unset or equal to n");
  if (body.tools && body.tools.length > 0) refuse("tools", "tool calling is not implemented");
  if (body.response_format && body.response_format.type !== "text") refuse("response_format", 'only {"type": "text"}');
  if (body.stream_options != null && body.stream !== true) {
    throw new ApiError(400, "stream_options can only be set when stream is true", "invalid_value", "stream_options");
  }
}
