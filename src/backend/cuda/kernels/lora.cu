// Batched multi-LoRA: out[i] += scales[s] * B_s[:, :r_s] @ (A_s[:r_s, :] @ x[i]) for every
// live row i (< counts[0]) whose adapter slot s = loraSlots[i] is >= 0; ranks mixed freely.
// lora_bgmv_fused with write = 1 writes instead: out[i] = that term for every row i < cap,
// 0 for rows without an adapter or past the live rows (the base GEMM then accumulates onto
// it: backend.ts loraFirst).
// Reference: src/backend/cpu/cpu_backend.ts (lora).
//
// Layouts: x bf16 [cap, K] (a matmul input); out f32 [cap, N] (the base projection's f32
// output, read-modify-write: the delta is added in f32, never rounded to bf16);
// A bf16 [numSlots, maxRank, K]; B bf16 [numSlots, N, maxRank]; ranks i32 [numSlots];
// scales f32 [numSlots]; t f32 [cap, maxRank] scratch holding A_s x_i between the halves.
// K % 8 == 0 and N % 8 == 0 (16-byte vectors). A slot's rows / columns past its rank are
// masked in the kernels, so their contents never reach a sum.
//
// Two paths. Which one a row takes depends only on its own sequence (query length 1: a
// decode row; more: a prefill row), never on the batch, so a request's result is the same
// whatever it is batched with. mode = 0 finds each row's sequence in queryStart (a step
// mixing both kinds); mode = 1 means every live row belongs to the kernel's kind (the host
// knows the step is decode-only or prefill-only) and skips that lookup.
//
//   BGMV (decode rows): memory-bound gathered GEMV, each row reads its own adapter.
//     lora_bgmv_fused    grid (rowCap * 8), 128 threads, clusters of 8 CTAs (sm_90): one
//                        cluster per row, shrink and expand in one launch. CTA c of the
//                        cluster reduces the c-th eighth of K for every rank (A x partials in
//                        its shared memory), the cluster barrier publishes them, each CTA sums
//                        the eight partials through distributed shared memory and expands the
//                        c-th eighth of N. So every byte of A and B is read once per row, by
//                        8 x rowCap CTAs in parallel, and there is no second launch: with two
//                        kernels (shrink, expand) the launch gaps, not the bytes, set the time
//                        (measured on an H100: 10.3 us for 32 rows at K = N = 4096, rank 16).
//                        Tried and measured worse (bench/kernels.ts, H100): 256-thread CTAs
//                        with the expand's B rows and out values loaded before the shrink
//                        (8.8 -> 13.5 us for o_proj, 17.2 -> 21.6 us for the fused q/k/v); and
//                        one cluster per segment of up to 4 rows sharing an adapter (grouped
//                        on the host), each A / B vector used for all the segment's rows
//                        (17.2 -> 25.6 us for q/k/v with 8 adapters over 32 rows, and slower
//                        even for single rows: the per-row arrays went to local memory); and
//                        running the decode LoRA on a side stream beside the base GEMM (into
//                        a delta buffer, joined by an add): the Llama-2-7B decode step with 8
//                        adapters went from 9.28 to 10.34 ms, the concurrent kernels slowing
//                        the GEMMs more than the LoRA time they hid; and 256-thread CTAs
//                        (9.11 -> 9.45 ms for that step). Issuing the term before the GEMM
//                        (write = 1, with the L2 requests before the wait) measured neutral.
//                        Each thread of the expand makes 8 consecutive outputs (32-byte f32
//                        out RMW) from 8 contiguous rows of its slot's B.
//     lora_bgmv_shrink / lora_bgmv_expand: the same in two launches, for devices without
//                        clusters (before sm_90).
//   SGMV (prefill rows): a CTA owns a tile of 64 consecutive rows and runs once per distinct
//     slot in it (usually one: a tile spans one or two sequences), masking the other rows,
//     so each slot's A / B is read once per tile. Tensor cores (mma.sync m16n8k16 bf16,
//     f32 accumulate); each row's result is independent of its tile-mates.
//     lora_sgmv_shrink_r{16,32,64}  grid (ceil(rowCap / 64), ceil(maxRank / RW)), 128 threads:
//                        a 64 x RW block of t, K streamed in cp.async double-buffered 64-wide tiles.
//     lora_sgmv_expand   grid (ceil(rowCap / 64), ceil(N / 128)), 128 threads: a 64 x 128 block of
//                        out; t is rounded to bf16 as the tensor-core operand (as Punica / vLLM do).
//
// counts: i32 {numTokens, numSeqs, ...}; queryStart i32 [seqCap + 1].
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/lora.cubin lora.cu

