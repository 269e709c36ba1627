import { beforeAll, describe, expect, it } from "vitest";
import { IncrementalDetokenizer } from "./detokenizer.js";
import { TextTokenizer } from "./tokenizer.js";
import { mulberry32 } from "../backend/rng.js";

const byteLevel = TextTokenizer.load("examples/demo/base");
// The same tokenizer without its byte table, so the general (decode-window) path runs too.
// (#private fields rule out Object.create/Proxy, so delegate the members in use.)
const windowed = {
  tokenBytes: null,
  specialIds: byteLevel.specialIds,
  eosTokenIds: byteLevel.eosTokenIds,
  vocabSize: byteLevel.vocabSize,
  encode: (text: string, addSpecial?: boolean) => byteLevel.encode(text, addSpecial),
  decode: (ids: readonly number[], skipSpecial?: boolean) => byteLevel.decode(ids, skipSpecial),
} as unknown as TextTokenizer;
let tok: TextTokenizer = byteLevel;

/** Pushes ids one at a time; returns each push's output and the flush. */
function stream(promptIds: readonly number[], ids: readonly number[]): { pieces: string[]; tail: string } {
  const d = new IncrementalDetokenizer(tok, promptIds);
  const pieces = ids.map((id) => d.push(id));
  return { pieces, tail: d.flush() };
}

const TEXTS = [
  "plain ascii text, with punctuation.",
  " leading space and  double  spaces ",
  "héllo wörld — café naïve",
  "日本語のテキストです。中文也可以。",
  "한국어 텍스트",
  "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
  "math ∑∫√∞ ≤ ≥ and arrows →←",
  "tabs\tand\nnewlines\r\n",
  "mixed 日本 a😀b é",
  "😀",
  "",
];
const PROMPTS = ["", "oabd pvufk", "prompt ending in CJK 日本語", "emoji prompt 😀"];

for (const [label, variant] of [["byte-level fast path", byteLevel], ["decode-window path", windowed]] as const)
describe(`IncrementalDetokenizer (${label})`, () => {
  beforeAll(() => {
    tok = variant;
  });

  it("streams valid text without U+FFFD and matches a full decode", () => {
    for (const p of PROMPTS) {
      const promptIds = tok.encode(p, p !== "");
      for (const s of TEXTS) {
        const ids = tok.encode(s, false);
        const { pieces, tail } = stream(promptIds, ids);
        for (const piece of pieces) expect(piece).not.toContain("\uFFFD");
        expect(tail).not.toContain("\uFFFD");
        expect(pieces.join("") + tail).toBe(tok.decode(ids));
        expect(pieces.join("") + tail).toBe(s);
      }
    }
  });

  it("emits each character as soon as its last byte arrives", () => {
    const ids = tok.encode("a日b", false);
    const { pieces, tail } = stream([1], ids);
    expect(pieces.join("")).toBe("a日b");
    expect(tail).toBe("");
    // Every piece is whole characters; nothing is held once the text is complete.
    expect(pieces.filter((x) => x !== "").every((x) => !x.includes("\uFFFD"))).toBe(true);
  });

  it("streams random multibyte text identically to decode", () => {
    const rand = mulberry32(7);
    const alphabet = [..."abc xyz.,é日本語한😀👍🏽∑\n"];
    for (let trial = 0; trial < 200; trial++) {
      const n = 1 + Math.floor(rand() * 30);
      let s = "";
      for (let i = 0; i < n; i++) s += alphabet[Math.floor(rand() * alphabet.length)];
      const ids = tok.encode(s, false);
      const { pieces, tail } = stream(tok.encode("prompt"), ids);
      for (const piece of pieces) expect(piece).not.toContain("\uFFFD");
      expect(pieces.join("") + tail).toBe(s);
    }
  });

  it("skips special tokens such as EOS", () => {
    const ids = [...tok.encode("ok 日", false), 2];
    const { pieces, tail } = stream([1], ids);
    expect(pieces[pieces.length - 1]).toBe("");
    expect(pieces.join("") + tail).toBe("ok 日");
  });

  it("releases an unfinished character at flush as U+FFFD, like decode", () => {
    const ids = tok.encode("x😀", false).slice(0, -1);
    const { pieces, tail } = stream([1], ids);
    expect(pieces.join("")).toBe("x");
    expect(pieces.join("") + tail).toBe(tok.decode(ids));
    expect(tail).toContain("\uFFFD");
  });

  it("matches decode on random token soup (invalid UTF-8 and specials included)", () => {
    const rand = mulberry32(11);
    for (let trial = 0; trial < 100; trial++) {
      const n = 1 + Math.floor(rand() * 120);
      const ids = Array.from({ length: n }, () => Math.floor(rand() * tok.vocabSize));
      const prompt = Array.from({ length: Math.floor(rand() * 8) }, () => Math.floor(rand() * tok.vocabSize));
      const { pieces, tail } = stream(prompt, ids);
      expect(pieces.join("") + tail).toBe(tok.decode(ids));
    }
  });

  it("matches decode on long runs of lone non-ASCII bytes (long holds)", () => {
    // Tokens that decode to U+FFFD on their own: bytes of unfinished or invalid UTF-8.
    const byteIds: number[] = [];
    for (let id = 0; id < tok.vocabSize; id++) if (tok.decode([id]) === "\uFFFD") byteIds.push(id);
    expect(byteIds.length).toBeGreaterThan(10);
    const rand = mulberry32(3);
    for (let trial = 0; trial < 50; trial++) {
      const ids = Array.from({ length: 60 }, () =>
        rand() < 0.9 ? byteIds[Math.floor(rand() * byteIds.length)]! : tok.encode("a", false)[0]!,
      );
      const { pieces, tail } = stream([1], ids);
      expect(pieces.join("") + tail).toBe(tok.decode(ids));
    }
  });
});
