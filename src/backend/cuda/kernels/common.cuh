// Helpers shared by the kernel files: vector conversions, warp reductions, the sampling
// hash, and the tensor-core building blocks (cp.async, ldmatrix, mma.sync m16n8k16 bf16).
// NVRTC gets this header in memory from the driver layer (ffi/nvrtc.ts hands every *.cuh
// of this folder to each compile); nvcc finds it beside the .cu files. Device code only.

#pragma once

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

namespace inlaid {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Programmatic dependent launch (sm_90+). The host launches the kernels listed in
// ops.ts PDL_KERNELS with programmatic stream serialization, so such a kernel may start
// while the kernel before it on the stream is still running; pdl_wait() blocks until
// that one has completed and its writes are visible. Rules that keep this safe:
// - every PDL kernel calls pdl_wait() on every path, before it reads anything an earlier
//   kernel of the step wrote and before it writes anything (so its own completion still
//   implies its predecessor's, and a chain of them stays ordered);
// - work before the wait reads only what is fixed during a step (weights, adapter slots,
//   the step's metadata), never activations.
// pdl_wait() then triggers this kernel's own dependents (griddepcontrol.launch_dependents):
// the next PDL kernel may launch once every block of this one has passed its wait, instead
// of when they exit, so its launch latency and its pre-wait work overlap this kernel. That
// is safe by the first rule: the dependent still waits for this kernel's completion before
// touching activations, and every block of this one is already resident, so the early
// blocks only take what is left over. Compile with -DINLAID_PDL_TRIGGER=0
// (INLAID_PDL_TRIGGER=0 in the environment) to trigger at exit instead.
// Without PDL (older GPUs, INLAID_PDL=0) the wait is a no-op: the stream orders kernels.
#ifndef INLAID_PDL_TRIGGER
#define INLAID_PDL_TRIGGER 1
#endif
// pdl_wait<false>() waits without the early trigger (its dependents launch as it exits):
// the fused low-bit GEMM uses it, since with the trigger the 4-bit Llama-2-7B decode step
// measured slower (7.48 ms against 7.18 ms with no kernel triggering, H100).
template <bool kTrigger = true>
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#if INLAID_PDL_TRIGGER
  if (kTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#endif
}

// Live row count of a launch over `cap` rows: *live (an i32 in device memory) or cap.
__device__ __forceinline__ int live_rows(const int* live, int cap) { return live ? min(*live, cap) : cap; }

__device__ __forceinline__ void unpack8(const uint4 u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// lowbias32 (src/backend/rng.ts hash32).
__device__ __forceinline__ unsigned hash32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// src/backend/rng.ts uniform(seed, counter): 24 random bits, k / 2^24 (exact in f32 and f64).
__device__ __forceinline__ unsigned uniform_bits(unsigned seed, unsigned counter) {
  return hash32(hash32(seed) ^ ((counter + 1u) * 0x9e3779b9u)) >> 8;
}

// ---- tensor-core building blocks

// Shared-memory address of a generic pointer (PTX cvta, so no runtime header is needed).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// Shared-memory operands below are 32-bit shared-space byte addresses: a kernel converts
// its buffers' base once (smem_addr) and adds byte offsets, so address math stays 32-bit.

// 16-byte async copy global -> shared. When !valid the 16 bytes are zero-filled and
// nothing is read (src must still be a mapped address).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile: a = 4 regs (row-major A 16x16), b = 2 regs (B 16x8), f32 d.
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix lane addresses over a row-major bf16 tile at shared address `base`, row pitch
// `ld` elements:
//  - a_frag: A operand, 16 rows x 16 cols at (r0, c0) -> regs a0..a3
//  - bt_frag: B operand from a tile holding B^T (n rows x k cols, e.g. K rows for Q K^T):
//    rows n0..n0+15, k-step c0..c0+15 -> {b0, b1} of n-tile n0, then {b0, b1} of n-tile n0+8
//  - b_trans_frag (with ldmatrix .trans): B stored as k rows x n cols (e.g. V rows for P V):
//    k rows r0..r0+15, cols n0..n0+15 -> {b0, b1} of n-tile n0, then of n-tile n0+8
__device__ __forceinline__ unsigned a_frag(unsigned base, int ld, int r0, int c0, int lane) {
  return base + 2u * (unsigned)((r0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ld + c0 + ((lane >> 4) << 3));
}
__device__ __forceinline__ unsigned bt_frag(unsigned base, int ld, int n0, int c0, int lane) {
  return base + 2u * (unsigned)((n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + c0 + (((lane >> 3) & 1) << 3));
}
__device__ __forceinline__ unsigned b_trans_frag(unsigned base, int ld, int r0, int n0, int lane) {
  return base + 2u * (unsigned)((r0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ld + n0 + ((lane >> 4) << 3));
}

// The sequence s with queryStart[s] <= t < queryStart[s + 1] (binary search; t < queryStart[n]).
__device__ __forceinline__ int seq_of_row(const int* queryStart, int n, int t) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (queryStart[mid] <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Thread-block clusters (sm_90+): a CTA's rank in its cluster, a cluster-wide barrier in
// two halves (arrive, then wait, so independent work can run in between), and a load from
// another CTA's shared memory (distributed shared memory).
__device__ __forceinline__ unsigned cluster_ctarank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
__device__ __forceinline__ float ld_cluster_f32(const float* smem, unsigned ctaRank) {
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(smem)), "r"(ctaRank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

}  // namespace inlaid