#include "common.cuh"

using namespace inlaid;

namespace {

constexpr int kTile = 64;  // SGMV rows per CTA

__device__ __forceinline__ bool is_decode_row(const int* __restrict__ queryStart, int numSeqs, int t) {
  const int s = seq_of_row(queryStart, numSeqs, t);
  return queryStart[s + 1] - queryStart[s] == 1;
}

// The slot a row contributes to this kernel, or -1 (dead row, no adapter, other path).
__device__ __forceinline__ int row_slot(const int* __restrict__ loraSlots, const int* __restrict__ queryStart,
                                        const int* __restrict__ counts, int seqCap, int cap, int t, int mode,
                                        bool decodeKernel) {
  if (t >= min(counts[0], cap)) return -1;
  const int slot = loraSlots[t];
  if (slot < 0) return -1;
  if (mode == 0 && is_decode_row(queryStart, min(counts[1], seqCap), t) != decodeKernel) return -1;
  return slot;
}

// Fills rs[0..64) with the SGMV slot of each row of this CTA's tile (-1 when none).
__device__ __forceinline__ void tile_slots(int* rs, const int* __restrict__ loraSlots, const int* __restrict__ queryStart,
                                           const int* __restrict__ counts, int seqCap, int cap, int mode) {
  if (threadIdx.x < kTile) {
    rs[threadIdx.x] = row_slot(loraSlots, queryStart, counts, seqCap, cap, blockIdx.x * kTile + threadIdx.x, mode, false);
  }
  __syncthreads();
}

// The smallest slot in rs greater than prev, or -1. Every thread computes the same value.
__device__ __forceinline__ int next_slot(const int* rs, int prev) {
  int best = 0x7fffffff;
  for (int r = 0; r < kTile; r++) {
    const int v = rs[r];
    if (v > prev && v < best) best = v;
  }
  return best == 0x7fffffff ? -1 : best;
}

template <int RW>
__device__ __forceinline__ void sgmv_shrink(float* __restrict__ t, const bf16* __restrict__ x, const bf16* __restrict__ A,
                                            const int* __restrict__ ranks, const int* __restrict__ loraSlots,
                                            const int* __restrict__ queryStart, const int* __restrict__ counts,
                                            int seqCap, int cap, int K, int maxRank, int mode, int S) {
  constexpr int BM = kTile, BK = 64, LD = BK + 8, NT = RW / 8, CPR = BK / 8;
  __shared__ __align__(16) bf16 xs[2][BM * LD];
  __shared__ __align__(16) bf16 as[2][RW * LD];
  __shared__ int rs[kTile];
  tile_slots(rs, loraSlots, queryStart, counts, seqCap, cap, mode);
  const int row0 = blockIdx.x * kTile;
  const int rN0 = blockIdx.y * RW;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int nK = (K + BK - 1) / BK;
  const unsigned xsA = smem_addr(xs), asA = smem_addr(as);

  for (int slot = next_slot(rs, -1); slot >= 0; slot = next_slot(rs, slot)) {
    const int rank = ranks[slot * S];
    if (rN0 >= rank) continue;
    const bf16* aSlot = A + (long long)slot * S * maxRank * K;
    auto load = [&](int stage, int k0) {
#pragma unroll
      for (int i = 0; i < BM * CPR / 128; i++) {
        const int ci = tid + i * 128, r = ci / CPR, part = ci % CPR, col = k0 + part * 8;
        const bool valid = rs[r] == slot && col < K;
        cp_async16(xsA + 2u * (stage * BM * LD + r * LD + part * 8), valid ? x + (long long)(row0 + r) * K + col : x, valid);
      }
#pragma unroll
      for (int i = 0; i < (RW * CPR + 127) / 128; i++) {
        const int ci = tid + i * 128;
        if (ci < RW * CPR) {
          const int r = ci / CPR, part = ci % CPR, col = k0 + part * 8;
          const bool valid = rN0 + r < rank && col < K;
          cp_async16(asA + 2u * (stage * RW * LD + r * LD + part * 8), valid ? aSlot + (long long)(rN0 + r) * K + col : A, valid);
        }
      }
    };

    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    load(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < nK; kt++) {
      if (kt + 1 < nK) {
        load((kt + 1) & 1, (kt + 1) * BK);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const unsigned xb = xsA + 2u * (kt & 1) * BM * LD;
      const unsigned ab = asA + 2u * (kt & 1) * RW * LD;
#pragma unroll
      for (int kk = 0; kk < BK / 16; kk++) {
        unsigned af[4];
        ldmatrix_x4(af, a_frag(xb, LD, warp * 16, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
          unsigned b[4];
          ldmatrix_x4(b, bt_frag(ab, LD, np * 16, kk * 16, lane));
          mma_bf16(acc[2 * np], af, b[0], b[1]);
          mma_bf16(acc[2 * np + 1], af, b[2], b[3]);
        }
      }
      __syncthreads();
    }

    // Columns rank..maxRank of this block come out as zeros (their A rows were zero-filled).
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int r = warp * 16 + g + 8 * i;
      if (rs[r] != slot) continue;
      float* dst = t + (long long)(row0 + r) * maxRank;
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const int col = rN0 + nt * 8 + 2 * c4;
        if (col < maxRank) dst[col] = acc[nt][2 * i];
        if (col + 1 < maxRank) dst[col + 1] = acc[nt][2 * i + 1];
      }
    }
  }
}

}  // namespace

