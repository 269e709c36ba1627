// Buffer utilities for the driver layer: dtype conversion, constant fill, and the
// device-side random fill behind `--load-format dummy` (7B-shaped models without host work).
//
//   convert_f32_to_bf16(out bf16 [n], in f32 [n], n)   round to nearest even (NaN stays NaN)
//   convert_bf16_to_f32(out f32 [n], in bf16 [n], n)   exact
//   convert_f16_to_bf16(out bf16 [n], in f16 [n], n)   via f32, round to nearest even
//   convert_f16_to_f32(out f32 [n], in f16 [n], n)     exact
//   fill_u32(p u32 [n], n, value)                      e.g. zero fill: value 0, n = bytes / 4
//   fill_u16(p u16 [n], n, value)                      e.g. a bf16 constant's bits
//   fill_random_bf16(p bf16 [n], n, seed, aHi, aLo)   p[i] = bf16(f32(a * (2 * uniform(seed, i) - 1)))
//   fill_random_f32(p f32 [n], n, seed, aHi, aLo)     p[i] =      f32(a * (2 * uniform(seed, i) - 1))
//       a = std * sqrt(3) is an f64 computed on the host and passed as its two 32-bit halves;
//       the product is taken in f64 and rounded once to f32 (then to bf16), exactly what the
//       CPU backend's fillRandom computes in JavaScript, so both backends get identical
//       dummy weights. uniform() is src/backend/rng.ts bit for bit. Uniform on [-a, a):
//       mean 0, standard deviation std.
//
// n is a u32 element count; every kernel is a grid-stride loop, so any grid covers any n.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/utility.cubin utility.cu

#include <cuda_fp16.h>

#include "common.cuh"

using namespace inlaid;

namespace {

__device__ __forceinline__ unsigned long long gstride() { return (unsigned long long)gridDim.x * blockDim.x; }
__device__ __forceinline__ unsigned long long gindex() { return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; }

__device__ __forceinline__ float dummy_value(unsigned seed, unsigned i, double a) {
  const double u = (double)uniform_bits(seed, i) * (1.0 / 16777216.0);
  return (float)(a * (2.0 * u - 1.0));
}

}  // namespace

extern "C" __global__ void convert_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, unsigned n) {
  for (unsigned long long i = gindex(); i < n; i += gstride()) out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void convert_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ in, unsigned n) {
  for (unsigned long long i = gindex(); i < n; i += gstride()) out[i] = __bfloat162float(in[i]);
}

extern "C" __global__ void convert_f16_to_bf16(bf16* __restrict__ out, const __half* __restrict__ in, unsigned n) {
  for (unsigned long long i = gindex(); i < n; i += gstride()) out[i] = __float2bfloat16_rn(__half2float(in[i]));
}

extern "C" __global__ void convert_f16_to_f32(float* __restrict__ out, const __half* __restrict__ in, unsigned n) {
  for (unsigned long long i = gindex(); i < n; i += gstride()) out[i] = __half2float(in[i]);
}

extern "C" __global__ void fill_u32(unsigned* __restrict__ p, unsigned n, unsigned value) {
  for (unsigned long long i = gindex(); i < n; i += gstride()) p[i] = value;
}

extern "C" __global__ void fill_u16(unsigned short* __restrict__ p, unsigned n, unsigned value) {
  const unsigned short v = (unsigned short)value;
  for (unsigned long long i = gindex(); i < n; i += gstride()) p[i] = v;
}

extern "C" __global__ void fill_random_bf16(bf16* __restrict__ p, unsigned n, unsigned seed, unsigned aHi, unsigned aLo) {
  const double a = __hiloint2double((int)aHi, (int)aLo);
  for (unsigned long long i = gindex(); i < n; i += gstride()) p[i] = __float2bfloat16_rn(dummy_value(seed, (unsigned)i, a));
}

extern "C" __global__ void fill_random_f32(float* __restrict__ p, unsigned n, unsigned seed, unsigned aHi, unsigned aLo) {
  const double a = __hiloint2double((int)aHi, (int)aLo);
  for (unsigned long long i = gindex(); i < n; i += gstride()) p[i] = dummy_value(seed, (unsigned)i, a);
}
