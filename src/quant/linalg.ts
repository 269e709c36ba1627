// Dense linear algebra for the GPTQ family, as small pure functions over row-major
// Float64Arrays (n x n matrices unless stated). They are written to be ported one by
// one to the GPU for 7B-sized layers (K up to 14336), where each has a library twin:
//   accumulateGram      -> cuBLAS syrk / gemm (X^T X, f32 in, f32 accumulate)
//   choleskyLower       -> cuSOLVER potrf (returns info > 0 instead of false)
//   invertLower         -> cuSOLVER/cuBLAS trtri
//   spdInverse          -> potrf + potri
//   choleskyInverseUpper-> potrf + trtri on the reversed matrix (see there)
//   lazyBlockUpdate     -> one gemm per 128-column block
// CPU sums run in float64 and in a fixed order, so results are bit-identical for
// identical inputs (incremental quantization relies on it).

/**
 * h[i, j] += sum_t x[t, i] * x[t, j] for 0 <= i <= j < K (upper triangle only; see
 * `mirrorUpper`). x: [rows, K] row-major f32. `scratch` (K * rows, reused between calls)
 * holds X transposed so every dot product reads contiguous memory; 2 x 2 tiles of h
 * share their loads (1.5x faster than one dot product at a time).
 */
export function accumulateGram(h: Float64Array, x: Float32Array, rows: number, K: number, scratch?: Float64Array): Float64Array {
  const xt = scratch && scratch.length >= K * rows ? scratch : new Float64Array(K * rows);
  for (let t = 0; t < rows; t++) for (let k = 0; k < K; k++) xt[k * rows + t] = x[t * K + k]!;
  const even = K - (K % 2);
  for (let i = 0; i < even; i += 2) {
    const oi0 = i * rows, oi1 = oi0 + rows;
    for (let j = i; j < even; j += 2) {
      const oj0 = j * rows, oj1 = oj0 + rows;
      let a00 = 0, a01 = 0, a10 = 0, a11 = 0;
      for (let t = 0; t < rows; t++) {
        const u0 = xt[oi0 + t]!, u1 = xt[oi1 + t]!, v0 = xt[oj0 + t]!, v1 = xt[oj1 + t]!;
        a00 += u0 * v0; a01 += u0 * v1; a10 += u1 * v0; a11 += u1 * v1;
      }
      const r0 = i * K + j, r1 = r0 + K;
      h[r0] = h[r0]! + a00;
      h[r0 + 1] = h[r0 + 1]! + a01;
      if (j > i) h[r1] = h[r1]! + a10; // on the diagonal tile this is below the diagonal
      h[r1 + 1] = h[r1 + 1]! + a11;
    }
  }
  if (even < K) {
    // Odd K: the last column against every row.
    const oj = even * rows;
    for (let i = 0; i < K; i++) {
      const oi = i * rows;
      let a = 0;
      for (let t = 0; t < rows; t++) a += xt[oi + t]! * xt[oj + t]!;
      h[i * K + even] = h[i * K + even]! + a;
    }
  }
  return xt;
}

/** Copies the upper triangle onto the lower one, in place. */
export function mirrorUpper(a: Float64Array | Float32Array, n: number): void {
  // In 64 x 64 tiles: walking a column of an 11008-wide matrix misses the cache at every step.
  const B = 64;
  for (let i0 = 0; i0 < n; i0 += B) {
    for (let j0 = i0; j0 < n; j0 += B) {
      const i1 = Math.min(i0 + B, n), j1 = Math.min(j0 + B, n);
      for (let i = i0; i < i1; i++) for (let j = Math.max(j0, i + 1); j < j1; j++) a[j * n + i] = a[i * n + j]!;
    }
  }
}

/**
 * In-place lower Cholesky factor of a symmetric matrix (reads the lower triangle,
 * writes L there and zeros above). Returns false, leaving `a` partly overwritten, when
 * the matrix is not (numerically) positive definite.
 */
export function choleskyLower(a: Float64Array, n: number): boolean {
  for (let j = 0; j < n; j++) {
    const oj = j * n;
    let s = a[oj + j]!;
    for (let k = 0; k < j; k++) s -= a[oj + k]! * a[oj + k]!;
    if (!(s > 0) || !Number.isFinite(s)) return false;
    const d = Math.sqrt(s);
    a[oj + j] = d;
    for (let i = j + 1; i < n; i++) {
      const oi = i * n;
      let v = a[oi + j]!;
      for (let k = 0; k < j; k++) v -= a[oi + k]! * a[oj + k]!;
      a[oi + j] = v / d;
    }
    for (let k = j + 1; k < n; k++) a[oj + k] = 0;
  }
  return true;
}

