// GPTQ's per-linear solve on the GPU, float64 throughout (the CPU reference, src/quant/gptq.ts
// gptqQuantize, is float64; at 7B sizes the f64 work is milliseconds on an H100, so nothing is
// gained by giving up its bits). Launched by src/backend/cuda/gptq_ops.ts; orchestrated by
// src/quant/gpu_gptq_cuda.ts with cuSOLVER (potrf, trtri) and cuBLAS (the lazy-update DGEMM).
//
//   gptq_damped_hessian:  A[i, j] = H'[p(K-1-j), p(K-1-i)] + (i == j) * lambda, f64 [K, K],
//                         H' = H with a dead input's H[k, k] = 0 replaced by 1, p = perm.
//                         (The solving-order Hessian reversed: chol of J P H P^T J, gptq.ts.)
//   gptq_factor_ok:       *bad = 1 unless every L[i, i] of the factor is finite and > 0.
//   gptq_reverse_upper:   in place, from L^-1 (cuSOLVER column-major lower = row-major upper
//                         M, M[a][b] = L^-1[b][a]) to U[i][j] = L^-1[K-1-i][K-1-j] =
//                         M[K-1-j][K-1-i] for j >= i, 0 below: the upper factor of H^-1.
//   gptq_load_weight:     W[i, n] = dead[p(i)] ? 0 : w[n, p(i)]: f32 [N, K] -> f64 [K, N].
//   gptq_group_params:    scale/zero of group g per output n over inputs [g*gs, min(g*gs+gs, K))
//                         of w (dead inputs read as 0): gs = K for one group.
//   gptq_block:           columns [i1, i2) of W: quantize each with its group's scale/zero,
//                         code -> codes[p(i), n], scaled error -> E[i - i1, n], and push the
//                         error onto the block's later columns (the host then runs the lazy
//                         update W[i2:] -= U[i1:i2, i2:]^T E as one DGEMM).
//
// Bitwise agreement with the CPU. Every elementwise step does the same IEEE operations as
// gptq.ts / quantizer.ts in the same order (no FMA contraction: __dmul_rn / __dsub_rn), so
// the codes depend only on W and U. Those differ from the CPU's by summation order (the
// Cholesky and the DGEMM), a few ulps, which flips a code only where a value sits within
// that distance of a rounding boundary (test/gpu/gptq.test.ts measures how often).
//
// Scale rules (quantizer.ts groupParams): fp16 scales rounded up (f16 ceil = float ceil then
// half ceil: fp16 values are floats, so no fp16 lies between x and its float ceiling),
// asymmetric zeros in [1, maxq], round half to even (rint). A group whose range is not finite
// or whose scale exceeds fp16 sets *status (1, 2) instead of throwing; the host reports it.
//
// Layouts: row-major; W f64 [K, N] (row = input in solving order), U f64 [K, K], E f64
// [B, N], codes u8 [K, N] (row = original input), scales f32 [G, N], zeros u8 [G, N].
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin --resource-usage -o /tmp/gptq.cubin gptq.cu

#include <cuda_fp16.h>

namespace {

constexpr int kLanes = 32;    // outputs n per CTA of gptq_block
constexpr int kWarps = 8;     // warps per CTA of gptq_block; each updates every 8th row
constexpr int kMaxBlock = 128;  // most columns per block (GptqOptions.blockSize)

__device__ __forceinline__ double pos_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ bool is_finite(double x) { return x - x == 0.0; }

// Smallest fp16 >= x for 0 < x <= 65504 (quantizer.ts f16Ceil).
__device__ __forceinline__ float f16_ceil(double x) { return __half2float(__float2half_ru(__double2float_ru(x))); }

__device__ __forceinline__ void set_status(int* status, int code) {
  if (*status == 0) atomicCAS(status, 0, code);
}

// quantizer.ts groupParams(min, max, bits, sym). Returns false (and sets *status) where the
// CPU throws a RangeError.
__device__ bool group_params(double mn, double mx, int maxq, int sym, float* scale, int* zero, int* status) {
  if (!is_finite(mn) || !is_finite(mx)) {
    set_status(status, 1);
    *scale = 1.f;
    *zero = sym ? (maxq + 1) / 2 : 1;
    return false;
  }
  double s;
  int z;
  if (sym) {
    z = (maxq + 1) / 2;
    const double amax = fmax(fabs(mn), fabs(mx));
    if (amax == 0.0) {
      *scale = 1.f;
      *zero = z;
      return true;
    }
    s = (2.0 * amax) / maxq;
  } else {
    const double lo = mn < 0.0 ? mn : 0.0;
    const double hi = mx > 0.0 ? mx : 0.0;
    if (lo == hi) {
      *scale = 1.f;
      *zero = 1;
      return true;
    }
    s = (hi - lo) / maxq;
    if (s > 65504.0) {
      set_status(status, 2);
      s = 65504.0;
    }
    const double sc = f16_ceil(s);
    double zz = rint(-lo / sc);
    if (zz < 1.0) {
      zz = 1.0;
      s = fmax(hi / (maxq - 1), -lo);
    } else {
      s = sc;
    }
    z = zz > maxq ? maxq : (int)zz;
  }
  if (s > 65504.0) {
    set_status(status, 2);
    s = 65504.0;
  }
  *scale = f16_ceil(s);
  *zero = z;
  return true;
}

}  // namespace

