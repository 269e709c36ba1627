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

// A row's LoRA term for add_rmsnorm_lora: its slot's B rows [H][maxRank], its shrink t (the
// slot's maxRank entries), rank (0: no term) and scale.
struct RowLora {
  const bf16* __restrict__ B;
  const float* __restrict__ t;
  int rank;
  int maxRank;
  float scale;
};

// xv[i] += scale * sum_r B[8c + i][r] * t[r], i < 8, summed in lora_bgmv_expand_slots' order
// (8 ranks at a time, rank by rank); B's first 16 ranks of all 8 outputs load at once (rows
// hold maxRank >= 8 entries).
__device__ __forceinline__ void add_lora8(float* xv, const RowLora& l, int c) {
  const bf16* bb = l.B + (long long)8 * c * l.maxRank;
  const int rank = l.rank;
  float acc[8];
  uint4 b0[8], b1[8];
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const uint4* bi = reinterpret_cast<const uint4*>(bb + (long long)i * l.maxRank);
    b0[i] = bi[0];
    b1[i] = l.maxRank > 8 ? bi[1] : make_uint4(0u, 0u, 0u, 0u);
    acc[i] = 0.f;
  }
  float tq[16];
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const float4 f = q * 4 < l.maxRank ? reinterpret_cast<const float4*>(l.t)[q] : make_float4(0.f, 0.f, 0.f, 0.f);
    tq[4 * q] = f.x, tq[4 * q + 1] = f.y, tq[4 * q + 2] = f.z, tq[4 * q + 3] = f.w;
  }
#pragma unroll
  for (int i = 0; i < 8; i++) {
    float bf[8];
    unpack8(b0[i], bf);
#pragma unroll
    for (int q = 0; q < 8; q++) acc[i] = fmaf(q < rank ? bf[q] : 0.f, q < rank ? tq[q] : 0.f, acc[i]);
    unpack8(b1[i], bf);
#pragma unroll
    for (int q = 0; q < 8; q++) acc[i] = fmaf(8 + q < rank ? bf[q] : 0.f, 8 + q < rank ? tq[8 + q] : 0.f, acc[i]);
  }
  for (int r0 = 16; r0 < rank; r0 += 8) {
    const float4 t0 = reinterpret_cast<const float4*>(l.t + r0)[0], t1 = reinterpret_cast<const float4*>(l.t + r0)[1];
    const float tk[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
#pragma unroll
    for (int i = 0; i < 8; i++) {
      float bf[8];
      unpack8(reinterpret_cast<const uint4*>(bb + (long long)i * l.maxRank + r0)[0], bf);
#pragma unroll
      for (int q = 0; q < 8; q++) acc[i] = fmaf(r0 + q < rank ? bf[q] : 0.f, r0 + q < rank ? tk[q] : 0.f, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; i++) xv[i] += l.scale * acc[i];
}

// rr += xr (+ the row's LoRA term when LORA), then out = rmsnorm(rr) * w: the body of
// add_rmsnorm_f32_bf16 and add_rmsnorm_lora_f32_bf16 for one row.
template <bool LORA>
__device__ __forceinline__ void add_rmsnorm_row(bf16* __restrict__ out, float* __restrict__ rr, const float* __restrict__ xr,
                                                const bf16* __restrict__ w, int H, float eps, const RowLora& l) {
  float ss = 0.f;
  for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
    float4 a = reinterpret_cast<const float4*>(rr)[2 * c];
    float4 b = reinterpret_cast<const float4*>(rr)[2 * c + 1];
    float4 xa = reinterpret_cast<const float4*>(xr)[2 * c];
    float4 xb = reinterpret_cast<const float4*>(xr)[2 * c + 1];
    if constexpr (LORA) {
      if (l.rank > 0) {
        float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        add_lora8(xv, l, c);
        xa = make_float4(xv[0], xv[1], xv[2], xv[3]);
        xb = make_float4(xv[4], xv[5], xv[6], xv[7]);
      }
    }
    a.x += xa.x; a.y += xa.y; a.z += xa.z; a.w += xa.w;
    b.x += xb.x; b.y += xb.y; b.z += xb.z; b.w += xb.w;
    reinterpret_cast<float4*>(rr)[2 * c] = a;
    reinterpret_cast<float4*>(rr)[2 * c + 1] = b;
    ss += sumsq8(a, b);
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / (float)H + eps);
  normalize_row(out, rr, w, H, inv);
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
  add_rmsnorm_row<false>(out + (long long)row * H, residual + (long long)row * H, x + (long long)row * H, w, H, eps, RowLora{});
}

// add_rmsnorm_lora_f32_bf16 (INLAID_LORA_FOLD=1; experimental, not measured yet): as
// add_rmsnorm_f32_bf16, with the expand of the LoRA term of the linear that made x folded
// in, so the decode step has no expand kernel (and no copy of the base output):
//   x'[i][n] = x[i][n] + scale_s * sum_r B_s[n][r] * t[i][s * maxRank + r]   (rows with a slot s)
//   residual[i] += x'[i];  out[i] = bf16( f32(residual[i] * inv_i) * w )
// x f32 [cap, ldX] (the base output; ldX >= H: the bf16 path's widened GEMM output), t f32
// [cap, ldT] (the all-slots shrink, one output split), B bf16 [slots][H][maxRank], ranks
// and scales per slot, loraSlots / counts the step's (a row past counts[0] has none).
// The term sums in lora_bgmv_expand_slots' order (add_lora8). At most 512 threads (the B
// loads in flight want the registers): wider rows loop over chunks.
extern "C" __global__ void __launch_bounds__(512)
    add_rmsnorm_lora_f32_bf16(bf16* __restrict__ out, float* __restrict__ residual, const float* __restrict__ x,
                              const bf16* __restrict__ w, const int* __restrict__ live, int cap, int H, int ldX, float eps,
                              const float* __restrict__ t, int ldT, const bf16* __restrict__ B, const int* __restrict__ ranks,
                              const float* __restrict__ scales, const int* __restrict__ loraSlots,
                              const int* __restrict__ counts, int maxRank) {
  pdl_wait();
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const int slot = row < min(counts[0], cap) ? loraSlots[row] : -1;
  const int s = max(slot, 0);
  const RowLora l{B + (long long)s * H * maxRank, t + (long long)row * ldT + (long long)s * maxRank, slot >= 0 ? ranks[slot] : 0,
                  maxRank, slot >= 0 ? scales[slot] : 0.f};
  add_rmsnorm_row<true>(out + (long long)row * H, residual + (long long)row * H, x + (long long)row * ldX, w, H, eps, l);
}