/** Inverse of a lower-triangular matrix (a new lower-triangular matrix). */
export function invertLower(l: Float64Array, n: number): Float64Array {
  const inv = new Float64Array(n * n);
  // Row i of L^-1 = (e_i - sum_{k<i} L[i,k] * row k of L^-1) / L[i,i]: contiguous row updates.
  for (let i = 0; i < n; i++) {
    const oi = i * n;
    for (let k = 0; k < i; k++) {
      const c = l[oi + k]!;
      if (c === 0) continue;
      const ok = k * n;
      for (let j = 0; j <= k; j++) inv[oi + j] = inv[oi + j]! - c * inv[ok + j]!;
    }
    inv[oi + i] = inv[oi + i]! + 1;
    const d = l[oi + i]!;
    for (let j = 0; j <= i; j++) inv[oi + j] = inv[oi + j]! / d;
  }
  return inv;
}

/** m^T m for lower-triangular m (symmetric result, both triangles written). */
export function gramOfLower(m: Float64Array, n: number): Float64Array {
  const out = new Float64Array(n * n);
  // (m^T m)[i, j] = sum_{k >= max(i, j)} m[k, i] m[k, j]: accumulate row by row of m.
  for (let k = 0; k < n; k++) {
    const ok = k * n;
    for (let i = 0; i <= k; i++) {
      const mi = m[ok + i]!;
      if (mi === 0) continue;
      const oi = i * n;
      for (let j = i; j <= k; j++) out[oi + j] = out[oi + j]! + mi * m[ok + j]!;
    }
  }
  mirrorUpper(out, n);
  return out;
}

/** Inverse of a symmetric positive-definite matrix, or null when its Cholesky fails. */
export function spdInverse(a: Float64Array, n: number): Float64Array | null {
  const l = Float64Array.from(a);
  if (!choleskyLower(l, n)) return null;
  return gramOfLower(invertLower(l, n), n);
}

/**
 * What GPTQ needs from H: the upper Cholesky factor U of H^-1 (H^-1 = U^T U), the matrix
 * torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
 * gives. Row i of U holds the coefficients GPTQ uses to spread column i's error over
 * later columns. Null when H is not (numerically) positive definite.
 *
 * Computed with one Cholesky and one triangular inverse instead of three factorizations:
 * with J the reversal permutation and J H J = L L^T, H = M M^T for the upper-triangular
 * M = J L J, so U = M^-1 = J L^-1 J. (On the GPU: potrf + trtri on the reversed matrix.)
 */
export function choleskyInverseUpper(h: Float64Array, n: number): Float64Array | null {
  const a = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)]!;
  if (!choleskyLower(a, n)) return null;
  const linv = invertLower(a, n);
  const u = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = i; j < n; j++) u[i * n + j] = linv[(n - 1 - i) * n + (n - 1 - j)]!;
  return u;
}

/**
 * GPTQ's lazy batch update: after columns [i1, i2) are quantized, push their scaled
 * errors into every later column at once:
 *   wt[j, :] -= sum_{i in [i1, i2)} hinv[i, j] * err[i - i1, :]   for j in [i2, K).
 * wt: [K, N] (the weight transposed: row k = input k), err: [(i2 - i1), N], hinv: [K, K].
 */
export function lazyBlockUpdate(wt: Float64Array, err: Float64Array, hinv: Float64Array, K: number, N: number, i1: number, i2: number): void {
  for (let j = i2; j < K; j++) {
    const oj = j * N;
    for (let i = i1; i < i2; i++) {
      const c = hinv[i * K + j]!;
      if (c === 0) continue;
      const oe = (i - i1) * N;
      for (let n = 0; n < N; n++) wt[oj + n] = wt[oj + n]! - c * err[oe + n]!;
    }
  }
}