// 32 x 32 tiles, 256 threads. a is written so that cuSOLVER's column-major view of it is the
// CPU's row-major matrix (gptq.ts reads the lower triangle of its reversed P H P^T, i.e. H's
// upper triangle): a[i * K + j] = H'[p(K-1-j), p(K-1-i)]. With H symmetric that is the same
// matrix; the order only matters if it is not (then both read the same triangle). The tile
// makes the reads of H's rows coalesced (descending addresses) when there is no act-order.
// lambda = __hiloint2double(lambdaHi, lambdaLo): the launcher passes 4-byte scalars only.
extern "C" __global__ void __launch_bounds__(256) gptq_damped_hessian(double* __restrict__ a, const float* __restrict__ h,
                                                                      const int* __restrict__ perm, int K, unsigned lambdaHi,
                                                                      unsigned lambdaLo) {
  __shared__ double tile[32][33];
  const int j0 = blockIdx.x * 32, i0 = blockIdx.y * 32;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  for (int r = ty; r < 32; r += 8) {
    const int jj = j0 + r, ii = i0 + tx;
    tile[r][tx] = jj < K && ii < K ? (double)h[(long long)perm[K - 1 - jj] * K + perm[K - 1 - ii]] : 0.0;
  }
  __syncthreads();
  const double lambda = __hiloint2double((int)lambdaHi, (int)lambdaLo);
  for (int r = ty; r < 32; r += 8) {
    const int i = i0 + r, j = j0 + tx;
    if (i >= K || j >= K) continue;
    double v = tile[tx][r];
    if (i == j) {
      if (v == 0.0) v = 1.0;  // a dead input (gptq.ts prepareHessian)
      v = v + lambda;
    }
    a[(long long)i * K + j] = v;
  }
}

// One CTA of 1024 threads; `bad` must be 0 before the launch.
extern "C" __global__ void __launch_bounds__(1024) gptq_factor_ok(int* __restrict__ bad, const double* __restrict__ l, int K) {
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    const double d = l[(long long)i * K + i];
    if (!(d > 0.0) || !is_finite(d)) *bad = 1;
  }
}

extern "C" __global__ void gptq_reverse_upper(double* __restrict__ m, int K) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y;
  if (j >= K) return;
  const long long at = (long long)i * K + j;
  if (j < i) {
    m[at] = 0.0;
  } else if (i + j < K - 1) {
    // (i, j) and (K-1-j, K-1-i) swap; the partner has i + j > K - 1, so its thread does nothing.
    const long long partner = (long long)(K - 1 - j) * K + (K - 1 - i);
    const double t = m[at];
    m[at] = m[partner];
    m[partner] = t;
  }
}

// 32 x 32 tiles: reads along k (coalesced apart from the act-order gather), writes along n.
extern "C" __global__ void __launch_bounds__(256) gptq_load_weight(double* __restrict__ W, const float* __restrict__ w,
                                                                   const int* __restrict__ perm, const unsigned char* __restrict__ dead,
                                                                   int N, int K) {
  __shared__ double tile[32][33];
  const int i0 = blockIdx.x * 32, n0 = blockIdx.y * 32;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8 threads
  for (int r = ty; r < 32; r += 8) {
    const int n = n0 + r, i = i0 + tx;
    double v = 0.0;
    if (n < N && i < K) {
      const int k = perm[i];
      v = dead[k] ? 0.0 : (double)w[(long long)n * K + k];
    }
    tile[r][tx] = v;
  }
  __syncthreads();
  for (int r = ty; r < 32; r += 8) {
    const int i = i0 + r, n = n0 + tx;
    if (i < K && n < N) W[(long long)i * N + n] = tile[tx][r];
  }
}

