// The MLP's gated activation. Reference: src/backend/cpu/cpu_backend.ts (siluMul).
//
//   silu_mul_bf16: out[i][j] = bf16( f32(g / (1 + exp(-g))) * u ),  g = gate[i][j], u = up[i][j]
//   gate, up, out: bf16 [cap, I], row-major; rows i >= *live untouched (live: device i32;
//   nullptr = all cap rows). Math in f32 with the accurate expf.
//
// Grid: x = row (capacity), y = chunk of 8 * blockDim.x columns. 16-byte vectors when
// I % 8 == 0, scalar otherwise.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/activation.cubin activation.cu

#include "common.cuh"

using namespace inlaid;

namespace {
__device__ __forceinline__ float silu_mul(float g, float u) { return (g / (1.0f + expf(-g))) * u; }
}  // namespace

extern "C" __global__ void silu_mul_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                         const int* __restrict__ live, int cap, int I) {
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const long long base = (long long)row * I;
  if (I % 8 == 0) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= I / 8) return;
    const uint4 gu = reinterpret_cast<const uint4*>(gate + base)[c];
    const uint4 uu = reinterpret_cast<const uint4*>(up + base)[c];
    const __nv_bfloat162* g = reinterpret_cast<const __nv_bfloat162*>(&gu);
    const __nv_bfloat162* u = reinterpret_cast<const __nv_bfloat162*>(&uu);
    uint4 ou;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&ou);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 gf = __bfloat1622float2(g[j]), uf = __bfloat1622float2(u[j]);
      o[j] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
    }
    reinterpret_cast<uint4*>(out + base)[c] = ou;
  } else {
    for (int j = (blockIdx.y * blockDim.x + threadIdx.x) * 8, e = min(j + 8, I); j < e; j++) {
      out[base + j] = __float2bfloat16_rn(silu_mul(__bfloat162float(gate[base + j]), __bfloat162float(up[base + j])));
    }
  }
}
