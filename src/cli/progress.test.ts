import { describe, expect, it } from "vitest";
import { createProgress } from "./progress.js";

function sink(): { stream: NodeJS.WriteStream; text: () => string } {
  let out = "";
  const stream = { isTTY: false, write: (s: string) => ((out += s), true) } as unknown as NodeJS.WriteStream;
  return { stream, text: () => out };
}

describe("createProgress (plain lines)", () => {
  it("prints a line at the start, at each 10% crossed and nothing more at stop when done", () => {
    const s = sink();
    const p = createProgress({ stream: s.stream });
    p.note("loading");
    p.start("eval reverse", 200, "prompts");
    for (let i = 1; i <= 200; i++) p.update(i);
    p.stop();
    const lines = s.text().trim().split("\n");
    expect(lines[0]).toBe("loading");
    expect(lines).toHaveLength(1 + 1 + 10);
    expect(lines[1]).toMatch(/^eval reverse: 0\/200 prompts \(0%\)/);
    expect(lines[2]).toMatch(/^eval reverse: 20\/200 prompts \(10%\)/);
    expect(lines.at(-1)).toMatch(/^eval reverse: 200\/200 prompts \(100%\)/);
  });

  it("says where unfinished work stopped, and stays silent when quiet", () => {
    const s = sink();
    const p = createProgress({ stream: s.stream });
    p.start("quantize", 7);
    p.update(3);
    p.stop();
    p.stop();
    expect(s.text().trim().split("\n").at(-1)).toMatch(/^quantize: 3\/7 \(42%\)/);
    const q = sink();
    const quiet = createProgress({ stream: q.stream, quiet: true });
    quiet.note("x");
    quiet.start("y", 1);
    quiet.update(1);
    quiet.stop();
    expect(q.text()).toBe("");
  });
});
