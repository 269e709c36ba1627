// Low-bit GEMM for GPTQ weights: the dequantization happens inside the matmul.
// Reference: the dense matmul of the dequantized weight (src/backend/cpu/cpu_backend.ts
// linearQuantized; quant/types.ts dequantize).
//
// Semantics:
//   quant_gemm_b{B}_t{T}_c{S}: out[m, n] (f32) = sum_k x[m, k] * W[n, k] (+ bias[n])
//   quant_gemm_k_b{B}_d{D}:    the same for up to 8 rows, K split across one CTA's warps
//   quant_dequant_b{B}:        w[n - 32*col0, k] (bf16) = bf16(W[n, k]) for the chunk's columns
//   quant_gather_cols:         xp[m, i] = x[m, perm[i]]       (act-order: x in the weights' k order)
// with W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n]) in the kernel's k order (the host
// permuted act-order rows into group order: g(k) = k / gs). x bf16 [rows, K] (a matmul
// input), out f32 [rows, N] (a matmul output), bias f32 [N] or null.
//
// Layout (built on the host, once: src/backend/cuda/quant_layout.ts, which says it bit by
// bit and has a CPU emulation of these kernels that its tests check against the dense
// matmul). N is cut into columns of 32 outputs (one warp's tile: two n16 mma tiles) and K
// into units of 128 (K is padded up; x past K is zero-filled). For each (column, unit)
// every lane of the warp owns B (= bits) 16-byte words holding the 128 codes it needs as
// mma A fragments (W is the A operand, rows = n; x is the B operand, columns = tokens): 16
// tiles of 16 n x 16 k, 8 codes each. Consecutive lanes' words are consecutive, so a warp's
// copy of a unit is B fully coalesced 512-byte rows:
//   qw     uint4 [N/32][K/128 (padded)][B][32 lanes]
//   scales fp16  [G][N/32][8][4]  entry (g, col, r): s of outputs col*32 + {r, r+8, r+16, r+24}
//   zeros  u8    [G][N/32][8][4]  same order; null when every zero is 2^(B-1) (symZero)
// Inside a 32-k block the k order is permuted so that each lane reads its x fragment as
// one 16-byte load of 8 consecutive k (x[m, 8c .. 8c+7] for lane column c): mma row r of
// step s maps to k = 8*(r%8/2) + 4s + 2*(r/8) + r%2. W uses the same map.
//
// Dequantization (bits <= 4): a code pair becomes bf16x2 (128 + q) with one AND/OR
// ((w >> shift) & mask) | 0x43004300 (bf16 128.0 has an exponent where the low mantissa
// bits count units), then one bf16x2 FMA adds -(128 + z): exactly q - z. 8 bits: integer
// subtract and convert. The weights reach the tensor cores as exact small integers; the
// f32 scale multiplies the f32 accumulator once per group (per-group partial sums in
// `tmp`, folded into `acc` when the group changes). So the only rounding is x's (bf16, a
// matmul input) and f32 accumulation: closer to the f32 dequantized reference than a
// dense bf16 weight is (that one rounds every weight to bf16).
//
// quant_gemm_b{B}_t{T}_c{S}, and quant_gemm_b4_t4_w4_c{S} (the same loop with launch bounds for
// 4-warp CTAs; instantiated at the end of the file). Decode shapes: rows <= 32, T = token tiles
// of 8 rows; larger row counts run m-blocks of 32 rows, T = 4. Launch: grid (m-blocks,
// ceil(N/32/NW), S), NW = 4 or 8 warps (the launch's block size), one 32-output column per warp. A CTA streams its
// columns' units of its k range through a ring of R (3) stages in shared memory with cp.async
// (R - 1 units in flight while one is computed: the bytes in flight hide the memory
// latency); a stage holds every warp's weight words and scale / zero entries and ONE x
// tile (8T rows x 128 k) that all NW warps read (x in global memory is read once per CTA,
// not once per warp: at 32 rows x is 4x the bytes of a warp's 4-bit weights). One barrier
// per unit. Per 32-k block a warp reads its B words of the block and T x fragments from
// shared memory and runs 2 x 2 x T mma.sync m16n8k16.
// What bounds the loop at decode sizes is each warp's latency per unit, not the bytes in
// flight (an H100 sweep: time grew ~0.5-0.8 us per unit a warp streams, also with DRAM mostly
// idle), so the loop keeps that path short: no integer division (the groups of the copies
// and of the computed unit are tracked incrementally), a unit that lies in one group (every
// unit when gs is a multiple of 128) runs its 4 blocks with no branch between them (at most
// one scale fold, before them), copy addresses are computed once, and with T = 1 the group's
// partial sums are split by 16-k step parity (two mma chains of 4 instead of one of 8). The
// ring is shallow (3 stages) so that more CTAs fit an SM (more warps hide each one's latency).
// Split-K (S > 1; deterministic, graph-capturable, no global scratch): the S CTAs of one
// (m-block, column tile) are a thread-block cluster (1, 1, S); each sums a contiguous
// range of units, parks its f32 tile in its shared memory, and after a cluster barrier
// each CTA adds up a share of the tile's values over the S CTAs in rank order 0..S-1
// (through distributed shared memory), adds the bias and writes out. The result does not
// depend on timing.
// Programmatic dependent launch: the weights of the first R - 1 units (fixed during a
// step) are requested before pdl_wait(); x only after it (see common.cuh).
//
// quant_dequant_b{B} (the prefill path for many rows: dequantize a chunk of columns to
// bf16, then cuBLASLt): grid (K/128 padded, ceil(ncols/4)), 128 threads; a warp expands one
// (column, unit) into a 32 x 128 tile in shared memory and writes it out as 16-byte rows.
// Each weight is bf16(s * (q - z)), rounded once (as the CPU path's dequantized load).
//
// quant_gather_cols: grid (rows, ceil(K / 2048)), 256 threads, 8 columns per thread.
//
// Requirements (the host checks them): K % 32 == 0, N % 32 == 0, gs % 32 == 0 (gs = K
// for one group), x and out 16-byte aligned.
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin --resource-usage -o /tmp/quant_gemm.cubin quant_gemm.cu

#include <cuda_fp16.h>

#include "common.cuh"

using namespace inlaid;

