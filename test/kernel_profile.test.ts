import { describe, expect, it } from "vitest";
import { csvFields, sumProfile } from "../bench/kernel_profile.js";

// The shape of `ncu --csv --metrics gpu__time_duration.sum` output: the program's own lines
// and ncu's ==PROF== lines mixed with one quoted CSV row per kernel launch.
const SAMPLE = [
  "==PROF== Connected to process 1",
  '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
  '"0","1","node","h","quant_gemm_b4_t4_c2","1","7","(128, 1, 1)","(86, 1, 2)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","21.38"',
  '"1","1","node","h","rmsnorm","1","7","(256, 1, 1)","(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","2,048"',
  '{"decode_step_ms": 1}',
  '"2","1","node","h","quant_gemm_b4_t4_c2","1","7","(128, 1, 1)","(86, 1, 2)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","20.62"',
  // The GPU machine's ncu writes short unit names ("ns").
  '"3","1","node","h","rmsnorm","1","7","(256, 1, 1)","(32, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","1,024"',
].join("\n");

describe("bench/kernel_profile", () => {
  it("splits quoted CSV fields, commas inside quotes kept", () => {
    expect(csvFields('"a","(1, 2)","3,5"')).toEqual(["a", "(1, 2)", "3,5"]);
  });

  it("sums durations per kernel and launch shape, converting units", () => {
    const rows = sumProfile(SAMPLE);
    expect(rows.map((r) => [r.kernel, r.launches])).toEqual([["quant_gemm_b4_t4_c2", 2], ["rmsnorm", 2]]);
    expect(rows[0]!.total_us).toBeCloseTo(42.0, 6);
    expect(rows[1]!.total_us).toBeCloseTo(3.072, 6);
    expect(rows[0]!.grid).toBe("(86, 1, 2)");
  });

  it("refuses input without ncu's CSV header", () => {
    expect(() => sumProfile("no csv here")).toThrow(/no ncu CSV header/);
  });
});
