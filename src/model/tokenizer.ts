// Text <-> token ids for a HF "fast" tokenizer folder, and chat-template rendering.
//
// Wraps @huggingface/tokenizers (tokenizer.json) and @huggingface/jinja (chat templates).
// Everything the rest of the system needs from a tokenizer goes through this class, so
// the library's quirks (decode([]) throws, clean-up of spaces on by default, ids past the
// vocabulary) are handled once, here.

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";

/**
 * The part of @huggingface/tokenizers' Tokenizer used here. Its .d.ts files use
 * extensionless relative imports, which NodeNext resolution cannot follow (the class
 * types as `any`), so the surface is written down and checked here instead.
 */
interface HfTokenizer {
  encode(text: string, options: { add_special_tokens: boolean }): { ids: number[] };
  decode(ids: number[], options: { skip_special_tokens: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_added_tokens_decoder(): Map<number, { readonly content: string; readonly special: boolean }>;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
}

/** One part of an OpenAI message whose `content` is an array. Only text parts are supported. */
export interface ChatContentPart {
  readonly type: string;
  readonly text?: string;
}

/**
 * A chat message as the OpenAI API sends it. `content` may be a string, an array of
 * `{type: "text", text}` parts (joined with "\n", as vLLM does), or null (an assistant
 * turn that only made tool calls; rendered as ""). Other fields of the object (name,
 * tool_calls...) are passed to the template unchanged.
 */
export interface ChatMessage {
  readonly role: string;
  readonly content?: string | readonly ChatContentPart[] | null;
}

export type ChatTemplateErrorCode = "no_chat_template" | "unsupported_content" | "template_error";

/** A chat request this tokenizer cannot render. Always the client's problem: the server answers 400. */
export class ChatTemplateError extends Error {
  constructor(message: string, readonly code: ChatTemplateErrorCode) {
    super(message);
    this.name = "ChatTemplateError";
  }
}

/** A tokenizer folder that cannot be loaded (missing or malformed files). */
export class TokenizerLoadError extends Error {
  constructor(message: string, readonly path: string) {
    super(message);
    this.name = "TokenizerLoadError";
  }
}

/** tokenizer_config.json fields we read (the file holds many more). */
interface TokenizerConfig {
  readonly bos_token?: unknown;
  readonly eos_token?: unknown;
  readonly pad_token?: unknown;
  readonly unk_token?: unknown;
  readonly add_bos_token?: unknown;
  readonly add_eos_token?: unknown;
  readonly clean_up_tokenization_spaces?: unknown;
  readonly chat_template?: unknown;
  readonly [field: string]: unknown;
}

/** The token a text stands for; tokenizer_config writes special tokens as a string or as an AddedToken object. */
function tokenContent(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v !== null && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return null;
}

function readJson(path: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new TokenizerLoadError(`cannot read ${path}: ${(e as Error).message}`, path);
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new TokenizerLoadError(`${path} is not a JSON object`, path);
  }
  return parsed as Record<string, unknown>;
}

function idList(v: unknown): number[] {
  if (Number.isInteger(v)) return [v as number];
  if (Array.isArray(v)) return v.filter((x): x is number => Number.isInteger(x));
  return [];
}

/**
 * The chat template of a tokenizer folder, in transformers' order of precedence:
 * chat_template.jinja (transformers v5 saves it there), then chat_template.json
 * (processor folders), then tokenizer_config.json `chat_template` — a string, or a list
 * of {name, template} of which "default" is used.
 */
function findChatTemplate(dir: string, cfg: TokenizerConfig): string | null {
  const jinjaPath = join(dir, "chat_template.jinja");
  if (existsSync(jinjaPath)) return readFileSync(jinjaPath, "utf8");
  const jsonPath = join(dir, "chat_template.json");
  if (existsSync(jsonPath)) {
    const t = readJson(jsonPath)["chat_template"];
    if (typeof t === "string") return t;
  }
  const t = cfg.chat_template;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    const named = t.filter(
      (x): x is { name: string; template: string } =>
        x !== null && typeof x === "object" && typeof x.name === "string" && typeof x.template === "string",
    );
    const chosen = named.find((x) => x.name === "default") ?? (named.length === 1 ? named[0] : undefined);
    if (chosen !== undefined) return chosen.template;
    if (named.length > 0) {
      throw new TokenizerLoadError(
        `tokenizer_config.json has several chat templates (${named.map((x) => x.name).join(", ")}) and none named "default"`,
        join(dir, "tokenizer_config.json"),
      );
    }
  }
  return null;
}

export class TextTokenizer {
  /** Ids of tokens marked special (BOS, EOS, PAD, chat markers...): skipped when decoding for output. */
  readonly specialIds: ReadonlySet<number>;
  /** Highest token id the tokenizer knows + 1 (the model's embedding may have more rows). */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  /** Every id that ends generation: tokenizer_config eos_token plus generation_config.json eos_token_id. */
  readonly eosTokenIds: readonly number[];
  readonly hasChatTemplate: boolean;

