// Row gathers: the token embedding (into the f32 residual stream) and the gather of the
// rows to sample. Reference: src/backend/cpu/cpu_backend.ts (embedding, gatherRows).
//
//   embedding_bf16_f32: out[i] = f32(table[tokenIds[i]])     table bf16 [V, H], out f32 [cap, H]
//       for i < *live; rows *live <= i < cap, and rows whose id is outside [0, V), are
//       written as zeros (a kernel cannot throw; zeros keep the residual stream finite).
//   gather_rows_bf16:   out[r] = x[sampleRows[r]]             x bf16 [*, H], out bf16 [cap, H]
//       for r < *live (the step's numSample); other rows untouched.
//
// H % 8 == 0 (16-byte vectors). One CTA per row. live: device i32 (nullptr = cap).
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/embedding.cubin embedding.cu

#include "common.cuh"

using namespace inlaid;

extern "C" __global__ void embedding_bf16_f32(float* __restrict__ out, const bf16* __restrict__ table,
                                              const int* __restrict__ tokenIds, const int* __restrict__ live,
                                              int cap, int H, int V) {
  pdl_wait();
  const int row = blockIdx.x;
  if (row >= cap) return;
  const int id = row < live_rows(live, cap) ? tokenIds[row] : -1;
  float4* o = reinterpret_cast<float4*>(out + (long long)row * H);
  if (id < 0 || id >= V) {
    for (int c = threadIdx.x; c < H / 4; c += blockDim.x) o[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    return;
  }
  const uint4* t = reinterpret_cast<const uint4*>(table + (long long)id * H);
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    float f[8];
    unpack8(t[c], f);
    o[2 * c] = make_float4(f[0], f[1], f[2], f[3]);
    o[2 * c + 1] = make_float4(f[4], f[5], f[6], f[7]);
  }
}

extern "C" __global__ void gather_rows_bf16(bf16* __restrict__ out, const bf16* __restrict__ x,
                                            const int* __restrict__ sampleRows, const int* __restrict__ live,
                                            int cap, int H) {
  pdl_wait();
  const int r = blockIdx.x;
  if (r >= live_rows(live, cap)) return;
  const long long src = sampleRows[r];
  const uint4* s = reinterpret_cast<const uint4*>(x + src * H);
  uint4* d = reinterpret_cast<uint4*>(out + (long long)r * H);
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) d[c] = s[c];
}
