// Log-probabilities in the two OpenAI shapes: the legacy completions one (parallel
// arrays plus a text->logprob map per token) and the chat one (an object per token).

import type { TokenLogprob } from "../engine/types.js";
import type { TextTokenizer } from "../model/tokenizer.js";

export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: number[];
  /** Per token, its top alternatives by text; the sampled token is always included (as vLLM does). */
  top_logprobs: Record<string, number>[];
  /** Character offset of each token in the choice's text (echoed prompt included). */
  text_offset: number[];
}

/**
 * Completions-shape logprobs of `lps`, whose first token starts at character `offset`;
 * returns the offset after the last token too, for the next streamed chunk.
 */
export function completionLogprobs(lps: readonly TokenLogprob[], tok: TextTokenizer, offset: number): { logprobs: CompletionLogprobs; offset: number } {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  for (const lp of lps) {
    const text = tok.tokenText(lp.tokenId);
    const top: Record<string, number> = {};
    for (const t of lp.top) {
      const key = tok.tokenText(t.tokenId);
      if (!(key in top)) top[key] = t.logprob;
    }
    if (!(text in top)) top[text] = lp.logprob;
    out.tokens.push(text);
    out.token_logprobs.push(lp.logprob);
    out.top_logprobs.push(top);
    out.text_offset.push(offset);
    offset += text.length;
  }
  return { logprobs: out, offset };
}

export interface ChatTokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

function bytesOf(text: string): number[] {
  return [...Buffer.from(text, "utf8")];
}

/** Chat-shape logprobs (`{content: [...]}`) of `lps`. */
export function chatLogprobs(lps: readonly TokenLogprob[], tok: TextTokenizer): { content: ChatTokenLogprob[] } {
  return {
    content: lps.map((lp) => {
      const token = tok.tokenText(lp.tokenId);
      return {
        token,
        logprob: lp.logprob,
        bytes: bytesOf(token),
        top_logprobs: lp.top.map((t) => {
          const text = tok.tokenText(t.tokenId);
          return { token: text, logprob: t.logprob, bytes: bytesOf(text) };
        }),
      };
    }),
  };
}
