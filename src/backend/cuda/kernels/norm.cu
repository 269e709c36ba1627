// RMSNorm over the f32 residual stream, producing the bf16 activations that feed the
// next matmul. Reference: src/backend/cpu/cpu_backend.ts (rmsnormRow, addRmsnorm).
//
//   rmsnorm_f32_bf16:      out[i] = bf16( f32(x[i] * inv_i) * w )
//   add_rmsnorm_f32_bf16:  residual[i] += x[i];  out[i] = bf16( f32(residual[i] * inv_i) * w )
//   with inv_i = 1 / sqrt(mean_j(r[i][j]^2) + eps), everything in f32 (HF semantics).
//
// Layouts (row-major): x / residual f32 [cap, H] (add_: x is the o_proj / down_proj output,
// also f32, so the residual stream never sees a bf16 rounding), w bf16 [H], out bf16
// [cap, H]. H % 8 == 0 (16-byte vectors). One CTA per row, one 8-element chunk per thread
// when H / 8 <= 1024. Rows i >= *live are left untouched (live: device i32,
// the live row count of a padded launch; nullptr = all cap rows).
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/norm.cubin norm.cu

#include "common.cuh"

using namespace inlaid;

namespace {

// Sum over the CTA; every thread gets the result. blockDim.x is a multiple of 32, <= 1024.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float t = lane < nw ? partial[lane] : 0.f;
  return warp_sum(t);
}

__device__ __forceinline__ float sumsq8(const float4 a, const float4 b) {
  return a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
}

// out = bf16(f32(r * inv) * w) for the f32 row r; each thread touches the chunks it owned
// in the first pass (c = threadIdx.x + k * blockDim.x), so it only re-reads its own writes.
__device__ __forceinline__ void normalize_row(bf16* __restrict__ out, const float* __restrict__ r,
                                              const bf16* __restrict__ w, int H, float inv) {
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(r)[2 * c];
    const float4 b = reinterpret_cast<const float4*>(r)[2 * c + 1];
    float wf[8];
    unpack8(reinterpret_cast<const uint4*>(w)[c], wf);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float o[8];
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = __fmul_rn(v[i], inv) * wf[i];
    reinterpret_cast<uint4*>(out)[c] = pack8(o);
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_f32_bf16(bf16* __restrict__ out, const float* __restrict__ x,
                                                                    const bf16* __restrict__ w, const int* __restrict__ live,
                                                                    int cap, int H, float eps) {
  pdl_wait();
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const float* xr = x + (long long)row * H;
  float ss = 0.f;
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    ss += sumsq8(reinterpret_cast<const float4*>(xr)[2 * c], reinterpret_cast<const float4*>(xr)[2 * c + 1]);
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / (float)H + eps);
  normalize_row(out + (long long)row * H, xr, w, H, inv);
}

extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_f32_bf16(bf16* __restrict__ out, float* __restrict__ residual,
                                                                        const float* __restrict__ x, const bf16* __restrict__ w,
                                                                        const int* __restrict__ live, int cap, int H, float eps) {
  pdl_wait();
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  float* rr = residual + (long long)row * H;
  const float* xr = x + (long long)row * H;
  float ss = 0.f;
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    float4 a = reinterpret_cast<const float4*>(rr)[2 * c];
    float4 b = reinterpret_cast<const float4*>(rr)[2 * c + 1];
    const float4 xa = reinterpret_cast<const float4*>(xr)[2 * c];
    const float4 xb = reinterpret_cast<const float4*>(xr)[2 * c + 1];
    a.x += xa.x; a.y += xa.y; a.z += xa.z; a.w += xa.w;
    b.x += xb.x; b.y += xb.y; b.z += xb.z; b.w += xb.w;
    reinterpret_cast<float4*>(rr)[2 * c] = a;
    reinterpret_cast<float4*>(rr)[2 * c + 1] = b;
    ss += sumsq8(a, b);
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / (float)H + eps);
  normalize_row(out + (long long)row * H, rr, w, H, inv);
}
