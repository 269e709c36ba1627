import { describe, expect, it } from "vitest";
import { StopMatcher } from "./stop.js";
import { mulberry32 } from "../backend/rng.js";

/** Feeds `deltas`, then flushes unless stopped; returns all emitted text and whether it stopped. */
function run(stops: readonly string[], deltas: readonly string[]): { text: string; stopped: boolean } {
  const m = new StopMatcher(stops);
  let text = "";
  for (const d of deltas) {
    const r = m.push(d);
    text += r.text;
    if (r.stopped) return { text, stopped: true };
  }
  return { text: text + m.flush(), stopped: false };
}

/**
 * What the output must be: text cut before the first occurrence of any stop string, the
 * first to complete (the longest of those completing at the same character).
 */
function expected(stops: readonly string[], text: string): { text: string; stopped: boolean } {
  for (let end = 1; end <= text.length; end++) {
    const head = text.slice(0, end);
    const ending = stops.filter((s) => s !== "" && head.endsWith(s));
    if (ending.length > 0) {
      const longest = Math.max(...ending.map((s) => s.length));
      return { text: text.slice(0, end - longest), stopped: true };
    }
  }
  return { text, stopped: false };
}

describe("StopMatcher", () => {
  it("passes text through without stop strings (empty ones are ignored)", () => {
    const m = new StopMatcher(["", ""]);
    expect(m.push("hello")).toEqual({ text: "hello", stopped: false });
    expect(m.flush()).toBe("");
  });

  it("cuts before a stop string inside one delta", () => {
    expect(run(["END"], ["abcENDdef"])).toEqual({ text: "abc", stopped: true });
  });

  it("holds back a possible start and releases it when it does not match", () => {
    const m = new StopMatcher(["END"]);
    expect(m.push("abcE")).toEqual({ text: "abc", stopped: false });
    expect(m.push("N")).toEqual({ text: "", stopped: false });
    expect(m.push("x")).toEqual({ text: "ENx", stopped: false });
    expect(m.push("EN")).toEqual({ text: "", stopped: false });
    expect(m.flush()).toBe("EN");
  });

  it("matches a stop string spread over several deltas", () => {
    expect(run(["<|end|>"], ["hi <", "|e", "n", "d|", "> more"])).toEqual({ text: "hi ", stopped: true });
  });

  it("handles overlapping stop strings", () => {
    expect(run(["ab", "abc"], ["xab"])).toEqual({ text: "x", stopped: true });
    expect(run(["abc", "ab"], ["x", "a", "b"])).toEqual({ text: "x", stopped: true });
    expect(run(["abc", "bcd"], ["xab", "cd"])).toEqual({ text: "x", stopped: true });
    expect(run(["bcd", "abce"], ["xab", "cd"])).toEqual({ text: "xa", stopped: true });
    // A self-overlapping stop string: "aab" inside "aaab".
    expect(run(["aab"], ["a", "a", "a", "b"])).toEqual({ text: "a", stopped: true });
    // The first stop string to complete wins, however the text is split.
    expect(run(["a", "caa"], ["bcaa"])).toEqual({ text: "bc", stopped: true });
    expect(run(["a", "caa"], ["bc", "aa"])).toEqual({ text: "bc", stopped: true });
    expect(run(["b", "ab"], ["xab"])).toEqual({ text: "x", stopped: true });
  });

  it("ignores pushes after stopping", () => {
    const m = new StopMatcher(["x"]);
    expect(m.push("axb")).toEqual({ text: "a", stopped: true });
    expect(m.push("more")).toEqual({ text: "", stopped: true });
    expect(m.flush()).toBe("");
  });

  it("works with multibyte stop strings", () => {
    expect(run(["日本"], ["今日は", "日", "本です"])).toEqual({ text: "今日は", stopped: true });
    expect(run(["😀!"], ["ok 😀", "😀", "!"])).toEqual({ text: "ok 😀", stopped: true });
  });

  it("matches a cut-at-first-occurrence reference over random splits", () => {
    const rand = mulberry32(42);
    const alphabet = "abcx";
    for (let trial = 0; trial < 2000; trial++) {
      const word = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(rand() * alphabet.length)]).join("");
      const stops = Array.from({ length: 1 + Math.floor(rand() * 3) }, () => word(Math.floor(rand() * 4)));
      const text = word(Math.floor(rand() * 40));
      const deltas: string[] = [];
      for (let i = 0; i < text.length; ) {
        const n = Math.floor(rand() * 5); // empty deltas too
        deltas.push(text.slice(i, i + n));
        i += n;
      }
      expect(run(stops, deltas), `stops=${JSON.stringify(stops)} deltas=${JSON.stringify(deltas)}`).toEqual(
        expected(stops, text),
      );
    }
  });

  it("never emits text that later turns out to be part of a stop string", () => {
    const rand = mulberry32(5);
    for (let trial = 0; trial < 500; trial++) {
      const stops = ["abab", "bc"];
      const text = Array.from({ length: 30 }, () => "abc"[Math.floor(rand() * 3)]).join("");
      const m = new StopMatcher(stops);
      let emitted = "";
      const want = expected(stops, text).text;
      for (const ch of text) {
        const r = m.push(ch);
        emitted += r.text;
        expect(want.startsWith(emitted)).toBe(true);
        if (r.stopped) break;
      }
    }
  });
});