namespace {

constexpr int kDqWarps = 4;  // warps per CTA of quant_dequant
constexpr unsigned kMagic = 0x43004300u;  // bf16x2 {128, 128}
constexpr unsigned kOne2 = 0x3f803f80u;   // bf16x2 {1, 1}

// The fused kernel's CTA: up to kMaxWarps warps (the launch picks 4 or 8), one 32-output
// column each. Its shared memory is a ring of kRing stages, one unit of 128 k each: per warp B x
// 32 lanes of weight words, 4 blocks x 8 entries x 8 B of scales (256 B) and x 4 B of zeros
// (128 B); then the CTA's x tile (8T rows x 128 k bf16). Three stages (two units in flight
// while one is computed) already hold more bytes in flight per SM than the memory latency
// needs; a shallow ring leaves room for more CTAs per SM (quant_ops.ts ctasPerSm), and the
// loop is bound by each warp's per-unit latency, which more warps per SM hide. Wide stages
// (8 bits) get two stages where three 8-warp ones would not fit kRingBudget (two CTAs per SM).
// quant_ops.ts ringSlots mirrors kRing.
constexpr int kMaxWarps = 8;
constexpr int kRingBudget = 112 * 1024;
template <int BITS, int T>
struct QCfg {
  static constexpr int kWarpBytes = BITS * 512 + 384;
  static constexpr int kScaleOff = BITS * 512;
  static constexpr int kZeroOff = BITS * 512 + 256;
  static constexpr int kXBytes = 2048 * T;
  static constexpr int kStageMax = kMaxWarps * kWarpBytes + kXBytes;
  static constexpr int kRing = kRingBudget / kStageMax >= 3 ? 3 : 2;
};

__device__ __forceinline__ void cp_async8(unsigned dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ uint4 lds128(unsigned addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(unsigned addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ unsigned lds32(unsigned addr) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
// Weight words are read once: keep them out of L1 (x lives there).
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Read-only global loads (scales, zeros, perm: L1-cached). Inline PTX rather than __ldg /
// __byte_perm, so the file needs no intrinsic headers.
__device__ __forceinline__ uint4 ldg_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ldg_v2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned ldg_u32(const void* p) {
  unsigned v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ unsigned bf16x2_fma(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// bf16x2 {128 + lo, 128 + hi} of pair i (0..3) of tile tau (0..15) of a lane's words.
// The packing (quant_layout.ts packLane) puts each pair's two codes in the two 16-bit halves.
// A 32-k block j holds tiles 4j..4j+3 in words jB..jB+B-1 for every width, so the same
// formulas read one block from its own B words with tau - 4j (block_words).
template <int BITS>
__device__ __forceinline__ unsigned magic_pair(const unsigned* w, int tau, int i) {
  if constexpr (BITS == 4) {
    // word tau: pair i at bits 4i (lo) and 16 + 4i (hi)
    return ((w[tau] >> (4 * i)) & 0x000f000fu) | kMagic;
  } else if constexpr (BITS == 2) {
    // word tau/2: field f = (tau%2)*4 + i at bits 2f and 16 + 2f
    const int f = (tau & 1) * 4 + i;
    return ((w[tau >> 1] >> (2 * f)) & 0x00030003u) | kMagic;
  } else {
    // 3 bits: 4 tiles (16 pairs) per 3 words. Pair p < 15: word p/5, field p%5 at bits 3f
    // and 16 + 3f; pair 15 is spread over bits 15 (lo) and 31 (hi) of the three words.
    const int q = tau >> 2, p = (tau & 3) * 4 + i;
    if (p < 15) return ((w[3 * q + p / 5] >> (3 * (p % 5))) & 0x00070007u) | kMagic;
    return ((w[3 * q] >> 15) & 0x00010001u) | ((w[3 * q + 1] >> 14) & 0x00020002u) | ((w[3 * q + 2] >> 13) & 0x00040004u) |
           kMagic;
  }
}

// The A fragment of tile tau: a[i] = bf16x2 {q - z, q' - z} of pair i, rows g (i = 0, 2) and
// g + 8 (i = 1, 3). nzLo / nzHi: bf16x2 -(128 + z) of those rows (bits <= 4) or z (8 bits).
template <int BITS>
__device__ __forceinline__ void dequant_tile(const unsigned* w, int tau, unsigned nzLo, unsigned nzHi, unsigned* a) {
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const unsigned nz = (i & 1) ? nzHi : nzLo;
    if constexpr (BITS == 8) {
      // word 2*tau + i/2: pair i at bytes 2*(i%2) (lo) and 2*(i%2) + 1 (hi)
      const unsigned word = w[2 * tau + (i >> 1)];
      const int sh = 16 * (i & 1);
      const int lo = (int)((word >> sh) & 0xffu), hi = (int)((word >> (sh + 8)) & 0xffu);
      a[i] = pack_bf16x2((float)(lo - (int)nz), (float)(hi - (int)nz));
    } else {
      a[i] = bf16x2_fma(magic_pair<BITS>(w, tau, i), kOne2, nz);
    }
  }
}

// Zero terms of the 4 rows of a lane (nt0 g, nt0 g+8, nt1 g, nt1 g+8) from a zero entry.
template <int BITS>
__device__ __forceinline__ void zero_terms(unsigned zw, unsigned* nz) {
#pragma unroll
  for (int r = 0; r < 4; r++) {
    if constexpr (BITS == 8) {
      nz[r] = (zw >> (8 * r)) & 0xffu;
    } else {
      // bytes {z_r, 0xC3, z_r, 0xC3}: bf16x2 -(128 + z_r) (z_r < 128)
      nz[r] = prmt(zw, 0xC3u, 0x4040u + 0x0101u * r);
    }
  }
}

template <int BITS>
__device__ __forceinline__ void sym_terms(int symZero, unsigned* nz) {
  const unsigned z = (unsigned)symZero & 0xffu;
  const unsigned zw = z | (z << 8) | (z << 16) | (z << 24);
  zero_terms<BITS>(zw, nz);
}

__device__ __forceinline__ void scale_terms(uint2 sv, float* sc) {
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&sv.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&sv.y));
  sc[0] = a.x;
  sc[1] = a.y;
  sc[2] = b.x;
  sc[3] = b.y;
}

// The B words of a lane for 32-k block j (tiles 4j..4j+3) from its slot in a stage: word w
// of the lane lives at plane w / 4, component w % 4 (16-byte planes of 32 lanes).
template <int BITS>
__device__ __forceinline__ void block_words(unsigned wslot, int lane, int j, unsigned* w) {
  const unsigned base = wslot + (unsigned)(lane * 16);
  if constexpr (BITS == 4) {
    const uint4 v = lds128(base + (unsigned)(j * 512));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 v = lds128(base + (unsigned)(2 * j * 512)), u = lds128(base + (unsigned)((2 * j + 1) * 512));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w, w[4] = u.x, w[5] = u.y, w[6] = u.z, w[7] = u.w;
  } else if constexpr (BITS == 2) {
    const uint2 v = lds64(base + (unsigned)((j >> 1) * 512 + (j & 1) * 8));
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < 3; i++) {
      const int wi = 3 * j + i;
      w[i] = lds32(base + (unsigned)((wi >> 2) * 512 + (wi & 3) * 4));
    }
  }
}

__device__ __forceinline__ void cp_async8z(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0));
}

