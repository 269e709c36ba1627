// `inlaid quantize` end to end on the demo (CPU, a few calibration lines per task):
// incremental addition of tasks is byte-identical to quantizing them all at once, a
// killed run resumes from its work folder, and usage errors exit 2.

import { existsSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { SafetensorsFile } from "../src/model/safetensors.js";
import { QUANT_AGGREGATES, QUANT_METHODS } from "../src/cli/quantize.js";
import { AGGREGATES } from "../src/quant/aggregate.js";
import { readQuantizedWeights } from "../src/quant/checkpoint.js";
import { DEFAULT_AGGREGATE, METHODS } from "../src/quant/methods.js";
import { finishCli as finish, runCli, startCli as start } from "./helpers/cli.js";
import { DEMO, DEMO_ADAPTERS, DEMO_BASE } from "./helpers/demo.js";

const LIMIT = "6";

const inlaid = runCli;

const task = (name: string): string[] => ["--task", `${name}=${DEMO_ADAPTERS[name]}:${join(DEMO, "data", name, "calib.jsonl")}`];
// --device cpu: on a GPU machine auto would capture on the GPU (test/gpu/quantize_gpu.test.ts covers that).
const spec = ["--method", "mlgptq", "--bits", "3", "--group-size", "64", "--act-order", "--calib-limit", LIMIT, "--device", "cpu"];

/** Every tensor of every safetensors file under `dir` (recursively), as name -> {dtype, shape, bytes}. */
function tensors(path: string): Map<string, { dtype: string; shape: string; bytes: Buffer }> {
  const f = SafetensorsFile.open(path);
  try {
    const out = new Map<string, { dtype: string; shape: string; bytes: Buffer }>();
    for (const n of f.names()) {
      const t = f.get(n);
      out.set(n, { dtype: f.info(n).fileDtype, shape: t.shape.join("x"), bytes: Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength) });
    }
    return out;
  } finally {
    f.close();
  }
}

function expectSameTensors(a: string, b: string): void {
  const ta = tensors(a), tb = tensors(b);
  expect([...tb.keys()]).toEqual([...ta.keys()]);
  for (const [name, x] of ta) {
    const y = tb.get(name)!;
    expect(`${name} ${y.dtype} ${y.shape}`).toBe(`${name} ${x.dtype} ${x.shape}`);
    expect(y.bytes.equals(x.bytes), `${name} differs`).toBe(true);
  }
}

