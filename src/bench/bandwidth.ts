// Device memory bandwidth for the roofline, in GB/s (1e9 bytes per second).
//
// In order of preference: the backend's own copy benchmark (`measureBandwidth()`, which a
// GPU backend may offer); on the CPU backend, a large Float32Array copy (read + write
// bytes over time, like STREAM's Copy); on any other backend, a matrix-vector product
// through the Backend interface (`linear` of one row over a 1 GiB bf16 matrix), which
// streams the matrix once, as a decode step streams the weights.

import type { Backend } from "../backend/backend.js";

export interface Bandwidth {
  readonly gbs: number;
  /** How it was obtained: "flag", "backend", "cpu-copy" or "gemv". */
  readonly source: string;
}

/** A backend that measures its own bandwidth (GB/s, device-to-device copy). */
interface MeasuresBandwidth {
  measureBandwidth(): number;
}

function hasMeasureBandwidth(b: Backend): b is Backend & MeasuresBandwidth {
  return typeof (b as Partial<MeasuresBandwidth>).measureBandwidth === "function";
}

/** Best of `reps` timings of `fn`, in seconds. */
function bestSeconds(reps: number, fn: () => void): number {
  let best = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    best = Math.min(best, (performance.now() - t0) / 1000);
  }
  return best;
}

/** Host memory bandwidth: copies of a buffer far larger than any cache. */
export function measureHostCopy(bytes = 256 << 20, reps = 5): number {
  const n = bytes / 4;
  const src = new Float32Array(n).fill(1);
  const dst = new Float32Array(n);
  dst.set(src); // touch every page before timing
  const s = bestSeconds(reps, () => dst.set(src));
  return (2 * bytes) / s / 1e9;
}

/** Bandwidth of streaming a [rows, cols] bf16 matrix through `linear` with one input row (best of 3 runs of `reps`). */
function measureGemv(b: Backend, rows = 1 << 16, cols = 1 << 13, reps = 20): number {
  const w = b.empty([rows, cols], "bf16");
  const x = b.empty([1, cols], b.activationDtype);
  const out = b.empty([1, rows], "f32");
  try {
    b.linear(out, x, w);
    b.read(out); // warm-up, and wait for it
    const s = bestSeconds(3, () => {
      for (let i = 0; i < reps; i++) b.linear(out, x, w);
      b.read(out); // waits for every issued product
    });
    return (reps * rows * cols * 2) / s / 1e9;
  } finally {
    for (const t of [w, x, out]) b.free(t);
  }
}

/** Measures the bandwidth of `backend` (see the file header for the method used). */
export function measureBandwidth(backend: Backend): Bandwidth {
  if (hasMeasureBandwidth(backend)) return { gbs: backend.measureBandwidth(), source: "backend" };
  if (backend.name === "cpu") return { gbs: measureHostCopy(), source: "cpu-copy" };
  return { gbs: measureGemv(backend), source: "gemv" };
}