// quant_gemm_lora's shrink CTAs, one unit: warp w runs the 16-k steps st8 = w, w + NW, ... (of 8)
// of the stage's A rows (issueA's layout) against the x tile. Lane (g, c) reads 8 bytes of A
// rows g and g + 8: A[row, 32j + 8c + 4sp .. + 3], the k its x fragment holds for that step
// (the permuted k order of the file's header), so the bf16 values are the mma A fragment as
// they are, like the codes after dequant_tile.
template <int T>
__device__ __forceinline__ void shrink_unit(unsigned st, unsigned xs, int warp, int NW, int lane, float (&acc)[2][T][4]) {
  const int g = lane >> 2, c4 = lane & 3;
  for (int st8 = warp; st8 < 8; st8 += NW) {
    const int j = st8 >> 1;
    uint4 xv[T];
#pragma unroll
    for (int t = 0; t < T; t++) xv[t] = lds128(xs + (unsigned)((((4 * t + j) * 32) + lane) * 16));
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
      const unsigned r0 = st + (unsigned)(((st8 * 32 + nt * 16 + g) * 4 + c4) * 8);
      const uint2 lo = lds64(r0), hi = lds64(r0 + 8 * 4 * 8);
      const unsigned a[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
      for (int t = 0; t < T; t++) mma_bf16(acc[nt][t], a, (st8 & 1) ? xv[t].z : xv[t].x, (st8 & 1) ? xv[t].w : xv[t].y);
    }
  }
}

// The shrink CTA's result: its warps' partial sums (each ran some of the k steps) added in
// warp order, then (C > 1) the cluster's k splits in rank order through distributed shared
// memory, as the quantized tiles' split-K: deterministic. lt[row, n] for n = 32 acol + 0..31.
template <int T, int C>
__device__ __forceinline__ void shrink_store(const float (&acc)[2][T][4], float* __restrict__ lt, int rows, int NA, int ldT, int acol,
                                             int row0, int NW, int warp, int lane) {
  extern __shared__ __align__(16) unsigned char qsmem[];
  constexpr int E = 8 * T * 32;  // values of a 32 x 8T tile: v = (nt * T + t) * 4 + e, then the lane
  __syncthreads();  // every warp is done reading the ring
  float* part = reinterpret_cast<float*>(qsmem);  // [NW][E]
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
      for (int e = 0; e < 4; e++) part[warp * E + ((nt * T + t) * 4 + e) * 32 + lane] = acc[nt][t][e];
  __syncthreads();
  auto store = [&](int i, float v) {
    const int vi = i >> 5, ln = i & 31, e = vi & 3, nt = (vi >> 2) / T, t = (vi >> 2) % T;
    const int n = 32 * acol + nt * 16 + (ln >> 2) + 8 * (e >> 1), row = row0 + 8 * t + 2 * (ln & 3) + (e & 1);
    if (row < rows && n < NA) lt[(long long)row * ldT + n] = v;
  };
  float* red = part + NW * E;  // [E]: this CTA's sums (C > 1)
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < NW; w++) sum += part[w * E + i];
    if constexpr (C == 1) store(i, sum);
    else red[i] = sum;
  }
  if constexpr (C > 1) {
    cluster_arrive();
    cluster_wait();  // every CTA's sums are written and visible
    for (int i = (int)(blockIdx.z * blockDim.x + threadIdx.x); i < E; i += C * (int)blockDim.x) {
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < C; q++) sum += ld_cluster_f32(red + i, (unsigned)q);
      store(i, sum);
    }
    cluster_arrive();
    cluster_wait();  // no CTA leaves while another still reads its shared memory
  }
}

// One 32-k block of a warp's column: dequantize its 4 tiles (words w) and run them against the
// T x fragments xv (xv[t].x/.y: the first 16-k step, .z/.w: the second) into the group's
// partial sums (set st2 % P).
template <int BITS, int T, int P>
__device__ __forceinline__ void block_mma(const unsigned* w, const uint4* xv, const unsigned* nz, float (&tmp)[P][2][T][4]) {
#pragma unroll
  for (int st2 = 0; st2 < 2; st2++) {
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
      unsigned a[4];
      dequant_tile<BITS>(w, 2 * st2 + nt, nz[2 * nt], nz[2 * nt + 1], a);
#pragma unroll
      for (int t = 0; t < T; t++) mma_bf16(tmp[st2 % P][nt][t], a, st2 ? xv[t].z : xv[t].x, st2 ? xv[t].w : xv[t].y);
    }
  }
}

// A group's end: acc += scale * (its partial sums), partial sums back to 0.
template <int T, int P>
__device__ __forceinline__ void fold_group(float (&acc)[2][T][4], float (&tmp)[P][2][T][4], const float* sc) {
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float v = tmp[0][nt][t][e];
#pragma unroll
        for (int pp = 1; pp < P; pp++) v += tmp[pp][nt][t][e];
        acc[nt][t][e] = fmaf(sc[2 * nt + (e >> 1)], v, acc[nt][t][e]);
#pragma unroll
        for (int pp = 0; pp < P; pp++) tmp[pp][nt][t][e] = 0.f;
      }
}

