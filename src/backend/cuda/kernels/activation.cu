// The MLP's gated activation. Reference: src/backend/cpu/cpu_backend.ts (siluMul).
//
//   silu_mul_f32_bf16: out[i][j] = bf16( f32(g / (1 + exp(-g))) * u ),  g = gu[i][j], u = gu[i][I + j]
//   gu: f32 [cap, 2I] (the fused gate/up GEMM's output, kept in f32); out: bf16 [cap, I]
//   (the down_proj input). Row-major; rows i >= *live untouched (live: device i32;
//   nullptr = all cap rows). Math in f32 with the accurate expf; one rounding, at the store.
//
// Grid: x = row (capacity), y = chunk of 8 * blockDim.x columns. Each thread reads two
// float4 of gate and of up and writes one 16-byte bf16 vector when I % 8 == 0; scalar
// otherwise.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/activation.cubin activation.cu

#include "common.cuh"

using namespace inlaid;

namespace {
__device__ __forceinline__ float silu_mul(float g, float u) { return (g / (1.0f + expf(-g))) * u; }
}  // namespace

extern "C" __global__ void silu_mul_f32_bf16(bf16* __restrict__ out, const float* __restrict__ gu,
                                             const int* __restrict__ live, int cap, int I) {
  pdl_wait();
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const long long base = (long long)row * I;
  const float* gate = gu + 2 * base;  // row `row` of gu starts at row * 2I
  const float* up = gate + I;
  if (I % 8 == 0) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= I / 8) return;
    const float4* g4 = reinterpret_cast<const float4*>(gate) + 2 * c;
    const float4* u4 = reinterpret_cast<const float4*>(up) + 2 * c;
    const float4 ga = g4[0], gb = g4[1], ua = u4[0], ub = u4[1];
    const float o[8] = {silu_mul(ga.x, ua.x), silu_mul(ga.y, ua.y), silu_mul(ga.z, ua.z), silu_mul(ga.w, ua.w),
                        silu_mul(gb.x, ub.x), silu_mul(gb.y, ub.y), silu_mul(gb.z, ub.z), silu_mul(gb.w, ub.w)};
    reinterpret_cast<uint4*>(out + base)[c] = pack8(o);
  } else {
    for (int j = (blockIdx.y * blockDim.x + threadIdx.x) * 8, e = min(j + 8, I); j < e; j++) {
      out[base + j] = __float2bfloat16_rn(silu_mul(gate[j], up[j]));
    }
  }
}
