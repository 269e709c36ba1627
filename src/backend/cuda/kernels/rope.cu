// Splits the fused q/k/v projection output and applies the rotary position embedding,
// rotate-half convention (HF Llama). Reference: src/backend/cpu/cpu_backend.ts (rope).
//
//   rope_qkv_f32: qkv f32 [cap, (nH + 2 nKv) * D] holds per row the q heads, then the k
//   heads, then the v heads (the fused q/k/v GEMM's output); it is read, never written.
//   For each live row t (< *live): q [cap, nH*D] and k [cap, nKv*D] get their heads rotated
//   (f32, rounded to bf16 only where attention stores K in the cache), v [cap, nKv*D] a
//   plain copy. For each rotated head and i < D/2, with x = the head's input:
//       a = f32(positions[t] * invFreq[i])           (one f32 rounding, as HF)
//       c = f32(cos(a)), s = f32(sin(a))             (computed in f64, then rounded: the CPU's values)
//       x1 = x[i], x2 = x[i + D/2]
//       x[i]       = f32(x1 * c - x2 * s)            (products and difference in f64, one rounding:
//       x[i + D/2] = f32(x2 * c + x1 * s)             bit for bit the CPU backend's result)
//   invFreq: f32 [D/2]. D even, D/2 <= 256. Rows >= *live (device i32; nullptr = cap) untouched.
//
// One CTA per row: the D/2 angles are computed once into shared memory and reused by every
// head of q and k (v's heads take the same path with the rotation skipped). Work items are (head, 8 consecutive i) so x1 and x2 move as two float4
// each; a scalar path covers D/2 % 8 != 0. The f64 arithmetic is 6 flops per pair, far
// below what the memory traffic costs.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/rope.cubin rope.cu

#include "common.cuh"

using namespace inlaid;

namespace {
// (x1, x2) -> (x1 c - x2 s, x2 c + x1 s): f32 x f32 products are exact in f64, so this is
// the CPU's JavaScript arithmetic exactly.
__device__ __forceinline__ void rotate(float& x1, float& x2, float c, float s) {
  const double a = (double)x1, b = (double)x2;
  x1 = (float)(a * (double)c - b * (double)s);
  x2 = (float)(b * (double)c + a * (double)s);
}
}  // namespace

extern "C" __global__ void rope_qkv_f32(float* __restrict__ q, float* __restrict__ k, float* __restrict__ v,
                                        const float* __restrict__ qkv, const float* __restrict__ invFreq,
                                        const int* __restrict__ positions, const int* __restrict__ live, int cap, int nH,
                                        int nKv, int D) {
  pdl_wait();
  __shared__ float cs[256], sn[256];
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const int half = D / 2;
  const float pos = (float)positions[row];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float a = __fmul_rn(pos, invFreq[i]);
    double s, c;
    sincos((double)a, &s, &c);
    cs[i] = (float)c;
    sn[i] = (float)s;
  }
  __syncthreads();
  const int heads = nH + 2 * nKv;
  const float* src = qkv + (long long)row * heads * D;
  // Destination head h of the fused row: q's, k's or v's.
  auto dst = [&](int h) -> float* {
    if (h < nH) return q + ((long long)row * nH + h) * D;
    if (h < nH + nKv) return k + ((long long)row * nKv + (h - nH)) * D;
    return v + ((long long)row * nKv + (h - nH - nKv)) * D;
  };
  if (half % 8 == 0) {
    const int chunks = half / 8;
    for (int w = threadIdx.x; w < heads * chunks; w += blockDim.x) {
      const int h = w / chunks, i0 = (w % chunks) * 8;
      const float4* s1 = reinterpret_cast<const float4*>(src + h * D + i0);
      const float4* s2 = reinterpret_cast<const float4*>(src + h * D + i0 + half);
      float* base = dst(h);
      float4* p1 = reinterpret_cast<float4*>(base + i0);
      float4* p2 = reinterpret_cast<float4*>(base + i0 + half);
      float4 a0 = s1[0], a1 = s1[1], b0 = s2[0], b1 = s2[1];
      if (h >= nH + nKv) {
        p1[0] = a0;
        p1[1] = a1;
        p2[0] = b0;
        p2[1] = b1;
        continue;
      }
      rotate(a0.x, b0.x, cs[i0 + 0], sn[i0 + 0]);
      rotate(a0.y, b0.y, cs[i0 + 1], sn[i0 + 1]);
      rotate(a0.z, b0.z, cs[i0 + 2], sn[i0 + 2]);
      rotate(a0.w, b0.w, cs[i0 + 3], sn[i0 + 3]);
      rotate(a1.x, b1.x, cs[i0 + 4], sn[i0 + 4]);
      rotate(a1.y, b1.y, cs[i0 + 5], sn[i0 + 5]);
      rotate(a1.z, b1.z, cs[i0 + 6], sn[i0 + 6]);
      rotate(a1.w, b1.w, cs[i0 + 7], sn[i0 + 7]);
      p1[0] = a0;
      p1[1] = a1;
      p2[0] = b0;
      p2[1] = b1;
    }
  } else {
    for (int w = threadIdx.x; w < heads * half; w += blockDim.x) {
      const int h = w / half, i = w % half;
      float* base = dst(h);
      float x1 = src[h * D + i], x2 = src[h * D + i + half];
      if (h < nH + nKv) rotate(x1, x2, cs[i], sn[i]);
      base[i] = x1;
      base[i + half] = x2;
    }
  }
}