// The quantized tile's result: acc[nt][t][e] is output n = col*32 + nt*16 + g + 8*(e/2), row =
// row0 + 8t + 2c + e%2. C == 1: written out (+ bias). C > 1 (split-K inside the cluster): each
// CTA parks its partial tile in its own shared memory (the ring, no longer needed), and CTA `s`
// sums value slots v = s, s + C, ... of every CTA in rank order 0..C-1 (the same order whichever
// CTA finished first: deterministic), reading the others through distributed shared memory. No
// global scratch, no counters. Every thread of the CTA calls it (barriers inside when C > 1);
// `active`: the warp owns a column.
template <int T, int C>
__device__ __forceinline__ void store_tile(const float (&acc)[2][T][4], float* __restrict__ out, const float* __restrict__ bias, int rows,
                                           int N, int col, bool active, int row0, int warp, int lane, int s) {
  extern __shared__ __align__(16) unsigned char qsmem[];
  const int g = lane >> 2, c4 = lane & 3;
  const int nb = col * 32 + g;
  if constexpr (C == 1) {
    if (!active) return;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int n = nb + nt * 16 + 8 * (e >> 1);
        const float b = bias ? bias[n] : 0.f;
#pragma unroll
        for (int t = 0; t < T; t++) {
          const int row = row0 + 8 * t + 2 * c4 + (e & 1);
          if (row < rows) out[(long long)row * N + n] = acc[nt][t][e] + b;
        }
      }
  } else {
    __syncthreads();  // every warp is done reading the ring
    float* part = reinterpret_cast<float*>(qsmem);  // [warps][8T values v = (nt*T + t)*4 + e][32 lanes]
    if (active) {
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int t = 0; t < T; t++)
#pragma unroll
          for (int e = 0; e < 4; e++) part[(warp * 8 * T + (nt * T + t) * 4 + e) * 32 + lane] = acc[nt][t][e];
    }
    cluster_arrive();
    cluster_wait();  // every CTA's partials are written and visible
    if (active) {
#pragma unroll
      for (int v0 = 0; v0 < 8 * T; v0 += C) {
        const int v = v0 + s;
        if (v >= 8 * T) break;
        const int e = v & 3, nt = (v >> 2) / T, t = (v >> 2) % T;
        const int n = nb + nt * 16 + 8 * (e >> 1), row = row0 + 8 * t + 2 * c4 + (e & 1);
        const float* p = part + (warp * 8 * T + v) * 32 + lane;
        float sum = 0.f;
#pragma unroll
        for (int q = 0; q < C; q++) sum += ld_cluster_f32(p, (unsigned)q);
        if (row < rows) out[(long long)row * N + n] = sum + (bias ? bias[n] : 0.f);
      }
    }
    cluster_arrive();
    cluster_wait();  // no CTA leaves while another still reads its shared memory
  }
}