/**
 * Eigen-decomposition of a symmetric matrix: a = V diag(values) V^T. Householder
 * tridiagonalization then implicit QL (EISPACK tred2/tql2, as in JAMA). Returns the
 * eigenvectors as the ROWS of `vectors` (row i pairs with values[i]), unsorted.
 * O(n^3); ~1 s for n = 704 here. (GPU: cuSOLVER syevd.)
 */
export function symmetricEigen(a: Float64Array, n: number): { values: Float64Array; vectors: Float64Array } {
  const V = Float64Array.from(a); // row-major V[i][j] = V[i * n + j]
  const d = new Float64Array(n), e = new Float64Array(n);
  for (let j = 0; j < n; j++) d[j] = V[(n - 1) * n + j]!;
  for (let i = n - 1; i > 0; i--) {
    let scale = 0, h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]!);
    if (scale === 0) {
      e[i] = d[i - 1]!;
      for (let j = 0; j < i; j++) {
        d[j] = V[(i - 1) * n + j]!;
        V[i * n + j] = 0;
        V[j * n + i] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) {
        d[k] = d[k]! / scale;
        h += d[k]! * d[k]!;
      }
      let f = d[i - 1]!;
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        V[j * n + i] = f;
        g = e[j]! + V[j * n + j]! * f;
        for (let k = j + 1; k <= i - 1; k++) {
          g += V[k * n + j]! * d[k]!;
          e[k] = e[k]! + V[k * n + j]! * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j] = e[j]! / h;
        f += e[j]! * d[j]!;
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j] = e[j]! - hh * d[j]!;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        g = e[j]!;
        for (let k = j; k <= i - 1; k++) V[k * n + j] = V[k * n + j]! - (f * e[k]! + g * d[k]!);
        d[j] = V[(i - 1) * n + j]!;
        V[i * n + j] = 0;
      }
    }
    d[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    V[(n - 1) * n + i] = V[i * n + i]!;
    V[i * n + i] = 1;
    const h = d[i + 1]!;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = V[k * n + i + 1]! / h;
      for (let j = 0; j <= i; j++) {
        let g = 0;
        for (let k = 0; k <= i; k++) g += V[k * n + i + 1]! * V[k * n + j]!;
        for (let k = 0; k <= i; k++) V[k * n + j] = V[k * n + j]! - g * d[k]!;
      }
    }
    for (let k = 0; k <= i; k++) V[k * n + i + 1] = 0;
  }
  for (let j = 0; j < n; j++) {
    d[j] = V[(n - 1) * n + j]!;
    V[(n - 1) * n + j] = 0;
  }
  V[n * n - 1] = 1;
  e[0] = 0;

  // QL works on columns of V; hold them as rows (Vt) so each rotation touches contiguous memory.
  const Vt = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) Vt[j * n + i] = V[i * n + j]!;
  for (let i = 1; i < n; i++) e[i - 1] = e[i]!;
  e[n - 1] = 0;
  let f = 0, tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]!) + Math.abs(e[l]!));
    let m = l;
    while (m < n && Math.abs(e[m]!) > eps * tst1) m++;
    if (m >= n) m = n - 1;
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 60) throw new Error("symmetricEigen: QL did not converge (non-finite input?)");
        let g = d[l]!;
        let p = (d[l + 1]! - g) / (2 * e[l]!);
        let r = Math.hypot(p, 1);
        if (p < 0) r = -r;
        d[l] = e[l]! / (p + r);
        d[l + 1] = e[l]! * (p + r);
        const dl1 = d[l + 1]!;
        let h = g - d[l]!;
        for (let i = l + 2; i < n; i++) d[i] = d[i]! - h;
        f += h;
        p = d[m]!;
        let c = 1, c2 = c, c3 = c, s = 0, s2 = 0;
        const el1 = e[l + 1]!;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i]!;
          h = c * p;
          r = Math.hypot(p, e[i]!);
          e[i + 1] = s * r;
          s = e[i]! / r;
          c = p / r;
          p = c * d[i]! - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]!);
          const oi = i * n, oi1 = (i + 1) * n;
          for (let k = 0; k < n; k++) {
            const hv = Vt[oi1 + k]!;
            Vt[oi1 + k] = s * Vt[oi + k]! + c * hv;
            Vt[oi + k] = c * Vt[oi + k]! - s * hv;
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]!) / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]!) > eps * tst1);
    }
    d[l] = d[l]! + f;
    e[l] = 0;
  }
  return { values: d, vectors: Vt };
}
