// The `inlaid` CLI end to end, run from source through tsx (the same code the build
// emits to dist/cli/main.js), on the bundled demo model with the CPU backend.

import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { CLI_MAIN, runCli, startCli as start } from "./helpers/cli.js";
import { DEMO, DEMO_BASE, DEMO_ADAPTERS, ROOT } from "./helpers/demo.js";

const MAIN = CLI_MAIN;
const inlaid = runCli;

const reverse = `reverse=${DEMO_ADAPTERS.reverse}`;

describe("inlaid CLI", () => {
  it("is an executable script (the build keeps the shebang)", () => {
    expect(readFileSync(MAIN, "utf8").split("\n")[0]).toBe("#!/usr/bin/env node");
  });

  const flags: Record<string, string[]> = {
    serve: ["--model", "--demo", "--adapter", "--host", "--port", "--device", "--api-key", "--max-batch", "--policy", "--max-model-len", "--num-scheduler-steps"],
    generate: ["--model", "--adapter", "--prompt", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--device"],
    eval: ["--model", "--adapter", "--data", "--limit", "--json", "--max-tokens", "--device", "--max-batch"],
  };

  it("--help for the program and every command exits 0 and lists the flags", async () => {
    const top = await inlaid("--help");
    expect(top.code).toBe(0);
    for (const cmd of Object.keys(flags)) expect(top.stdout).toContain(cmd);
    const helpCmd = await inlaid("help", "eval");
    expect(helpCmd.code).toBe(0);
    expect(helpCmd.stdout).toContain("--data");
    await Promise.all(
      Object.entries(flags).map(async ([cmd, names]) => {
        const r = await inlaid(cmd, "--help");
        expect(r.code, r.stderr).toBe(0);
        for (const f of names) expect(r.stdout, `${cmd} --help`).toContain(f);
      }),
    );
  });

  it("usage errors exit 2 with a clear message", async () => {
    const [badAdapter, unknownFlag, unknownCmd, badNumber, noModel, nothing, badSteps] = await Promise.all([
      inlaid("generate", "--model", DEMO_BASE, "--prompt", "x", "--adapter", "x"),
      inlaid("eval", "--model", DEMO_BASE, "--adapter", reverse, "--data", "x.jsonl", "--bogus"),
      inlaid("frobnicate"),
      inlaid("serve", "--demo", "--port", "http"),
      inlaid("serve"),
      inlaid(),
      inlaid("serve", "--demo", "--num-scheduler-steps", "0"),
    ]);
    expect(badAdapter.code).toBe(2);
    expect(badAdapter.stderr).toContain("--adapter expects NAME=DIR, got 'x'");
    expect(unknownFlag.code).toBe(2);
    expect(unknownFlag.stderr).toContain("unknown option '--bogus'");
    expect(unknownCmd.code).toBe(2);
    expect(unknownCmd.stderr).toContain("unknown command 'frobnicate'");
    expect(badNumber.code).toBe(2);
    expect(badNumber.stderr).toContain("--port expects an integer");
    expect(noModel.code).toBe(2);
    expect(noModel.stderr).toContain("--model");
    expect(nothing.code).toBe(2);
    expect(nothing.stderr).toContain("Usage: inlaid");
    expect(badSteps.code).toBe(2);
    expect(badSteps.stderr).toContain("--num-scheduler-steps expects an integer in [1, 64], got '0'");
  });

  it("a missing model folder is a one-line error with exit code 1", async () => {
    const r = await inlaid("generate", "--model", join(ROOT, "no-such-model"), "--prompt", "hi");
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split("\n")).toEqual([`inlaid: --model: no such folder '${join(ROOT, "no-such-model")}'`]);
    expect(r.stdout).toBe("");
  });

  it("a bad eval data line is named before the model loads", async () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-cli-"));
    const data = join(dir, "bad.jsonl");
    writeFileSync(data, '{"prompt":"a =","completion":" a"}\nnot json\n');
    const r = await inlaid("eval", "--model", DEMO_BASE, "--adapter", reverse, "--data", data);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${data}:2: not valid JSON`);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  it("generate streams the adapter's answer to stdout and stats to stderr", async () => {
    const r = await inlaid("generate", "--model", DEMO_BASE, "--adapter", reverse, "--prompt", "kto bram zu =", "--device", "cpu");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(" zu bram kto");
    expect(r.stderr).toMatch(/prompt tokens: \d+, generated tokens: \d+, [\d.]+ tokens\/s/);
  });

  it("eval --json --limit 20 on the reverse adapter", async () => {
    const data = join(DEMO, "data", "reverse", "eval.jsonl");
    const r = await inlaid("eval", "--model", DEMO_BASE, "--adapter", reverse, "--data", data, "--limit", "20", "--json", "--device", "cpu");
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(out).toMatchObject({ adapter: "reverse", data, n: 20 });
    expect(out.exact_match).toBeGreaterThanOrEqual(0.9);
    expect(out.exact_match_trimmed).toBeGreaterThanOrEqual(out.exact_match as number);
    expect(out.tokens_per_s).toBeGreaterThan(0);
    expect(Array.isArray(out.failures)).toBe(true);
    // Not a TTY: plain progress lines, ending at 100%.
    expect(r.stderr).toContain("eval reverse: 20/20 prompts (100%)");
  });

  it("serve --demo answers /health on a free port and exits cleanly on SIGTERM", async () => {
    const child = start(["serve", "--demo", "--port", "0", "--device", "cpu"]);
    let stdout = "";
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    try {
      const url = await new Promise<string>((resolve, reject) => {
        child.stdout!.on("data", (d: Buffer) => {
          stdout += d.toString();
          const m = /curl (http:\/\/\S+?)\/v1\/completions/.exec(stdout);
          if (m) resolve(m[1]!);
        });
        void exited.then((code) => reject(new Error(`serve exited with ${code} before it was ready:\n${stderr}`)));
      });
      expect(stdout).toContain("with adapters reverse, sort, caesar, mirror");
      expect(stdout).toContain(`"model":"reverse","prompt":"kto bram zu ="`);
      const health = await fetch(`${url}/health`);
      expect(health.status).toBe(200);
      child.kill("SIGTERM");
      expect(await exited).toBe(0);
      expect(stderr).toContain("shutting down");
    } finally {
      if (child.exitCode === null) child.kill("SIGKILL");
    }
  });
});
