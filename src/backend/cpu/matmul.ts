// out[n, N] = x[n, K] @ w[N, K]^T (+ bias). Each output element is summed in k order
// in double precision and rounded once, so a row's result never depends on how many
// rows share the call (batched and single requests give identical tokens).

export function matmulNT(
  out: Float32Array,
  x: Float32Array,
  w: Float32Array,
  n: number,
  K: number,
  N: number,
  bias?: Float32Array,
): void {
  let i = 0;
  // Four input rows at a time against two weight rows: eight independent
  // accumulators per pass over K, each weight row loaded once per four rows.
  for (; i + 4 <= n; i += 4) {
    const x0 = i * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
    let j = 0;
    for (; j + 2 <= N; j += 2) {
      const w0 = j * K, w1 = w0 + K;
      let a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
      for (let k = 0; k < K; k++) {
        const wa = w[w0 + k]!, wb = w[w1 + k]!;
        const v0 = x[x0 + k]!, v1 = x[x1 + k]!, v2 = x[x2 + k]!, v3 = x[x3 + k]!;
        a00 += v0 * wa; a01 += v0 * wb;
        a10 += v1 * wa; a11 += v1 * wb;
        a20 += v2 * wa; a21 += v2 * wb;
        a30 += v3 * wa; a31 += v3 * wb;
      }
      const b0 = bias ? bias[j]! : 0, b1 = bias ? bias[j + 1]! : 0;
      out[i * N + j] = a00 + b0; out[i * N + j + 1] = a01 + b1;
      out[(i + 1) * N + j] = a10 + b0; out[(i + 1) * N + j + 1] = a11 + b1;
      out[(i + 2) * N + j] = a20 + b0; out[(i + 2) * N + j + 1] = a21 + b1;
      out[(i + 3) * N + j] = a30 + b0; out[(i + 3) * N + j + 1] = a31 + b1;
    }
    for (; j < N; j++) {
      const w0 = j * K;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let k = 0; k < K; k++) {
        const wa = w[w0 + k]!;
        a0 += x[x0 + k]! * wa; a1 += x[x1 + k]! * wa; a2 += x[x2 + k]! * wa; a3 += x[x3 + k]! * wa;
      }
      const b = bias ? bias[j]! : 0;
      out[i * N + j] = a0 + b; out[(i + 1) * N + j] = a1 + b;
      out[(i + 2) * N + j] = a2 + b; out[(i + 3) * N + j] = a3 + b;
    }
  }
  for (; i < n; i++) {
    const x0 = i * K;
    let j = 0;
    for (; j + 2 <= N; j += 2) {
      const w0 = j * K, w1 = w0 + K;
      let a0 = 0, a1 = 0;
      for (let k = 0; k < K; k++) {
        const v = x[x0 + k]!;
        a0 += v * w[w0 + k]!; a1 += v * w[w1 + k]!;
      }
      out[i * N + j] = a0 + (bias ? bias[j]! : 0);
      out[i * N + j + 1] = a1 + (bias ? bias[j + 1]! : 0);
    }
    for (; j < N; j++) {
      const w0 = j * K;
      let a = 0;
      for (let k = 0; k < K; k++) a += x[x0 + k]! * w[w0 + k]!;
      out[i * N + j] = a + (bias ? bias[j]! : 0);
    }
  }
}