  readonly #tok: HfTokenizer;
  readonly #cfg: TokenizerConfig;
  readonly #bosText: string | null;
  readonly #eosText: string | null;
  readonly #template: Template | null;
  /** A plain token decoded in front of another to see that token's text in context (see tokenText). */
  readonly #anchorId: number | null;
  readonly #anchorText: string;
  readonly #tokenTextCache = new Map<number, string>();

  private constructor(
    tokenizerJson: Record<string, unknown>,
    cfg: TokenizerConfig,
    chatTemplate: string | null,
    generationEosIds: readonly number[],
  ) {
    this.#cfg = cfg;
    // The library cleans up spaces (" ." -> ".") unless told not to; transformers v5 does
    // not, and streamed text must not depend on what comes after it. Follow the file, else off.
    this.#tok = new (Tokenizer as new (json: object, config: object) => HfTokenizer)(tokenizerJson, {
      ...cfg,
      clean_up_tokenization_spaces: cfg.clean_up_tokenization_spaces === true,
    });

    const special = new Set<number>();
    let maxId = -1;
    for (const [id, t] of this.#tok.get_added_tokens_decoder()) {
      if (t.special) special.add(id);
      maxId = Math.max(maxId, id);
    }
    for (const id of this.#tok.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.specialIds = special;
    this.vocabSize = maxId + 1;

    this.#bosText = tokenContent(cfg.bos_token);
    this.#eosText = tokenContent(cfg.eos_token);
    this.bosTokenId = this.#bosText === null ? null : (this.#tok.token_to_id(this.#bosText) ?? null);
    const eos = new Set<number>();
    const cfgEos = this.#eosText === null ? undefined : this.#tok.token_to_id(this.#eosText);
    if (cfgEos !== undefined) eos.add(cfgEos);
    for (const id of generationEosIds) eos.add(id);
    this.eosTokenIds = [...eos];

    this.tokenBytes = byteLevelTable(tokenizerJson, this.#tok, special, this.vocabSize);
    this.tokenAscii = this.tokenBytes?.map((b) => (b && b.every((x) => x < 0x80) ? String.fromCharCode(...b) : null)) ?? null;

    this.hasChatTemplate = chatTemplate !== null;
    try {
      this.#template = chatTemplate === null ? null : new Template(chatTemplate);
    } catch (e) {
      throw new TokenizerLoadError(`the chat template does not parse: ${(e as Error).message}`, "chat_template");
    }

    // Decoders may treat the first token of a text specially (SentencePiece's Metaspace
    // drops its leading space). Decoding a token behind a plain one gives its text as it
    // appears mid-sentence, which is what logprobs should show.
    const anchor = this.#tok.token_to_id("a");
    this.#anchorId = anchor !== undefined && !special.has(anchor) ? anchor : null;
    this.#anchorText = this.#anchorId === null ? "" : this.decode([this.#anchorId], false);
  }

  /**
   * Loads dir/tokenizer.json, with dir/tokenizer_config.json (optional), the chat template
   * (see findChatTemplate) and dir/generation_config.json's eos_token_id (optional).
   */
  /**
   * For byte-level BPE tokenizers (decoder "ByteLevel": GPT-2, Llama-3, Qwen2 and the
   * demo): the UTF-8 bytes each id stands for, null for special tokens and unknown ids.
   * decode(ids, skipSpecial) is then exactly the lossy UTF-8 decoding of the concatenated
   * bytes, which lets the detokenizer stream in O(1) per token. Null for other tokenizers.
   */
  readonly tokenBytes: readonly (Uint8Array | null)[] | null;
  /** With tokenBytes: each id's text when its bytes are all ASCII (else null), so the
   * detokenizer can skip the UTF-8 decoder for them. */
  readonly tokenAscii: readonly (string | null)[] | null;

  static load(dir: string): TextTokenizer {
    const tokPath = join(dir, "tokenizer.json");
    if (!existsSync(tokPath)) {
      throw new TokenizerLoadError(
        `${dir} has no tokenizer.json; only fast (tokenizer.json) tokenizers are supported`,
        tokPath,
      );
    }
    const tokenizerJson = readJson(tokPath);
    const cfgPath = join(dir, "tokenizer_config.json");
    const cfg: TokenizerConfig = existsSync(cfgPath) ? readJson(cfgPath) : {};
    const genPath = join(dir, "generation_config.json");
    const genEos = existsSync(genPath) ? idList(readJson(genPath)["eos_token_id"]) : [];
    return new TextTokenizer(tokenizerJson, cfg, findChatTemplate(dir, cfg), genEos);
  }

  /**
   * Token ids of `text`. With addSpecialTokens the tokenizer's post-processor adds its
   * special tokens (BOS for Llama-style models); tokenizer_config's add_bos_token /
   * add_eos_token, when present, win over the post-processor, as in transformers.
   */
  encode(text: string, addSpecialTokens = true): number[] {
    const ids = this.#tok.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    if (!addSpecialTokens) return ids;
    const bos = this.bosTokenId;
    if (bos !== null) {
      if (this.#cfg.add_bos_token === true && ids[0] !== bos) ids.unshift(bos);
      else if (this.#cfg.add_bos_token === false && ids[0] === bos && !text.startsWith(this.#bosText!)) ids.shift();
    }
    const eos = this.#eosText === null ? undefined : this.#tok.token_to_id(this.#eosText);
    if (this.#cfg.add_eos_token === true && eos !== undefined && ids[ids.length - 1] !== eos) ids.push(eos);
    return ids;
  }

  /**
   * Text of `ids`. Special tokens are dropped when skipSpecialTokens; ids the tokenizer
   * does not know (the model's padded vocabulary rows) decode to nothing.
   */
  decode(ids: readonly number[], skipSpecialTokens = true): string {
    const known = ids.filter((id) => this.#tok.id_to_token(id) !== undefined);
    if (known.length === 0) return "";
    return this.#tok.decode(known, { skip_special_tokens: skipSpecialTokens });
  }

  /**
   * The text one token stands for, as logprobs show it: special tokens appear as
   * themselves ("</s>"), a leading space is kept, and a byte of an unfinished UTF-8
   * character decodes to U+FFFD (what decode([id]) gives).
   */
  tokenText(id: number): string {
    let text = this.#tokenTextCache.get(id);
    if (text === undefined) {
      text = this.decode([id], false);
      if (this.#anchorId !== null) {
        const both = this.decode([this.#anchorId, id], false);
        if (both.startsWith(this.#anchorText)) text = both.slice(this.#anchorText.length);
      }
      this.#tokenTextCache.set(id, text);
    }
    return text;
  }

  /**
   * Renders `messages` with the chat template (transformers' variables: messages,
   * add_generation_prompt, bos_token, eos_token, pad_token, unk_token). Throws
   * ChatTemplateError when there is no template, a content part is not text, or the
   * template raises. Encode the result with `encodeChat` (no special tokens added: the
   * template writes BOS itself when the model wants one).
   */
  applyChatTemplate(messages: readonly ChatMessage[], addGenerationPrompt = true): string {
    if (this.#template === null) {
      throw new ChatTemplateError(
        "this model's tokenizer has no chat_template; use /v1/completions",
        "no_chat_template",
      );
    }
    const normalized = messages.map((m) => ({ ...m, content: messageText(m.content) }));
    try {
      return this.#template.render({
        messages: normalized,
        add_generation_prompt: addGenerationPrompt,
        bos_token: this.#bosText ?? "",
        eos_token: this.#eosText ?? "",
        pad_token: tokenContent(this.#cfg.pad_token) ?? "",
        unk_token: tokenContent(this.#cfg.unk_token) ?? "",
      });
    } catch (e) {
      throw new ChatTemplateError(`chat template: ${(e as Error).message}`, "template_error");
    }
  }

  /** Prompt ids of a chat: the rendered template, encoded without adding special tokens (as HF and vLLM do). */
  encodeChat(messages: readonly ChatMessage[], addGenerationPrompt = true): number[] {
    return this.encode(this.applyChatTemplate(messages, addGenerationPrompt), false);
  }
}

function messageText(content: ChatMessage["content"]): string {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) {
    throw new ChatTemplateError("message content must be a string or an array of content parts", "unsupported_content");
  }
  return content
    .map((p: ChatContentPart) => {
      if (p.type !== "text" || typeof p.text !== "string") {
        throw new ChatTemplateError(
          `content part of type "${String(p.type)}" is not supported; only {"type": "text", "text": ...} parts are`,
          "unsupported_content",
        );
      }
      return p.text;
    })
    .join("\n");
}

/** GPT-2's byte <-> printable character map that byte-level BPE vocabularies are written in. */
function byteLevelCharToByte(): Map<string, number> {
  const bytes: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b);
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b);
  const chars = [...bytes];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + n++);
    }
  }
  return new Map(bytes.map((b, i) => [String.fromCodePoint(chars[i]!), b]));
}

function byteLevelTable(
  json: Record<string, unknown>,
  tok: HfTokenizer,
  special: ReadonlySet<number>,
  size: number,
): (Uint8Array | null)[] | null {
  const decoder = json["decoder"] as { type?: unknown } | null | undefined;
  const model = json["model"] as { type?: unknown } | undefined;
  if (decoder?.type !== "ByteLevel" || model?.type !== "BPE") return null;
  const toByte = byteLevelCharToByte();
  const added = tok.get_added_tokens_decoder();
  const enc = new TextEncoder();
  const table: (Uint8Array | null)[] = new Array(size).fill(null);
  for (let id = 0; id < size; id++) {
    if (special.has(id)) continue;
    const a = added.get(id);
    // Added (non-special) tokens decode to their content as written, not through the byte map.
    if (a) {
      table[id] = enc.encode(a.content);
      continue;
    }
    const piece = tok.id_to_token(id);
    if (piece === undefined) continue;
    const out: number[] = [];
    for (const ch of piece) {
      const b = toByte.get(ch);
      if (b === undefined) return null; // not a byte-level vocabulary after all: use the general path
      out.push(b);
    }
    table[id] = Uint8Array.from(out);
  }
  return table;
}