describe("inlaid quantize", () => {
  it("the CLI's method and aggregate lists match the library's", () => {
    expect([...QUANT_METHODS]).toEqual([...METHODS]);
    expect([...QUANT_AGGREGATES]).toEqual([...AGGREGATES]);
  });

  it("--help lists every flag", async () => {
    const r = await inlaid("quantize", "--help");
    expect(r.code, r.stderr).toBe(0);
    for (const f of ["--model", "--from", "--task", "--method", "--bits", "--group-size", "--act-order", "--aggregate", "--calib-limit", "--work", "--out", "--device"]) {
      expect(r.stdout).toContain(f);
    }
  });

  it("usage errors exit 2 and name the problem", async () => {
    const out = join(tmpdir(), "inlaid-never-written");
    const cases: Array<[string[], string]> = [
      [["--model", DEMO_BASE, ...task("reverse"), "--out", out], "--bits is required"],
      [["--model", DEMO_BASE, "--bits", "5", ...task("reverse"), "--out", out], "--bits expects 2, 3, 4 or 8, got '5'"],
      [["--model", DEMO_BASE, "--bits", "4", "--task", "reverse", "--out", out], "--task expects NAME=ADAPTER_DIR:CALIB.jsonl, got 'reverse'"],
      [["--model", DEMO_BASE, "--bits", "4", ...task("reverse"), ...task("reverse"), "--out", out], "--task name 'reverse' is given twice"],
      [["--model", DEMO_BASE, "--bits", "4", "--method", "gptq-mixed", "--aggregate", "max", ...task("reverse"), "--out", out], "--aggregate applies to --method mlgptq only"],
      [["--model", DEMO_BASE, "--bits", "4", "--method", "rtn", "--act-order", "--out", out], "rtn has none"],
      [["--model", DEMO_BASE, "--bits", "4", "--out", out], "--method mlgptq needs at least one --task"],
      [["--model", DEMO_BASE, "--bits", "4", "--group-size", "0", ...task("reverse"), "--out", out], "--group-size expects a positive integer or -1"],
      [["--model", DEMO_BASE, "--bits", "4", "--aggregate", "median", ...task("reverse"), "--out", out], "median"],
      [["--from", DEMO_BASE, "--bits", "4", ...task("reverse"), "--out", out], "--from takes the method, spec and calibration settings from the checkpoint; drop --bits"],
      [["--from", DEMO_BASE, "--out", out], "--from needs at least one --task"],
      [["--bits", "4", ...task("reverse"), "--out", out], "--model is required"],
      [["--model", join(DEMO, "nope"), "--bits", "4", ...task("reverse"), "--out", out], "--model: no such folder"],
      [["--model", DEMO_BASE, "--bits", "4", ...task("reverse")], "--out"],
    ];
    const runs = await Promise.all(cases.map(([args]) => inlaid("quantize", ...args)));
    runs.forEach((r, i) => {
      expect(r.code, `${cases[i]![0].join(" ")}\n${r.stderr}`).toBe(2);
      expect(r.stderr).toContain(cases[i]![1]);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    });
    expect(existsSync(out)).toBe(false);
  });

  it("--from on a folder without mlgptq/ is a one-line error (exit 1)", async () => {
    const r = await inlaid("quantize", "--from", DEMO_BASE, ...task("caesar"), "--out", join(tmpdir(), "inlaid-never-written"));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("has no mlgptq/manifest.json");
  });

  it("per-task gptq writes one checkpoint per task (OUT/TASK); rtn needs no task and takes none with --from", async () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-quantize-"));
    const perTask = join(dir, "gptq"), rtn = join(dir, "rtn");
    const [rGptq, rRtn] = await Promise.all([
      inlaid("quantize", "--model", DEMO_BASE, "--device", "cpu", "--method", "gptq", "--bits", "4", "--group-size", "-1", "--calib-limit", "2", ...task("reverse"), ...task("sort"), "--out", perTask, "--json"),
      inlaid("quantize", "--model", DEMO_BASE, "--method", "rtn", "--bits", "2", "--out", rtn),
    ]);
    expect(rGptq.code, rGptq.stderr).toBe(0);
    expect((JSON.parse(rGptq.stdout) as { out: string[] }).out).toEqual([join(perTask, "reverse"), join(perTask, "sort")]);
    expect(readdirSync(perTask).sort()).toEqual(["reverse", "sort"]);
    const a = readQuantizedWeights(join(perTask, "reverse")), b = readQuantizedWeights(join(perTask, "sort"));
    expect(a.size).toBe(42);
    // Solved under different Hessians: the two bases differ.
    const name = "model.layers.5.mlp.down_proj";
    expect(Buffer.from(a.get(name)!.codes).equals(Buffer.from(b.get(name)!.codes))).toBe(false);
    const m = JSON.parse(readFileSync(join(perTask, "sort", "mlgptq", "manifest.json"), "utf8")) as { method: string; tasks: { name: string }[] };
    expect(m.method).toBe("gptq");
    expect(m.tasks.map((t) => t.name)).toEqual(["sort"]);

    expect(rRtn.code, rRtn.stderr).toBe(0);
    expect(readQuantizedWeights(rtn).get(name)!.spec.bits).toBe(2);
    const r = await inlaid("quantize", "--from", rtn, ...task("caesar"), "--out", join(dir, "never"));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("was made with --method rtn, which keeps no Hessians to add to");
  }, 300_000);

  it("{reverse, sort} then --from {caesar, mirror} is byte-identical to all four at once; a killed run resumes from its work folder", async () => {
    const dir = mkdtempSync(join(tmpdir(), "inlaid-quantize-"));
    const all = join(dir, "all"), first = join(dir, "first"), inc = join(dir, "inc");
    const work = join(dir, "first.work");

    // All four at once, while a {reverse, sort} run is killed once reverse's Hessians are in its work folder.
    const killed = start(["quantize", "--model", DEMO_BASE, ...spec, ...task("reverse"), ...task("sort"), "--out", first]);
    const [rAll, rKilled] = await Promise.all([
      inlaid("quantize", "--model", DEMO_BASE, ...spec, ...task("reverse"), ...task("sort"), ...task("caesar"), ...task("mirror"), "--out", all),
      finish(killed, (err) => {
        if (err.includes("task sort (adapter on): capturing") && killed.exitCode === null) killed.kill("SIGKILL");
      }),
    ]);
    expect(rAll.code, rAll.stderr).toBe(0);
    expect(rAll.stdout).toContain(`wrote ${all}`);
    expect(rAll.stderr).toContain("solve: 6/6 layers (100%)");
    expect(existsSync(`${all}.work`)).toBe(false); // removed after success
    expect(rKilled.code).toBeNull();
    expect(existsSync(first)).toBe(false); // nothing half-written
    expect(readdirSync(work).filter((f) => f.endsWith(".safetensors")).length).toBe(1);

    const rFirst = await inlaid("quantize", "--model", DEMO_BASE, ...spec, ...task("reverse"), ...task("sort"), "--out", first);
    expect(rFirst.code, rFirst.stderr).toBe(0);
    expect(rFirst.stderr).toContain("task reverse (adapter on): Hessians from the work folder");
    expect(rFirst.stderr).toContain("task sort (adapter on): capturing Hessians");
    expect(existsSync(work)).toBe(false);

    const rInc = await inlaid("quantize", "--from", first, ...task("caesar"), ...task("mirror"), "--out", inc);
    expect(rInc.code, rInc.stderr).toBe(0);
    expect(rInc.stderr).toContain("2 task(s) cached (reverse, sort), adding caesar, mirror");
    expect(rInc.stderr).not.toContain("task reverse (adapter on): capturing");

    expectSameTensors(join(all, "model.safetensors"), join(inc, "model.safetensors"));
    expectSameTensors(join(all, "mlgptq", "hessians.safetensors"), join(inc, "mlgptq", "hessians.safetensors"));
    expect(readFileSync(join(inc, "config.json"), "utf8")).toBe(readFileSync(join(all, "config.json"), "utf8"));
    const manifest = JSON.parse(readFileSync(join(inc, "mlgptq", "manifest.json"), "utf8")) as { tasks: { name: string }[]; aggregate: string };
    expect(manifest.tasks.map((t) => t.name)).toEqual(["reverse", "sort", "caesar", "mirror"]);
    expect(manifest.aggregate).toBe(DEFAULT_AGGREGATE);
    // A real 3-bit act-order checkpoint: every linear quantized, g_idx permuted.
    const q = readQuantizedWeights(all);
    expect(q.size).toBe(42);
    const g = q.get("model.layers.0.mlp.down_proj")!;
    expect(g.spec).toEqual({ bits: 3, groupSize: 64, sym: false, descAct: true });
    expect(Array.from(g.gIdx).some((v, k) => v !== Math.floor(k / 64))).toBe(true);

    const again = await inlaid("quantize", "--from", inc, ...task("sort"), "--out", join(dir, "dup"));
    expect(again.code).toBe(1);
    expect(again.stderr).toContain("task 'sort' is already in");
  }, 300_000);
});