template <int BITS, int T, int C, bool L>
__device__ __forceinline__ void quant_gemm(float* __restrict__ out, const bf16* __restrict__ x, const uint4* __restrict__ qw,
                                           const uint2* __restrict__ scales, const unsigned* __restrict__ zeros,
                                           const float* __restrict__ bias, const int* __restrict__ live, int rows, int K, int N,
                                           int gs, int G, int symZero, const bf16* __restrict__ la, float* __restrict__ lt, int NA,
                                           int ldT) {
  using Q = QCfg<BITS, T>;
  constexpr int R = Q::kRing;
  extern __shared__ __align__(16) unsigned char qsmem[];
  const int NW = (int)(blockDim.x >> 5);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int NC = N >> 5, KU = (K + 127) >> 7;
  const int col = blockIdx.y * NW + warp;
  // Warps past the last column copy x and meet every barrier, but compute nothing.
  const bool active = col < NC;
  const int mb = blockIdx.x, s = blockIdx.z;  // s: the k split, = the CTA's rank in its cluster (1, 1, C)
  const int row0 = mb * 8 * T;
  const int u0 = (s * KU) / C, u1 = ((s + 1) * KU) / C;
  const int stageBytes = NW * Q::kWarpBytes + Q::kXBytes;
  const unsigned ring = smem_addr(qsmem);

  // Weight copies: the warp's words of unit u start at wsrc + (u - u0) * B * 32 (lane included).
  // Lane L copies scale / zero entry (block L/8, row L%8) of each unit; its group is tracked
  // incrementally (cGi, the group of k = 128u + 32(L/8), and cNext, where the next one starts:
  // no division in the loop). Groups are runs of gs inputs, the last one clamped (G - 1).
  const uint4* wsrc = qw + ((long long)(active ? col : 0) * KU + u0) * (BITS * 32) + lane;
  const unsigned wdst = (unsigned)(warp * Q::kWarpBytes);
  const int ckOff = (lane >> 3) * 32;
  int cGi = min((u0 * 128 + ckOff) / gs, G - 1);
  int cNext = (cGi + 1) * gs;
  const int eBase = col * 8 + (lane & 7);
  auto issueWeights = [&](int u, int slot) {
    if (!active || u >= u1) return;
    const unsigned dst = ring + (unsigned)(slot * stageBytes) + wdst;
    const uint4* src = wsrc + (long long)(u - u0) * (BITS * 32);
#pragma unroll
    for (int p = 0; p < BITS; p++) cp_async16(dst + (unsigned)((p * 32 + lane) * 16), src + p * 32, true);
    const int k = u * 128 + ckOff;
    while (k >= cNext && cGi < G - 1) {
      cGi++;
      cNext += gs;
    }
    const long long e = (long long)cGi * (NC * 8) + eBase;
    cp_async8(dst + Q::kScaleOff + lane * 8, scales + e);
    if (zeros) cp_async4(dst + Q::kZeroOff + lane * 4, zeros + e);
  };

  // Prologue. The first R - 1 units' weights are fixed during a step, so they are requested
  // before pdl_wait() (under programmatic dependent launch, while the kernel before this one
  // finishes); x is the previous kernel's output, read only after it. One commit group per
  // unit: group 0 also holds the early weights, so waiting for group i covers unit i. m-blocks
  // past the live rows return after the wait (the weights they asked for are harmless reads);
  // the whole cluster shares the m-block, so it returns as one (the cluster barriers below see
  // all of it or none).
  // quant_gemm_lora: CTAs past the quantized column tiles make the LoRA shrink (shrink_unit).
  const bool shrinkCta = L && (int)blockIdx.y * NW >= NC;
  const int acol = (int)blockIdx.y - (NC + NW - 1) / NW;  // the shrink CTA's 32 rows of A: 32 * acol ..
  // Lane-spread 8-byte copies of A for unit u (what shrink_unit reads): chunk q = row * 32 + p
  // holds A[32 acol + row, 128u + 4p .. + 3] (consecutive threads, consecutive global bytes);
  // it lands at ((st8 * 32 + row) * 4 + c) * 8 in the stage, st8 = 2j + sp the 16-k step
  // (p = 8j + 2c + sp: block j, lane column c, step parity sp). Rows past NA and k past K
  // are zero-filled.
  auto issueA = [&](int u, int slot) {
    if constexpr (L) {
      if (u >= u1) return;
      const unsigned dst = ring + (unsigned)(slot * stageBytes);
      for (int q = threadIdx.x; q < 1024; q += blockDim.x) {
        const int row = q >> 5, pp = q & 31, n = 32 * acol + row, k = u * 128 + 4 * pp;
        const int st8 = 2 * (pp >> 3) + (pp & 1), c = (pp >> 1) & 3;
        const bool ok = n < NA && k < K;
        cp_async8z(dst + (unsigned)(((st8 * 32 + row) * 4 + c) * 8), ok ? la + (long long)n * K + k : la, ok);
      }
    }
  };
#pragma unroll
  for (int i = 0; i < R - 1; i++) {
    if (shrinkCta) issueA(u0 + i, i);
    else issueWeights(u0 + i, i);
  }
  pdl_wait<false>();  // no early trigger (common.cuh)
  const int nLive = live_rows(live, rows);
  if (row0 >= nLive) {
    cp_async_commit();
    cp_async_wait<0>();  // no copy may land in shared memory after the CTA has left
    return;
  }
  const int xRows = min(nLive - row0, 8 * T);  // x rows past these are zero-filled, not read

  // x copies: 16-byte chunk q = (4t + j) * 32 + L of a stage's x tile holds what lane L feeds
  // token tile t in 32-k block j: x[row0 + 8t + L/4, 128u + 32j + 8(L%4) .. + 7]. Thread i copies
  // chunks i + c * blockDim (c < kXPer); blockDim is a multiple of 128, so all of a thread's
  // chunks share k (xk) and lie 8 * blockDim / 128 rows apart (from xr0).
  constexpr int kXChunks = 128 * T;
  constexpr int kXPer = (kXChunks + 127) / 128;  // per thread with >= 4 warps
  const int xq = threadIdx.x & 127;
  const int xk = 32 * ((xq >> 5) & 3) + 8 * (xq & 3);
  const int xr0 = 8 * (int)(threadIdx.x >> 7) + ((xq & 31) >> 2), xrStep = 8 * (int)(blockDim.x >> 7);
  auto issueX = [&](int u, int slot) {
    if (u >= u1) return;
    const unsigned xs = ring + (unsigned)(slot * stageBytes + NW * Q::kWarpBytes);
    const bool kOk = u * 128 + xk < K;
#pragma unroll
    for (int c = 0; c < kXPer; c++) {
      const int q = threadIdx.x + c * (int)blockDim.x, r = xr0 + c * xrStep;
      if (q < kXChunks) {
        const bool ok = kOk && r < xRows;
        cp_async16(xs + (unsigned)(q * 16), ok ? x + (long long)(row0 + r) * K + u * 128 + xk : x, ok);
      }
    }
  };
#pragma unroll
  for (int i = 0; i < R - 1; i++) {
    issueX(u0 + i, i);
    cp_async_commit();
  }
  if constexpr (L) {
    if (shrinkCta) {
      float sacc[2][T][4];
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int t = 0; t < T; t++)
#pragma unroll
          for (int e = 0; e < 4; e++) sacc[nt][t][e] = 0.f;
      for (int u = u0; u < u1; u++) {
        const int it = u - u0;
        cp_async_wait<R - 2>();
        __syncthreads();
        issueA(u + R - 1, (it + R - 1) % R);
        issueX(u + R - 1, (it + R - 1) % R);
        cp_async_commit();
        const unsigned st = ring + (unsigned)((it % R) * stageBytes);
        shrink_unit<T>(st, st + (unsigned)(NW * Q::kWarpBytes), warp, NW, lane, sacc);
      }
      cp_async_wait<0>();
      shrink_store<T, C>(sacc, lt, rows, NA, ldT, acol, row0, NW, warp, lane);
      return;
    }
  }

  // Per-group partial sums: T == 1 keeps two (by 16-k step parity) so that a unit's mma chain
  // is 4 deep instead of 8; they are added when the group's scale folds them into acc.
  constexpr int P = T == 1 ? 2 : 1;
  float acc[2][T][4], tmp[P][2][T][4];
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        acc[nt][t][e] = 0.f;
#pragma unroll
        for (int pp = 0; pp < P; pp++) tmp[pp][nt][t][e] = 0.f;
      }
  float sc[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned nz[4];
  sym_terms<BITS>(symZero, nz);
  int curG = -1;
  auto flush = [&]() { fold_group<T, P>(acc, tmp, sc); };
  auto loadGroup = [&](unsigned wslot, int j) {
    scale_terms(lds64(wslot + Q::kScaleOff + (j * 8 + g) * 8), sc);
    if (zeros) zero_terms<BITS>(lds32(wslot + Q::kZeroOff + (j * 8 + g) * 4), nz);
  };
  // One 32-k block: dequantize its 4 tiles and run them against the T x fragments.
  auto block = [&](unsigned wslot, unsigned xs, int j) {
    unsigned w[BITS];
    block_words<BITS>(wslot, lane, j, w);
    uint4 xv[T];
#pragma unroll
    for (int t = 0; t < T; t++) xv[t] = lds128(xs + (unsigned)((((4 * t + j) * 32) + lane) * 16));
    block_mma<BITS, T, P>(w, xv, nz, tmp);
  };

  // The group of the unit's first block (uGi) and where the next group starts (uNext), tracked
  // like the copies' (no division).
  int uGi = min((u0 * 128) / gs, G - 1);
  int uNext = (uGi + 1) * gs;
  for (int u = u0; u < u1; u++) {
    const int it = u - u0;
    cp_async_wait<R - 2>();  // this thread's copies of unit u (and every older one) have landed
    __syncthreads();         // ... everyone's; and everyone is done with the stage refilled next
    issueWeights(u + R - 1, (it + R - 1) % R);  // past u1: nothing, an empty group
    issueX(u + R - 1, (it + R - 1) % R);
    cp_async_commit();
    const int k0 = u * 128;
    while (k0 >= uNext && uGi < G - 1) {
      uGi++;
      uNext += gs;
    }
    if (!active) continue;
    const unsigned st = ring + (unsigned)((it % R) * stageBytes);
    const unsigned wslot = st + wdst, xs = st + (unsigned)(NW * Q::kWarpBytes);
    if (uGi == G - 1 || k0 + 96 < uNext) {
      // The whole unit is one group (every unit when gs is a multiple of 128): at most one fold,
      // then 4 blocks with no branch between them.
      if (uGi != curG) {
        if (curG >= 0) flush();
        loadGroup(wslot, 0);
        curG = uGi;
      }
#pragma unroll
      for (int j = 0; j < 4; j++) block(wslot, xs, j);
    } else {
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int gi = min((k0 + j * 32) / gs, G - 1);
        if (gi != curG) {
          if (curG >= 0) flush();
          loadGroup(wslot, j);
          curG = gi;
        }
        block(wslot, xs, j);
      }
    }
  }
  if (curG >= 0) flush();
  cp_async_wait<0>();  // the trailing empty groups

  store_tile<T, C>(acc, out, bias, rows, N, col, active, row0, warp, lane, s);
}

