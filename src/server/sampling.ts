// From a validated request body to engine inputs: tokenized prompts, max_tokens resolved
// against the context window, and one SamplingParams per choice. Everything here throws
// ApiError before any engine request exists, so a refused request never holds a sequence.

import type { SamplingParams } from "../engine/types.js";
import type { TextTokenizer } from "../model/tokenizer.js";
import { ApiError } from "./errors.js";
import type { CompletionRequest } from "./schemas.js";

export interface PreparedPrompt {
  readonly ids: readonly number[];
  /** The prompt as text (for echo): the string sent, or the decoded token ids. */
  readonly text: string;
}

/** The fields of both request kinds that SamplingParams is built from. */
export interface SamplingFields {
  readonly temperature?: number | null;
  readonly top_p?: number | null;
  readonly top_k?: number | null;
  readonly seed?: number | null;
  readonly stop?: string | readonly string[] | null;
  readonly ignore_eos?: boolean | null;
}

/** The prompts of a /v1/completions request: one per string or token-id list. */
export function completionPrompts(prompt: CompletionRequest["prompt"], tok: TextTokenizer): PreparedPrompt[] {
  const empty = (): never => {
    throw new ApiError(400, "prompt must not be empty.", "invalid_value", "prompt");
  };
  if (typeof prompt === "string") return [{ ids: tok.encode(prompt, true), text: prompt }];
  if (prompt.length === 0) empty();
  const first = prompt[0];
  if (typeof first === "string") return (prompt as string[]).map((p) => ({ ids: tok.encode(p, true), text: p }));
  if (typeof first === "number") {
    const ids = prompt as number[];
    return [{ ids, text: tok.decode(ids, false) }];
  }
  return (prompt as number[][]).map((ids) => {
    if (ids.length === 0) empty();
    return { ids, text: tok.decode(ids, false) };
  });
}

/**
 * Token ids of a rendered chat. Templates for BOS models usually write `{{ bos_token }}`
 * themselves, and HF/vLLM then encode without special tokens; a template that does not
 * would leave the model without the BOS it was trained with. Rule: encode without
 * special tokens (never an EOS from add_eos_token) and prepend BOS only when the
 * tokenizer adds one to plain text and the rendered chat does not already start with it.
 */
export function chatPromptIds(rendered: string, tok: TextTokenizer): number[] {
  const ids = tok.encode(rendered, false);
  const bos = tok.bosTokenId;
  if (bos !== null && ids[0] !== bos && tok.encode("", true)[0] === bos) ids.unshift(bos);
  return ids;
}

/** A prompt that leaves no room for even one new token is refused (413). */
export function checkPromptLength(ids: readonly number[], maxModelLen: number, param: string): void {
  if (ids.length >= maxModelLen) {
    throw new ApiError(
      413,
      `This model's maximum context length is ${maxModelLen} tokens, but the prompt has ${ids.length} tokens ` +
        `(at most ${maxModelLen - 1} leave room for one new token); shorten the prompt.`,
      "context_length_exceeded",
      param,
    );
  }
}

/**
 * max_tokens for one prompt. `requested` null/undefined uses `fallback`: a number (the
 * completions default, 16, shortened to what fits) or "fit" (everything the context
 * window leaves). An explicit value must be >= 1 and fit beside the prompt.
 */
export function resolveMaxTokens(
  requested: number | null | undefined,
  fallback: number | "fit",
  promptLen: number,
  maxModelLen: number,
  param: string,
): number {
  const room = maxModelLen - promptLen;
  if (requested === null || requested === undefined) return fallback === "fit" ? room : Math.min(fallback, room);
  if (requested < 1) throw new ApiError(400, `${param} must be at least 1, got ${requested}.`, "invalid_value", param);
  if (requested > room) {
    throw new ApiError(
      400,
      `${param} is ${requested}, but this model's maximum context length is ${maxModelLen} tokens and the prompt has ` +
        `${promptLen}, so ${param} can be at most ${room}.`,
      "context_length_exceeded",
      param,
    );
  }
  return requested;
}

/**
 * SamplingParams for choice `choice` of a prompt. With a seed, choice i samples with
 * seed + i, so n > 1 gives n different (and reproducible) answers.
 */
export function samplingParams(f: SamplingFields, maxTokens: number, logprobs: number, choice: number): SamplingParams {
  const stop = f.stop == null ? [] : typeof f.stop === "string" ? [f.stop] : [...f.stop];
  const topK = f.top_k ?? 0;
  return {
    maxTokens,
    temperature: f.temperature ?? 1,
    topP: f.top_p ?? 1,
    topK: topK < 0 ? 0 : topK,
    ...(f.seed != null && { seed: f.seed + choice }),
    // An empty stop string would end every output before it starts: ignore it.
    stop: stop.filter((s) => s !== ""),
    ignoreEos: f.ignore_eos ?? false,
    logprobs,
  };
}