// One warp per (n, g): grid (N, G), 32 threads.
extern "C" __global__ void __launch_bounds__(32) gptq_group_params(float* __restrict__ scales, unsigned char* __restrict__ zeros,
                                                                   int* __restrict__ status, const float* __restrict__ w,
                                                                   const unsigned char* __restrict__ dead, int N, int K, int gs,
                                                                   int bits, int sym) {
  const int n = blockIdx.x, g = blockIdx.y, lane = threadIdx.x;
  const int from = g * gs, to = min(from + gs, K);
  double mn = pos_inf(), mx = -pos_inf();
  for (int k = from + lane; k < to; k += 32) {
    const double v = dead[k] ? 0.0 : (double)w[(long long)n * K + k];
    mn = fmin(mn, v);
    mx = fmax(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = fmin(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  if (lane == 0) {
    float s;
    int z;
    group_params(mn, mx, (1 << bits) - 1, sym, &s, &z, status);
    scales[(long long)g * N + n] = s;
    zeros[(long long)g * N + n] = (unsigned char)z;
  }
}

// Grid ceil(N / 32), 256 threads: lane = output n0 + lane, 8 warps. Ws holds the block's
// columns for the CTA's 32 outputs. Per column i (all warps in step):
//   - gs > 0 and i % gs == 0: a dynamic group starts; its scale/zero come from the current
//     values of columns [i, min(i + gs, K)) (rows of Ws inside the block, W beyond it), as in
//     gptq.ts; warp 0 stores them. gs > 0 otherwise: the group's stored scale/zero. gs == 0:
//     groups fixed up front, group of column i = groupOf[i].
//   - every warp quantizes column i (the same arithmetic, so no broadcast is needed); warp 0
//     writes the code, the scaled error and the loss;
//   - warp w subtracts U[i, j] * err from rows j = i+1+w, i+9+w, ... of the block.
// lossOut[blockIdx.x] = this CTA's sum over the block of diff^2 / d^2 (summed by the host in
// a fixed order: the result does not depend on scheduling).
extern "C" __global__ void __launch_bounds__(256) gptq_block(double* __restrict__ W, const double* __restrict__ U,
                                                             double* __restrict__ E, unsigned char* __restrict__ codes,
                                                             float* __restrict__ scales, unsigned char* __restrict__ zeros,
                                                             const int* __restrict__ perm, const int* __restrict__ groupOf,
                                                             double* __restrict__ lossOut, int* __restrict__ status,
                                                             int i1, int i2, int K, int N, int gs, int bits, int sym) {
  __shared__ double Ws[kMaxBlock][kLanes];
  __shared__ double partMin[kWarps][kLanes], partMax[kWarps][kLanes];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x * kLanes + lane;
  const bool live = n < N;
  const int bs = i2 - i1;
  const int maxq = (1 << bits) - 1;

  for (int r = warp; r < bs; r += kWarps) Ws[r][lane] = live ? W[(long long)(i1 + r) * N + n] : 0.0;

  float s = 1.f;
  int z = 0;
  double loss = 0.0;
  for (int r = 0; r < bs; r++) {
    const int i = i1 + r;
    __syncthreads();  // row r has every earlier column's update
    if (gs > 0 && i % gs == 0) {
      const int end = min(i + gs, K);
      double mn = pos_inf(), mx = -pos_inf();
      for (int c = i + warp; c < end; c += kWarps) {
        const double v = c < i2 ? Ws[c - i1][lane] : (live ? W[(long long)c * N + n] : 0.0);
        mn = fmin(mn, v);
        mx = fmax(mx, v);
      }
      partMin[warp][lane] = mn;
      partMax[warp][lane] = mx;
      __syncthreads();
      mn = partMin[0][lane];
      mx = partMax[0][lane];
#pragma unroll
      for (int w2 = 1; w2 < kWarps; w2++) {
        mn = fmin(mn, partMin[w2][lane]);
        mx = fmax(mx, partMax[w2][lane]);
      }
      group_params(mn, mx, maxq, sym, &s, &z, status);
      if (warp == 0 && live) {
        scales[(long long)(i / gs) * N + n] = s;
        zeros[(long long)(i / gs) * N + n] = (unsigned char)z;
      }
      __syncthreads();  // partMin/partMax are free again only after every warp read them
    } else if (gs > 0) {
      if (r == 0 && live) {  // a group begun in an earlier block
        s = scales[(long long)(i / gs) * N + n];
        z = zeros[(long long)(i / gs) * N + n];
      }
    } else if (live) {
      const int g = groupOf[i];
      s = scales[(long long)g * N + n];
      z = zeros[(long long)g * N + n];
    }

    const double d = U[(long long)i * K + i];
    const double x = Ws[r][lane];
    double q = rint(x / (double)s) + (double)z;
    q = q < 0.0 ? 0.0 : q > (double)maxq ? (double)maxq : q;
    const double dq = (double)(float)((double)s * (q - (double)z));  // exact product, then f32 (quantizer.ts dequantizeValue)
    const double diff = x - dq;
    const double err = diff / d;
    if (warp == 0 && live) {
      codes[(long long)perm[i] * N + n] = (unsigned char)q;
      E[(long long)r * N + n] = err;
      loss = loss + __dmul_rn(diff, diff) / __dmul_rn(d, d);
    }
    const double* urow = U + (long long)i * K + i1;
    for (int j = r + 1 + warp; j < bs; j += kWarps) Ws[j][lane] = __dsub_rn(Ws[j][lane], __dmul_rn(__ldg(urow + j), err));
  }
  if (warp == 0) {
    if (!live) loss = 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) loss += __shfl_xor_sync(0xffffffffu, loss, o);
    if (lane == 0) lossOut[blockIdx.x] = loss;
  }
}