// quant_gemm_k_b{B}_d{D}: up to 8 rows (one token tile), K split across the warps of one CTA
// instead of across a cluster. At one row the ring kernel's cost is per call, not per byte (a
// fit over the five Llama-2-7B decode shapes on an H100: ~6.6 us fixed + 2.9 TB/s, torch's
// tinygemm ~2.8 us + 2.1 TB/s; docs/performance-log.md, session 12): per 128-k unit a barrier
// and a ring refill, and at the end a two-barrier merge through distributed shared memory. Here
// a CTA owns one 32-output column over all of K; warp w sums the contiguous units [w KU / NW,
// (w + 1) KU / NW), streaming its words from global memory into registers D units ahead (the
// first D requested before the PDL wait: weights are fixed during a step), with no barrier
// between warps until one shared-memory reduction (in warp order: deterministic). x (the launch's
// rows, all of K) is staged once per CTA in shared memory, row pitch 2 Kpad + 64 bytes so the
// two rows a quarter-warp reads fall in different banks. Units must each lie in one group (gs a
// multiple of 128, or one group; the host checks), so a group's scale / zero entry rides with
// its unit's words. The per-unit math is the ring kernel's (block_mma, fold_group).
// Launch: grid (1, N / 32, 1), NW warps (up to 16), dynamic shared memory
// rows (2 Kpad + 64) + NW * 1024 (quant_ops.ts kSplitLaunch).
template <int BITS, int D>
__device__ __forceinline__ void quant_gemm_k(float* __restrict__ out, const bf16* __restrict__ x, const uint4* __restrict__ qw,
                                             const uint2* __restrict__ scales, const unsigned* __restrict__ zeros,
                                             const float* __restrict__ bias, const int* __restrict__ live, int rows, int K, int N,
                                             int gs, int G, int symZero) {
  constexpr int W = 4 * BITS;  // a lane's words of one unit
  extern __shared__ __align__(16) unsigned char qsmem[];
  const int NW = (int)(blockDim.x >> 5);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c4 = lane & 3;
  const int NC = N >> 5, KU = (K + 127) >> 7;
  const int col = blockIdx.y;
  const int u0 = (warp * KU) / NW, u1 = ((warp + 1) * KU) / NW;
  const int upg = G == 1 ? KU : max(gs >> 7, 1);  // units per group
  // Unit u's words: BITS 16-byte planes of 32 lanes at wsrc + u * BITS * 32 (word w of the lane:
  // plane w / 4, component w % 4, as block_words reads a ring stage). Its group's scale / zero
  // entry for the lane's rows: (gi, col, g).
  const uint4* wsrc = qw + (long long)col * KU * (BITS * 32) + lane;
  const int eBase = col * 8 + g;
  unsigned wr[D][W];
  uint2 sr[D];
  unsigned zr[D];
  auto issue = [&](int d, int u) {
    if (u >= u1) return;
    const uint4* src = wsrc + (long long)u * (BITS * 32);
#pragma unroll
    for (int p = 0; p < BITS; p++) {
      const uint4 v = ldg_stream(src + p * 32);
      wr[d][4 * p] = v.x, wr[d][4 * p + 1] = v.y, wr[d][4 * p + 2] = v.z, wr[d][4 * p + 3] = v.w;
    }
    const long long e = (long long)min(u / upg, G - 1) * (NC * 8) + eBase;
    sr[d] = ldg_v2(scales + e);
    zr[d] = zeros ? ldg_u32(zeros + e) : 0u;
  };
#pragma unroll
  for (int d = 0; d < D; d++) issue(d, u0 + d);
  pdl_wait<false>();
  const int xRows = min(live_rows(live, rows), 8);
  if (xRows <= 0) return;  // every thread of the CTA: no barrier is left waiting

  // x rows [0, rows) of k [0, Kpad): 16-byte chunks; rows past the live ones and k past K zero-filled.
  const int pitch = KU * 256 + 64;
  const unsigned xs = smem_addr(qsmem);
  const int rowChunks = KU * 16;
  for (int q = threadIdx.x; q < rows * rowChunks; q += blockDim.x) {
    const int r = q / rowChunks, k = (q - r * rowChunks) * 8;
    const bool ok = r < xRows && k < K;
    cp_async16(xs + (unsigned)(r * pitch + k * 2), ok ? x + (long long)r * K + k : x, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float acc[2][1][4], tmp[2][2][1][4];
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[nt][0][e] = tmp[0][nt][0][e] = tmp[1][nt][0][e] = 0.f;
  float sc[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned nz[4];
  sym_terms<BITS>(symZero, nz);
  // Lanes of rows past the launch's read nothing (their x fragment is zero).
  const bool xLane = g < rows;
  const unsigned xl = xs + (unsigned)(g * pitch + c4 * 16);
  int curG = -1;
  for (int ub = u0; ub < u1; ub += D) {
#pragma unroll
    for (int d = 0; d < D; d++) {
      const int u = ub + d;
      if (u >= u1) break;
      const int gi = min(u / upg, G - 1);
      if (gi != curG) {
        if (curG >= 0) fold_group<1, 2>(acc, tmp, sc);
        scale_terms(sr[d], sc);
        if (zeros) zero_terms<BITS>(zr[d], nz);
        curG = gi;
      }
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const uint4 xv = xLane ? lds128(xl + (unsigned)((u * 128 + j * 32) * 2)) : make_uint4(0u, 0u, 0u, 0u);
        block_mma<BITS, 1, 2>(&wr[d][j * BITS], &xv, nz, tmp);
      }
      issue(d, u + D);
    }
  }
  if (curG >= 0) fold_group<1, 2>(acc, tmp, sc);

  // The warps' sums in warp order: part[warp][v = nt * 4 + e][lane], after x.
  float* part = reinterpret_cast<float*>(qsmem + rows * pitch);
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) part[(warp * 8 + nt * 4 + e) * 32 + lane] = acc[nt][0][e];
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    const int v = i >> 5, ln = i & 31, e = v & 3, nt = v >> 2;
    const int n = col * 32 + nt * 16 + (ln >> 2) + 8 * (e >> 1), row = 2 * (ln & 3) + (e & 1);
    float sum = 0.f;
    for (int w = 0; w < NW; w++) sum += part[(w * 8 + v) * 32 + ln];
    if (row < rows) out[(long long)row * N + n] = sum + (bias ? bias[n] : 0.f);
  }
}