#define SGMV_SHRINK(RW)                                                                                             \
  extern "C" __global__ void __launch_bounds__(128) lora_sgmv_shrink_r##RW(                                       \
      float* t, const bf16* x, const bf16* A, const int* ranks, const int* loraSlots, const int* queryStart,       \
      const int* counts, int seqCap, int cap, int K, int maxRank, int mode, int S) {                              \
    pdl_wait();                                                                                                    \
    sgmv_shrink<RW>(t, x, A, ranks, loraSlots, queryStart, counts, seqCap, cap, K, maxRank, mode, S);            \
  }
SGMV_SHRINK(16)
SGMV_SHRINK(32)
SGMV_SHRINK(64)

extern "C" __global__ void __launch_bounds__(128) lora_sgmv_expand(float* __restrict__ out, const float* __restrict__ t,
                                                                   const bf16* __restrict__ B, const int* __restrict__ ranks,
                                                                   const float* __restrict__ scales,
                                                                   const int* __restrict__ loraSlots,
                                                                   const int* __restrict__ queryStart,
                                                                   const int* __restrict__ counts, int seqCap, int cap,
                                                                   int N, int maxRank, int mode, int S, int ldOut) {
  pdl_wait();
  constexpr int BM = kTile, BN = 128, RC = 64, LD = RC + 8, NT = BN / 8;
  __shared__ __align__(16) bf16 ts[BM * LD];
  __shared__ __align__(16) bf16 bs[BN * LD];
  __shared__ int rs[kTile];
  tile_slots(rs, loraSlots, queryStart, counts, seqCap, cap, mode);
  const int row0 = blockIdx.x * kTile;
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const unsigned tsA = smem_addr(ts), bsA = smem_addr(bs);

  for (int slot = next_slot(rs, -1); slot >= 0; slot = next_slot(rs, slot)) {
    const int rank = ranks[slot * S];
    if (rank <= 0) continue;
    const float scale = scales[slot * S];
    const bf16* bSlot = B + (long long)slot * ldOut * maxRank;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    for (int rc0 = 0; rc0 < rank; rc0 += RC) {
      for (int ci = tid; ci < BM * RC; ci += 128) {
        const int r = ci / RC, cc = ci % RC;
        const float v = (rs[r] == slot && rc0 + cc < rank) ? t[(long long)(row0 + r) * maxRank + rc0 + cc] : 0.f;
        ts[r * LD + cc] = __float2bfloat16_rn(v);
      }
      if (maxRank % 8 == 0) {
        for (int ci = tid; ci < BN * (RC / 8); ci += 128) {
          const int n = ci / (RC / 8), col = rc0 + (ci % (RC / 8)) * 8;
          uint4 v = make_uint4(0u, 0u, 0u, 0u);
          if (n0 + n < N && col < rank) {
            v = *reinterpret_cast<const uint4*>(bSlot + (long long)(n0 + n) * maxRank + col);
            unsigned short* h = reinterpret_cast<unsigned short*>(&v);
#pragma unroll
            for (int q = 0; q < 8; q++)
              if (col + q >= rank) h[q] = 0;
          }
          *reinterpret_cast<uint4*>(bs + n * LD + (ci % (RC / 8)) * 8) = v;
        }
      } else {
        for (int ci = tid; ci < BN * RC; ci += 128) {
          const int n = ci / RC, cc = ci % RC;
          bs[n * LD + cc] = (n0 + n < N && rc0 + cc < rank) ? bSlot[(long long)(n0 + n) * maxRank + rc0 + cc]
                                                            : __float2bfloat16_rn(0.f);
        }
      }
      __syncthreads();
      const int ksteps = (min(RC, rank - rc0) + 15) / 16;
#pragma unroll
      for (int kk = 0; kk < RC / 16; kk++) {
        if (kk < ksteps) {
          unsigned af[4];
          ldmatrix_x4(af, a_frag(tsA, LD, warp * 16, kk * 16, lane));
#pragma unroll
          for (int np = 0; np < NT / 2; np++) {
            unsigned b[4];
            ldmatrix_x4(b, bt_frag(bsA, LD, np * 16, kk * 16, lane));
            mma_bf16(acc[2 * np], af, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], af, b[2], b[3]);
          }
        }
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int r = warp * 16 + g + 8 * i;
      if (rs[r] != slot) continue;
      float* dst = out + (long long)(row0 + r) * ldOut;
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const int n = n0 + nt * 8 + 2 * c4;
        if (n < N) {  // N % 8 == 0: n + 1 < N too, and dst + n is 8-byte aligned
          float2* p = reinterpret_cast<float2*>(dst + n);
          float2 o = *p;
          o.x += scale * acc[nt][2 * i];
          o.y += scale * acc[nt][2 * i + 1];
          *p = o;
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_bgmv_shrink(float* __restrict__ t, const bf16* __restrict__ x,
                                                                   const bf16* __restrict__ A, const int* __restrict__ ranks,
                                                                   const int* __restrict__ loraSlots,
                                                                   const int* __restrict__ queryStart,
                                                                   const int* __restrict__ counts, int seqCap, int cap, int K,
                                                                   int maxRank, int mode, int S) {
  pdl_wait();
  constexpr int RG = 4;
  __shared__ float partial[RG][8];
  const int row = blockIdx.x;
  const int slot = row_slot(loraSlots, queryStart, counts, seqCap, cap, row, mode, true);
  if (slot < 0) return;
  const int rank = ranks[slot * S];
  const int r0 = blockIdx.y * RG;
  if (r0 >= rank) return;
  const int nr = min(RG, rank - r0);
  const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)row * K);
  const bf16* a0 = A + ((long long)slot * S * maxRank + r0) * K;
  float acc[RG] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
  for (int c = threadIdx.x; c < K / 8; c += blockDim.x) {
    uint4 av[RG];
#pragma unroll
    for (int j = 0; j < RG; j++) {
      if (j < nr) av[j] = reinterpret_cast<const uint4*>(a0 + (long long)j * K)[c];
    }
    float xf[8];
    unpack8(xr[c], xf);
#pragma unroll
    for (int j = 0; j < RG; j++) {
      if (j < nr) {
        float af[8];
        unpack8(av[j], af);
#pragma unroll
        for (int q = 0; q < 8; q++) acc[j] = fmaf(af[q], xf[q], acc[j]);
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < RG; j++) {
    const float v = warp_sum(acc[j]);
    if (lane == 0) partial[j][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < nr) {
    float v = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) v += partial[threadIdx.x][w];
    t[(long long)row * maxRank + r0 + threadIdx.x] = v;
  }
}

extern "C" __global__ void __launch_bounds__(128) lora_bgmv_expand(float* __restrict__ out, const float* __restrict__ t,
                                                                   const bf16* __restrict__ B, const int* __restrict__ ranks,
                                                                   const float* __restrict__ scales,
                                                                   const int* __restrict__ loraSlots,
                                                                   const int* __restrict__ queryStart,
                                                                   const int* __restrict__ counts, int seqCap, int cap, int N,
                                                                   int maxRank, int mode, int S, int ldOut) {
  pdl_wait();
  extern __shared__ float tv[];  // [maxRank], zero past the slot's rank
  const int row = blockIdx.x;
  const int slot = row_slot(loraSlots, queryStart, counts, seqCap, cap, row, mode, true);
  if (slot < 0) return;
  const int rank = ranks[slot * S];
  if (rank <= 0) return;
  for (int r = threadIdx.x; r < maxRank; r += blockDim.x) tv[r] = r < rank ? t[(long long)row * maxRank + r] : 0.f;
  __syncthreads();
  const int n0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (n0 >= N) return;
  const float scale = scales[slot * S];
  const bf16* bb = B + (long long)slot * ldOut * maxRank + (long long)n0 * maxRank;
  const int ne = min(8, N - n0);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (maxRank % 8 == 0) {
    for (int rc = 0; rc < rank; rc += 8) {
      float tr[8];
#pragma unroll
      for (int q = 0; q < 8; q++) tr[q] = tv[rc + q];
      uint4 bv[8];
#pragma unroll
      for (int e = 0; e < 8; e++) {
        if (e < ne) bv[e] = *reinterpret_cast<const uint4*>(bb + (long long)e * maxRank + rc);
      }
#pragma unroll
      for (int e = 0; e < 8; e++) {
        if (e < ne) {
          float bf[8];
          unpack8(bv[e], bf);
#pragma unroll
          for (int q = 0; q < 8; q++) acc[e] = fmaf(rc + q < rank ? bf[q] : 0.f, tr[q], acc[e]);
        }
      }
    }
  } else {
    for (int e = 0; e < ne; e++) {
      for (int r = 0; r < rank; r++) acc[e] = fmaf(__bfloat162float(bb[(long long)e * maxRank + r]), tv[r], acc[e]);
    }
  }
  float* dst = out + (long long)row * ldOut + n0;
  if (ne == 8) {
    float4* d4 = reinterpret_cast<float4*>(dst);
    float4 a = d4[0], b = d4[1];
    a.x += scale * acc[0]; a.y += scale * acc[1]; a.z += scale * acc[2]; a.w += scale * acc[3];
    b.x += scale * acc[4]; b.y += scale * acc[5]; b.z += scale * acc[6]; b.w += scale * acc[7];
    d4[0] = a;
    d4[1] = b;
  } else {
    for (int e = 0; e < ne; e++) dst[e] += scale * acc[e];
  }
}

// Decode-only steps, when the pool is small (ops.ts loraSlotsPath): the shrink for every
// slot at once is part of the base GEMM (cuda_backend.ts linearLora: the pool's A rows sit
// after the weight's), t f32 [cap, ldT] with row i's (slot s, split j, rank r) value at
// t[i * ldT + (s * S + j) * maxRank + r]; this kernel is the expand. A CTA of 128 threads
// covers 128 * kExpandPer outputs of one row, grid (ceil(N / (128 * kExpandPer)), rows);
// thread x takes outputs x, x + 128, ... of the CTA's span, so a warp's loads of B read 32
// consecutive B rows (each thread its output's 2 * maxRank contiguous bytes): coalesced,
// with no reduction and no cluster barrier (the per-row kernel's chain of dependent loads
// made it latency-bound). Measured on an H100 (bench/kernels.ts, 32 rows): one output per
// thread was faster with adapters and slower without (the copy of rows without one, with
// 4x the CTAs); 8 contiguous outputs per thread was slower with adapters.
// out[i] = base[i] + scale * B t (base may be out itself: rows without an adapter are then
// left untouched; otherwise they copy base). A cuBLASLt GEMM never triggers early, so after
// one this kernel would start only when the GEMM has ended; in a captured graph it hangs off
// the GEMM's launch-order port instead (launcher.ts, ops.ts EARLY_AFTER_LIBRARY), so its
// rounds before the wait run alongside the GEMM. There are two rounds: (1) the live count
// and the row's slot (row < cap, so loraSlots[row] is in bounds), before the PDL wait with
// (2a) the ranks, scales and B's first 16 ranks (adapter weights are fixed during a step; B
// rows hold maxRank entries, so those loads are in bounds, and ranks past an adapter's own
// are masked), then after the wait (2b) t's row and (copying only) base. In place, the sum
// goes out as one reduction (red.global.add: no read of out, still one add per element, so
// deterministic). H100,
// bench/kernels.ts, 32 rows, rank 16, o 4096 -> 4096: the LoRA time over the GEMM 7.14 ->
// 6.19 us with 32 adapters, 5.22 -> 4.09 us with 8, against the session-5 schedule (four
// rounds before the wait, one after); the 7B decode step unchanged (7.628 against 7.635 ms).
namespace {
// Outputs per thread, 128 apart: 1 (INLAID_EXPAND_PER=2 or 4 compiles 2 or 4 in; ops.ts
// expandPerThread sizes the grid to match). H100, session 14, bench/kernels.ts, o at 32 rows
// x 32 adapters: 4.62 us of LoRA time over the GEMM at one output per thread against 4.90 /
// 4.91 at four (the expand on the GEMM's launch-order port), 5.95 / 5.96 against 5.84-6.26
// on the usual launch.
#ifndef INLAID_EXPAND_PER
#define INLAID_EXPAND_PER 1
#endif
constexpr int kExpandPer = INLAID_EXPAND_PER;

// What a thread of lora_bgmv_expand_slots loads before the PDL wait for its outputs n0 +
// 128e of slot `slot` (< 0: none, all zero): each output's split, that split's rank and scale,
// and B's first 16 ranks (B rows hold maxRank entries, so those loads are in bounds; ranks
// past an adapter's own are masked by expand_dot).
struct ExpandHead {
  int js[kExpandPer], rk[kExpandPer];
  float sc[kExpandPer];
  uint4 b0[kExpandPer], b1[kExpandPer];  // ranks [0, 16) of each output's B row
};

__device__ __forceinline__ ExpandHead expand_head(int slot, int n0, int N, const bf16* __restrict__ B, const int* __restrict__ ranks,
                                                  const float* __restrict__ scales, int maxRank, int S, int o1, int o2, int o3) {
  ExpandHead h;
#pragma unroll
  for (int e = 0; e < kExpandPer; e++) {
    const int n = n0 + e * 128;
    h.js[e] = 0;
    h.rk[e] = 0;
    h.sc[e] = 0.f;
    h.b0[e] = h.b1[e] = make_uint4(0u, 0u, 0u, 0u);
    if (slot >= 0 && n < N) {
      h.js[e] = (S > 3 && n >= o3) ? 3 : (S > 2 && n >= o2) ? 2 : (S > 1 && n >= o1) ? 1 : 0;
      h.rk[e] = ranks[slot * S + h.js[e]];
      h.sc[e] = scales[slot * S + h.js[e]];
      const uint4* bb = reinterpret_cast<const uint4*>(B + ((long long)slot * N + n) * maxRank);
      h.b0[e] = bb[0];
      if (maxRank > 8) h.b1[e] = bb[1];
    }
  }
  return h;
}

// B's row (b0, b1: its first 16 ranks, already loaded; bb: the whole row) dotted with t over
// `rank` ranks: t16 holds t's first 16 (registers), tj the row's t from rank 0
// (16-byte aligned; read past rank 16 only). Masked, not multiplied by zero: values past the
// rank could hold NaN bits.
template <typename T16>
__device__ __forceinline__ float expand_dot(uint4 b0, uint4 b1, const uint4* bb, int rank, const T16& t16, const float* tj) {
  float acc = 0.f, bf[8];
  unpack8(b0, bf);
#pragma unroll
  for (int q = 0; q < 8; q++) acc = fmaf(q < rank ? bf[q] : 0.f, q < rank ? t16[q] : 0.f, acc);
  unpack8(b1, bf);
#pragma unroll
  for (int q = 0; q < 8; q++) acc = fmaf(8 + q < rank ? bf[q] : 0.f, 8 + q < rank ? t16[8 + q] : 0.f, acc);
  // Ranks past 16: a third round, only for the adapters that have them.
  for (int r0 = 16; r0 < rank; r0 += 8) {
    const float4 t0 = reinterpret_cast<const float4*>(tj + r0)[0], t1 = reinterpret_cast<const float4*>(tj + r0)[1];
    const float tq[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
    unpack8(bb[r0 / 8], bf);
#pragma unroll
    for (int q = 0; q < 8; q++) acc = fmaf(r0 + q < rank ? bf[q] : 0.f, r0 + q < rank ? tq[q] : 0.f, acc);
  }
  return acc;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(128)
    lora_bgmv_expand_slots(float* __restrict__ out, const float* base, const float* __restrict__ t, const bf16* __restrict__ B,
                           const int* __restrict__ ranks, const float* __restrict__ scales, const int* __restrict__ loraSlots,
                           const int* __restrict__ counts, int cap, int N, int ldBase, int ldT, int maxRank, int S, int o1,
                           int o2, int o3) {
  const int row = blockIdx.y;
  const int n0 = blockIdx.x * (128 * kExpandPer) + threadIdx.x;
  const int live = counts[0], rowSlot = loraSlots[row];
  const int slot = row < min(live, cap) ? rowSlot : -1;
  const ExpandHead h = expand_head(slot, n0, N, B, ranks, scales, maxRank, S, o1, o2, o3);
  pdl_wait();
  float* dstRow = out + (long long)row * N;
  const float* srcRow = base + (long long)row * ldBase;
  const bool inPlace = srcRow == dstRow;
  float v[kExpandPer], tt[kExpandPer][16];
#pragma unroll
  for (int e = 0; e < kExpandPer; e++) {
    const int n = n0 + e * 128;
    v[e] = n < N && !inPlace ? srcRow[n] : 0.f;
    const float4* t4 = reinterpret_cast<const float4*>(t + (long long)row * ldT + (max(slot, 0) * S + h.js[e]) * maxRank);
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const float4 f = slot >= 0 && n < N && q * 4 < maxRank ? t4[q] : make_float4(0.f, 0.f, 0.f, 0.f);
      tt[e][4 * q] = f.x, tt[e][4 * q + 1] = f.y, tt[e][4 * q + 2] = f.z, tt[e][4 * q + 3] = f.w;
    }
  }
#pragma unroll
  for (int e = 0; e < kExpandPer; e++) {
    const int n = n0 + e * 128, rank = h.rk[e];
    if (n >= N || (rank <= 0 && inPlace)) continue;
    float acc = 0.f;
    if (rank > 0) {
      const float* tj = t + (long long)row * ldT + (slot * S + h.js[e]) * maxRank;
      const uint4* bb = reinterpret_cast<const uint4*>(B + ((long long)slot * N + n) * maxRank);
      acc = expand_dot(h.b0[e], h.b1[e], bb, rank, tt[e], tj);
    }
    if (inPlace) {
      atomicAdd(dstRow + n, h.sc[e] * acc);
    } else {
      dstRow[n] = rank > 0 ? v[e] + h.sc[e] * acc : v[e];
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 || !defined(__CUDA_ARCH__)
namespace {
constexpr int kCluster = 8;
constexpr int kFusedMaxRank = 64;
constexpr int kMaxSplits = 4;
}  // namespace

// Splits (a fused linear's member projections, e.g. q/k/v): the output's columns
// [o_j, o_{j+1}) belong to split j, o_0 = 0 and o_j = N for j >= S; every o_j is a
// multiple of 8. A slot holds S (A, B, rank, scale): A [S][maxRank][K] per slot, so the
// shrink runs over S * maxRank "virtual ranks" v = j * maxRank + r, valid when r is below
// split j's rank; B keeps one row per output column ([N][maxRank] per slot).
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(128, 1)
    lora_bgmv_fused(float* __restrict__ out, const bf16* __restrict__ x, const bf16* __restrict__ A, const bf16* __restrict__ B,
                    const int* __restrict__ ranks, const float* __restrict__ scales, const int* __restrict__ loraSlots,
                    const int* __restrict__ queryStart, const int* __restrict__ counts, int seqCap, int cap, int K, int N,
                    int maxRank, int mode, int S, int o1, int o2, int o3, int write) {
  __shared__ float part[kMaxSplits * kFusedMaxRank];  // this CTA's share of A x (its eighth of K)
  __shared__ float tv[kMaxSplits * kFusedMaxRank];    // A x, summed over the cluster; zero where invalid
  __shared__ int rk[kMaxSplits];
  const int row = blockIdx.x / kCluster;
  const unsigned crank = cluster_ctarank();
  const int kv = K / 8, kper = (kv + kCluster - 1) / kCluster;
  const int kv0 = crank * kper, kv1 = min(kv, kv0 + kper);
  const int nv = N / 8, nper = (nv + kCluster - 1) / kCluster;
  const int nv0 = crank * nper, nv1 = min(nv, (int)(crank + 1) * nper);
  // Before the wait, only what is fixed during a step (common.cuh): the row's slot and
  // ranks. (Requesting this CTA's A and B slices into L2 here as well measured neutral end
  // to end and slowed back-to-back launches: bench/kernels.ts, fused q/k/v 1550 -> 1356 GB/s.)
  const int slot = row_slot(loraSlots, queryStart, counts, seqCap, cap, row, mode, true);
  int any = 0;
  if (slot >= 0) {
    for (int j = 0; j < S; j++) any |= ranks[slot * S + j];
  }
  pdl_wait();
  // Every CTA of a cluster has the same row, so they all return here or none does (the
  // cluster barriers below need all eight).
  if (any == 0) {
    // No adapter (or a dead row): in write mode the row's term is zero.
    if (write) {
      for (int u = nv0 + threadIdx.x; u < nv1; u += blockDim.x) {
        float4* d4 = reinterpret_cast<float4*>(out + (long long)row * N + u * 8);
        d4[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        d4[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    return;
  }
  if (threadIdx.x < kMaxSplits) rk[threadIdx.x] = threadIdx.x < S ? min(ranks[slot * S + threadIdx.x], kFusedMaxRank) : 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int V = S * maxRank;

  // Shrink over this CTA's slice of K (in 8-element vectors): warp w of NW owns virtual
  // ranks 4w..4w+3, then 4NW + 4w..., the lanes stride the slice.
  const int NW = (int)(blockDim.x >> 5);
  const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)row * K);
  const bf16* aSlot = A + (long long)slot * V * K;
  for (int v0 = warp * 4; v0 < V; v0 += 4 * NW) {
    bool ok[4];
    bool anyOk = false;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int v = v0 + j;
      ok[j] = v < V && v % maxRank < rk[v / maxRank];
      anyOk |= ok[j];
    }
    if (!anyOk) continue;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // Two of the lane's vectors per trip, all their loads issued before any math: the
    // launch is a chain of dependent memory round trips, and this halves the shrink's.
    for (int c0 = kv0 + lane; c0 < kv1; c0 += 64) {
      const int c1 = c0 + 32;
      const bool has1 = c1 < kv1;
      uint4 av[2][4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        if (ok[j]) {
          av[0][j] = reinterpret_cast<const uint4*>(aSlot + (long long)(v0 + j) * K)[c0];
          if (has1) av[1][j] = reinterpret_cast<const uint4*>(aSlot + (long long)(v0 + j) * K)[c1];
        }
      }
      const uint4 xv0 = xr[c0], xv1 = has1 ? xr[c1] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        if (h == 1 && !has1) break;
        float xf[8];
        unpack8(h == 0 ? xv0 : xv1, xf);
#pragma unroll
        for (int j = 0; j < 4; j++) {
          if (ok[j]) {
            float af[8];
            unpack8(av[h][j], af);
#pragma unroll
            for (int q = 0; q < 8; q++) acc[j] = fmaf(af[q], xf[q], acc[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float v = warp_sum(acc[j]);
      if (lane == 0 && ok[j]) part[v0 + j] = v;
    }
  }
  cluster_arrive();
  cluster_wait();  // every CTA's partials are written and visible
  // Summed in rank order of the cluster, the same on every CTA: the row's result does not
  // depend on which CTA expands which columns.
  for (int v = threadIdx.x; v < kMaxSplits * kFusedMaxRank; v += blockDim.x) {
    float acc = 0.f;
    if (v < V && v % maxRank < rk[v / maxRank]) {
      for (unsigned q = 0; q < kCluster; q++) acc += ld_cluster_f32(&part[v], q);
    }
    tv[v] = acc;
  }
  cluster_arrive();  // done reading the others' shared memory; they may exit once all arrive
  __syncthreads();

  // Expand this CTA's eighth of N (in 8-output vectors); each vector lies in one split.
  for (int u = nv0 + threadIdx.x; u < nv1; u += blockDim.x) {
    const int n0 = u * 8;
    const int j = (S > 3 && n0 >= o3) ? 3 : (S > 2 && n0 >= o2) ? 2 : (S > 1 && n0 >= o1) ? 1 : 0;
    const int rank = rk[j];
    float4* d4 = reinterpret_cast<float4*>(out + (long long)row * N + n0);
    if (rank <= 0) {
      if (write) {
        d4[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        d4[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      continue;
    }
    const float scale = scales[slot * S + j];
    const float* tj = tv + j * maxRank;
    const bf16* bb = B + ((long long)slot * N + n0) * maxRank;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // out's old values (add mode) load together with the first B rows (independent of each other).
    float4 oa = make_float4(0.f, 0.f, 0.f, 0.f), ob = oa;
    if (!write) {
      oa = d4[0];
      ob = d4[1];
    }
    if (maxRank % 8 == 0) {
      // Sixteen ranks per trip (two 8-rank chunks of 8 B rows), loads before math.
      for (int rc = 0; rc < rank; rc += 16) {
        const bool two = rc + 8 < rank;
        uint4 bv[2][8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
          bv[0][e] = *reinterpret_cast<const uint4*>(bb + (long long)e * maxRank + rc);
          if (two) bv[1][e] = *reinterpret_cast<const uint4*>(bb + (long long)e * maxRank + rc + 8);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
          if (h == 1 && !two) break;
          const int r0 = rc + 8 * h;
          float tr[8];
#pragma unroll
          for (int q = 0; q < 8; q++) tr[q] = tj[r0 + q];  // zero past the rank
#pragma unroll
          for (int e = 0; e < 8; e++) {
            float bf[8];
            unpack8(bv[h][e], bf);
            // Masked, not only multiplied by tv's zeros: stale columns could hold NaN bits.
#pragma unroll
            for (int q = 0; q < 8; q++) acc[e] = fmaf(r0 + q < rank ? bf[q] : 0.f, tr[q], acc[e]);
          }
        }
      }
    } else {
      for (int e = 0; e < 8; e++) {
        for (int r = 0; r < rank; r++) acc[e] = fmaf(__bfloat162float(bb[(long long)e * maxRank + r]), tj[r], acc[e]);
      }
    }
    oa.x += scale * acc[0]; oa.y += scale * acc[1]; oa.z += scale * acc[2]; oa.w += scale * acc[3];
    ob.x += scale * acc[4]; ob.y += scale * acc[5]; ob.z += scale * acc[6]; ob.w += scale * acc[7];
    d4[0] = oa;
    d4[1] = ob;
  }
  cluster_wait();
}
#endif
