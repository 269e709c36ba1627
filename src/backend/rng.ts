// Counter-based uniform draws for sampling. A draw is a pure function of
// (seed, counter), so a request's tokens never depend on which batch it ran in, and
// every backend can reproduce the same stream (the CUDA kernel implements the same
// hash; keep them in sync).

/** lowbias32 (Chris Wellons' integer hash): good avalanche, cheap on any backend. */
export function hash32(x: number): number {
  x = x >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  x ^= x >>> 16;
  return x >>> 0;
}

/** Uniform in [0, 1) with 24 bits of resolution, from a seed and a draw index. */
export function uniform(seed: number, counter: number): number {
  const h = hash32(hash32(seed) ^ Math.imul(counter + 1, 0x9e3779b9));
  return (h >>> 8) / 16777216;
}

/** mulberry32: a small sequential generator in [0, 1) for reproducible test and benchmark data. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