constexpr int kLdTile = 136;  // dequant tile row pitch (bf16): 128 + 8 keeps rows 16-byte aligned

template <int BITS>
__device__ __forceinline__ void quant_dequant(bf16* __restrict__ wOut, const uint4* __restrict__ qw, const uint2* __restrict__ scales,
                                              const unsigned* __restrict__ zeros, int K, int N, int gs, int G, int symZero, int col0,
                                              int ncols) {
  __shared__ __align__(16) bf16 tile[kDqWarps][32 * kLdTile];
  pdl_wait();  // the scratch it writes may still be read by the previous chunk's matmul
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c4 = lane & 3;
  const int NC = N >> 5, KU = (K + 127) >> 7;
  const int u = blockIdx.x, cl = blockIdx.y * kDqWarps + warp;
  if (cl >= ncols) return;
  const int col = col0 + cl;
  const uint4* src = qw + ((long long)col * KU + u) * (BITS * 32);
  unsigned w[4 * BITS];
#pragma unroll
  for (int p = 0; p < BITS; p++) {
    const uint4 v = ldg_stream(src + p * 32 + lane);
    w[4 * p] = v.x;
    w[4 * p + 1] = v.y;
    w[4 * p + 2] = v.z;
    w[4 * p + 3] = v.w;
  }
  bf16* tl = tile[warp];
  unsigned nz[4];
  sym_terms<BITS>(symZero, nz);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int gi = min((u * 128 + j * 32) / gs, G - 1);
    const long long e = ((long long)gi * NC + col) * 8 + g;
    float sc[4];
    scale_terms(ldg_v2(scales + e), sc);
    if (zeros) zero_terms<BITS>(ldg_u32(zeros + e), nz);
#pragma unroll
    for (int st = 0; st < 2; st++) {
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        unsigned a[4];
        dequant_tile<BITS>(w, (2 * j + st) * 2 + nt, nz[2 * nt], nz[2 * nt + 1], a);
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a[i]));
          const float sv = sc[2 * nt + (i & 1)];
          const int n = nt * 16 + g + 8 * (i & 1), k = j * 32 + 8 * c4 + 4 * st + 2 * (i >> 1);
          *reinterpret_cast<unsigned*>(tl + n * kLdTile + k) = pack_bf16x2(f.x * sv, f.y * sv);
        }
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16; i++) {
    const int idx = i * 32 + lane, r = idx >> 4, ch = idx & 15, k = u * 128 + ch * 8;
    if (k < K) {
      *reinterpret_cast<uint4*>(wOut + (long long)(cl * 32 + r) * K + k) = *reinterpret_cast<const uint4*>(tl + r * kLdTile + ch * 8);
    }
  }
}

}  // namespace

// One instantiation per (bits B, row tiles T, k splits NS): NS = 1 without a cluster, else a
// cluster of NS CTAs along z (grid z = NS; the macro argument is not C, which would rewrite
// extern "C" in ops.test.ts's macro expansion). Launch bounds: 256 threads, MINB CTAs of 8 warps
// per SM: 3 for T = 1 (80 registers: up to six 4-warp CTAs per SM), 2 for T = 2 and 4 (128);
// quant_ops.ts ctasPerSm mirrors it.
// quant_gemm_lora_*: the same launch with ceil(NA / 32) more CTAs along y, which write the LoRA
// shrink lt[row, n] = sum_k x[row, k] la[n, k] (f32 [rows, ldT]) for la bf16 [NA, K] (the used
// slots' A rows), in the k range of their split, beside the quantized outputs.
#define QGEMM(B, T, MINB)                                                                                                     \
  extern "C" __global__ void __launch_bounds__(256, MINB) quant_gemm_b##B##_t##T##_c1(                                        \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero) {\
    quant_gemm<B, T, 1, false>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, nullptr, nullptr, 0, 0);    \
  }                                                                                                                           \
  extern "C" __global__ void __launch_bounds__(256, MINB) quant_gemm_lora_b##B##_t##T##_c1(                                   \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero, const bf16* la, float* lt, int NA, int ldT) {\
    quant_gemm<B, T, 1, true>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, la, lt, NA, ldT);            \
  }
#define QGEMM_SPLIT(B, T, NS, MINB)                                                                                           \
  extern "C" __global__ void __cluster_dims__(1, 1, NS) __launch_bounds__(256, MINB) quant_gemm_b##B##_t##T##_c##NS(          \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero) {\
    quant_gemm<B, T, NS, false>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, nullptr, nullptr, 0, 0);   \
  }                                                                                                                           \
  extern "C" __global__ void __cluster_dims__(1, 1, NS) __launch_bounds__(256, MINB) quant_gemm_lora_b##B##_t##T##_c##NS(     \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero, const bf16* la, float* lt, int NA, int ldT) {\
    quant_gemm<B, T, NS, true>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, la, lt, NA, ldT);           \
  }
