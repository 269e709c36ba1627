import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ChatTemplateError, TextTokenizer, TokenizerLoadError } from "./tokenizer.js";

const DEMO = "examples/demo/base";
const TEMPLATE =
  "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

const tmpDirs: string[] = [];
/** A copy of the demo tokenizer with `edit` applied to its tokenizer_config.json. */
function demoCopy(edit: (cfg: Record<string, unknown>) => void): string {
  const dir = mkdtempSync(join(tmpdir(), "inlaid-tok-"));
  tmpDirs.push(dir);
  for (const f of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
    cpSync(join(DEMO, f), join(dir, f));
  }
  const cfg = JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8")) as Record<string, unknown>;
  edit(cfg);
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(cfg));
  return dir;
}
afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

describe("TextTokenizer (demo byte-level BPE)", () => {
  const tok = TextTokenizer.load(DEMO);

  it("encodes with BOS from the post-processor", () => {
    expect(tok.encode("oabd pvufk hkci =")).toEqual([1, 81, 67, 68, 70, 277, 481, 306, 260, 77, 329, 259]);
    expect(tok.encode("oabd pvufk hkci =", false)).toEqual([81, 67, 68, 70, 277, 481, 306, 260, 77, 329, 259]);
  });

  it("decodes, skipping special tokens unless asked", () => {
    expect(tok.decode([260, 77, 329, 277, 481, 306, 280, 67, 68, 70])).toBe(" hkci pvufk oabd");
    expect(tok.decode([1, 260, 77, 329, 2])).toBe(" hkci");
    expect(tok.decode([1, 260, 77, 329, 2], false)).toBe("<s> hkci</s>");
    expect(tok.decode([])).toBe("");
    // Ids past the tokenizer's vocabulary (padded embedding rows) decode to nothing.
    expect(tok.decode([260, 100_000])).toBe(" h");
  });

  it("reads special ids, sizes and EOS", () => {
    expect(tok.bosTokenId).toBe(1);
    expect(tok.eosTokenIds).toEqual([2]);
    expect([...tok.specialIds].sort()).toEqual([0, 1, 2]);
    expect(tok.vocabSize).toBe(512);
  });

  it("round-trips multibyte text", () => {
    for (const s of ["héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 ok", "mixed: a=1; b=2 ∑"]) {
      expect(tok.decode(tok.encode(s))).toBe(s);
    }
  });

  it("gives the text of a single token for logprobs", () => {
    expect(tok.tokenText(260)).toBe(" h");
    expect(tok.tokenText(2)).toBe("</s>");
    const partial = tok.encode("日", false)[0]!;
    expect(tok.tokenText(partial)).toBe("\uFFFD");
  });

  it("has no chat template: applyChatTemplate throws a ChatTemplateError", () => {
    expect(tok.hasChatTemplate).toBe(false);
    expect(() => tok.applyChatTemplate([{ role: "user", content: "hi" }])).toThrow(ChatTemplateError);
    expect(() => tok.applyChatTemplate([{ role: "user", content: "hi" }])).toThrow(/no chat_template; use \/v1\/completions/);
  });
});

describe("TextTokenizer loading", () => {
  it("refuses a folder without tokenizer.json", () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-tok-"));
    tmpDirs.push(dir);
    expect(() => TextTokenizer.load(dir)).toThrow(TokenizerLoadError);
    expect(() => TextTokenizer.load(dir)).toThrow(/has no tokenizer\.json; only fast \(tokenizer\.json\) tokenizers are supported/);
  });

  it("honours add_bos_token false and true", () => {
    const noBos = TextTokenizer.load(demoCopy((c) => { c["add_bos_token"] = false; }));
    expect(noBos.encode("oabd")[0]).not.toBe(1);
    expect(noBos.encode("<s>oabd")[0]).toBe(1);
    const bos = TextTokenizer.load(demoCopy((c) => { c["add_bos_token"] = true; }));
    expect(bos.encode("oabd")[0]).toBe(1);
    expect(bos.encode("oabd").filter((i) => i === 1).length).toBe(1);
  });

  it("reads eos_token as an object and merges generation_config eos ids", () => {
    const dir = demoCopy((c) => { c["eos_token"] = { content: "<pad>", special: true }; });
    writeFileSync(join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: [2, 1] }));
    expect([...TextTokenizer.load(dir).eosTokenIds].sort()).toEqual([0, 1, 2]);
  });
});

describe("chat templates", () => {
  const messages = [
    { role: "system", content: "be brief" },
    { role: "user", content: "hi" },
  ];

  it("renders tokenizer_config chat_template", () => {
    const tok = TextTokenizer.load(demoCopy((c) => { c["chat_template"] = TEMPLATE; }));
    expect(tok.hasChatTemplate).toBe(true);
    expect(tok.applyChatTemplate(messages)).toBe("<|system|>be brief\n<|user|>hi\n<|assistant|>");
    expect(tok.applyChatTemplate(messages, false)).toBe("<|system|>be brief\n<|user|>hi\n");
    // The template writes everything: no BOS is added when encoding a chat.
    expect(tok.encodeChat(messages)).toEqual(tok.encode("<|system|>be brief\n<|user|>hi\n<|assistant|>", false));
  });

  it("joins text content parts and refuses other parts", () => {
    const tok = TextTokenizer.load(demoCopy((c) => { c["chat_template"] = TEMPLATE; }));
    const parts = [{ role: "user", content: [{ type: "text", text: "a" }, { type: "text", text: "b" }] }];
    expect(tok.applyChatTemplate(parts)).toBe("<|user|>a\nb\n<|assistant|>");
    expect(tok.applyChatTemplate([{ role: "assistant", content: null }], false)).toBe("<|assistant|>\n");
    const image = [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }];
    expect(() => tok.applyChatTemplate(image)).toThrow(/image_url/);
  });

  it("passes bos_token and eos_token, and surfaces raise_exception", () => {
    const t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}";
    const tok = TextTokenizer.load(demoCopy((c) => { c["chat_template"] = t; }));
    expect(tok.applyChatTemplate(messages)).toBe("<s>be brief</s>hi</s>");
    expect(tok.encodeChat(messages).filter((i) => i === 1)).toEqual([1]);
    expect(() => tok.applyChatTemplate([{ role: "tool", content: "x" }])).toThrow(ChatTemplateError);
    expect(() => tok.applyChatTemplate([{ role: "tool", content: "x" }])).toThrow(/no tools/);
  });

  it("uses the 'default' entry of a template list", () => {
    const tok = TextTokenizer.load(demoCopy((c) => {
      c["chat_template"] = [{ name: "tool_use", template: "TOOLS" }, { name: "default", template: TEMPLATE }];
    }));
    expect(tok.applyChatTemplate([{ role: "user", content: "hi" }])).toBe("<|user|>hi\n<|assistant|>");
  });

  it("prefers a chat_template.jinja file", () => {
    const dir = demoCopy((c) => { c["chat_template"] = "IGNORED"; });
    writeFileSync(join(dir, "chat_template.jinja"), TEMPLATE);
    expect(TextTokenizer.load(dir).applyChatTemplate([{ role: "user", content: "x" }], false)).toBe("<|user|>x\n");
  });
});
