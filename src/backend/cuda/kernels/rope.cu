// Rotary position embedding, in place, rotate-half convention (HF Llama).
// Reference: src/backend/cpu/cpu_backend.ts (rope).
//
//   rope_bf16: for each live row t (< *live) and each head of q [cap, nH*D] and
//   k [cap, nKv*D] (bf16), for i < D/2:
//       a = f32(positions[t] * invFreq[i])           (one f32 rounding, as HF)
//       c = f32(cos(a)), s = f32(sin(a))             (computed in f64, then rounded: the CPU's values)
//       x1 = x[i], x2 = x[i + D/2]
//       x[i]       = bf16(x1 * c - x2 * s)
//       x[i + D/2] = bf16(x2 * c + x1 * s)
//   invFreq: f32 [D/2]. D even, D/2 <= 256. Rows >= *live (device i32; nullptr = cap) untouched.
//
// One CTA per row: the D/2 angles are computed once into shared memory and reused by every
// head of q and k. Work items are (head, 8 consecutive i) so x1 and x2 move as 16-byte
// vectors; a scalar path covers D/2 % 8 != 0.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/rope.cubin rope.cu

#include "common.cuh"

using namespace inlaid;

extern "C" __global__ void rope_bf16(bf16* __restrict__ q, bf16* __restrict__ k, const float* __restrict__ invFreq,
                                     const int* __restrict__ positions, const int* __restrict__ live,
                                     int cap, int nH, int nKv, int D) {
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
  const int heads = nH + nKv;
  if (half % 8 == 0) {
    const int chunks = half / 8;
    for (int w = threadIdx.x; w < heads * chunks; w += blockDim.x) {
      const int h = w / chunks, i0 = (w % chunks) * 8;
      bf16* base = h < nH ? q + ((long long)row * nH + h) * D : k + ((long long)row * nKv + (h - nH)) * D;
      uint4* p1 = reinterpret_cast<uint4*>(base + i0);
      uint4* p2 = reinterpret_cast<uint4*>(base + i0 + half);
      uint4 u1 = *p1, u2 = *p2;
      __nv_bfloat162* a = reinterpret_cast<__nv_bfloat162*>(&u1);
      __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(&u2);
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float2 x1 = __bfloat1622float2(a[j]), x2 = __bfloat1622float2(b[j]);
        const int i = i0 + 2 * j;
        const float c0 = cs[i], s0 = sn[i], c1 = cs[i + 1], s1 = sn[i + 1];
        a[j] = __floats2bfloat162_rn(fmaf(x1.x, c0, -x2.x * s0), fmaf(x1.y, c1, -x2.y * s1));
        b[j] = __floats2bfloat162_rn(fmaf(x2.x, c0, x1.x * s0), fmaf(x2.y, c1, x1.y * s1));
      }
      *p1 = u1;
      *p2 = u2;
    }
  } else {
    for (int w = threadIdx.x; w < heads * half; w += blockDim.x) {
      const int h = w / half, i = w % half;
      bf16* base = h < nH ? q + ((long long)row * nH + h) * D : k + ((long long)row * nKv + (h - nH)) * D;
      const float x1 = __bfloat162float(base[i]), x2 = __bfloat162float(base[i + half]);
      base[i] = __float2bfloat16_rn(fmaf(x1, cs[i], -x2 * sn[i]));
      base[i + half] = __float2bfloat16_rn(fmaf(x2, cs[i], x1 * sn[i]));
    }
  }
}