QGEMM(2, 1, 3)
QGEMM_SPLIT(2, 1, 2, 3)
QGEMM_SPLIT(2, 1, 4, 3)
QGEMM_SPLIT(2, 1, 8, 3)
QGEMM(2, 2, 2)
QGEMM_SPLIT(2, 2, 2, 2)
QGEMM_SPLIT(2, 2, 4, 2)
QGEMM_SPLIT(2, 2, 8, 2)
QGEMM(2, 4, 2)
QGEMM_SPLIT(2, 4, 2, 2)
QGEMM_SPLIT(2, 4, 4, 2)
QGEMM_SPLIT(2, 4, 8, 2)
QGEMM(3, 1, 3)
QGEMM_SPLIT(3, 1, 2, 3)
QGEMM_SPLIT(3, 1, 4, 3)
QGEMM_SPLIT(3, 1, 8, 3)
QGEMM(3, 2, 2)
QGEMM_SPLIT(3, 2, 2, 2)
QGEMM_SPLIT(3, 2, 4, 2)
QGEMM_SPLIT(3, 2, 8, 2)
QGEMM(3, 4, 2)
QGEMM_SPLIT(3, 4, 2, 2)
QGEMM_SPLIT(3, 4, 4, 2)
QGEMM_SPLIT(3, 4, 8, 2)
QGEMM(4, 1, 3)
QGEMM_SPLIT(4, 1, 2, 3)
QGEMM_SPLIT(4, 1, 4, 3)
QGEMM_SPLIT(4, 1, 8, 3)
QGEMM(4, 2, 2)
QGEMM_SPLIT(4, 2, 2, 2)
QGEMM_SPLIT(4, 2, 4, 2)
QGEMM_SPLIT(4, 2, 8, 2)
QGEMM(4, 4, 2)
QGEMM_SPLIT(4, 4, 2, 2)
QGEMM_SPLIT(4, 4, 4, 2)
QGEMM_SPLIT(4, 4, 8, 2)

// 4-bit, four token tiles, launches of 4 warps (the tuner's pick for most decode shapes at 32
// rows): launch bounds for three 4-warp CTAs per SM, so up to 168 registers (143-159 used),
// where the kernels above cap T = 4 at 128 (all used; _c2 and _c4 spill 8 bytes). The same
// loop; on an H100 the 4-bit Llama-2-7B decode step (B = 32, 8 adapters) took 5.88 ms with
// these against 6.38 ms without (session 10, docs/performance-log.md). quant_ops.ts launches
// them for every 4-bit, T = 4, 4-warp plan.
#define QGEMM_B4T4W4(NS, CLUSTER)                                                                                             \
  extern "C" __global__ void CLUSTER __launch_bounds__(128, 3) quant_gemm_b4_t4_w4_c##NS(                                      \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero) {\
    quant_gemm<4, 4, NS, false>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, nullptr, nullptr, 0, 0);   \
  }                                                                                                                           \
  extern "C" __global__ void CLUSTER __launch_bounds__(128, 3) quant_gemm_lora_b4_t4_w4_c##NS(                                 \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero, const bf16* la, float* lt, int NA, int ldT) {\
    quant_gemm<4, 4, NS, true>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero, la, lt, NA, ldT);            \
  }
QGEMM_B4T4W4(1, )
QGEMM_B4T4W4(2, __cluster_dims__(1, 1, 2))
QGEMM_B4T4W4(4, __cluster_dims__(1, 1, 4))
QGEMM_B4T4W4(8, __cluster_dims__(1, 1, 8))
QGEMM(8, 1, 3)
QGEMM_SPLIT(8, 1, 2, 3)
QGEMM_SPLIT(8, 1, 4, 3)
QGEMM_SPLIT(8, 1, 8, 3)
QGEMM(8, 2, 2)
QGEMM_SPLIT(8, 2, 2, 2)
QGEMM_SPLIT(8, 2, 4, 2)
QGEMM_SPLIT(8, 2, 8, 2)
QGEMM(8, 4, 2)
QGEMM_SPLIT(8, 4, 2, 2)
QGEMM_SPLIT(8, 4, 4, 2)
QGEMM_SPLIT(8, 4, 8, 2)

// The K-split one-tile kernel (quant_gemm_k above): up to 16 warps, so up to 128 registers.
#define QGEMMK(B, D)                                                                                                          \
  extern "C" __global__ void __launch_bounds__(512) quant_gemm_k_b##B##_d##D(                                                 \
      float* out, const bf16* x, const uint4* qw, const uint2* scales, const unsigned* zeros, const float* bias, const int* live, int rows, int K, int N, int gs, int G, int symZero) {\
    quant_gemm_k<B, D>(out, x, qw, scales, zeros, bias, live, rows, K, N, gs, G, symZero);                                    \
  }
QGEMMK(2, 2)
QGEMMK(2, 4)
QGEMMK(3, 2)
QGEMMK(3, 4)
QGEMMK(4, 2)
QGEMMK(4, 4)
QGEMMK(8, 2)

#define QDEQUANT(B)                                                                                                            \
  extern "C" __global__ void __launch_bounds__(128) quant_dequant_b##B(bf16* w, const uint4* qw, const uint2* scales,          \
                                                                        const unsigned* zeros, int K, int N, int gs, int G,    \
                                                                        int symZero, int col0, int ncols) {                    \
    quant_dequant<B>(w, qw, scales, zeros, K, N, gs, G, symZero, col0, ncols);                                                  \
  }
QDEQUANT(2)
QDEQUANT(3)
QDEQUANT(4)
QDEQUANT(8)

extern "C" __global__ void __launch_bounds__(256) quant_gather_cols(bf16* __restrict__ xp, const bf16* __restrict__ x,
                                                                    const int* __restrict__ perm, int rows, int K) {
  pdl_wait();
  const int r = blockIdx.x, i0 = (blockIdx.y * 256 + threadIdx.x) * 8;
  if (r >= rows || i0 >= K) return;
  const bf16* xr = x + (long long)r * K;
  const uint4 p0 = ldg_v4(perm + i0), p1 = ldg_v4(perm + i0 + 4);
  __align__(16) bf16 v[8] = {xr[p0.x], xr[p0.y], xr[p0.z], xr[p0.w], xr[p1.x], xr[p1.y], xr[p1.z], xr[p1.w]};
  *reinterpret_cast<uint4*>(xp + (long long)r * K + i0) = *reinterpret_cast<const uint4*>(v);
}
