// Paged causal GQA attention. Reference: src/backend/cpu/attention.ts (writeKv, pagedAttention).
//
// Semantics (per layer):
//   kv_cache_write_f32: for t < *live (the step's numTokens, counts[0]) with slot = slotMapping[t] >= 0:
//       kCache[slot] = bf16(k[t]), vCache[slot] = bf16(v[t])   (rows of nKv*D, f32 in, bf16 stored)
//   attention, for every live sequence s (s < counts[1]) and query row t in
//   [queryStart[s], queryStart[s+1]), query head h (KV head h / G, G = nH / nKv):
//       out[t, h] = sum_j softmax_j(q[t, h] . K[j] * scale) V[j]   over j in 0..positions[t],
//       K[j] / V[j] read through the block table: slot = blockTables[s*maxBlocksPerSeq + j/bs]*bs + j%bs.
//
// Layouts: q f32 [cap, nH*D]; out bf16 [cap, nH*D] (the o_proj input); k, v f32
// [cap, nKv*D]; caches bf16 [numBlocks, blockSize, nKv, D] (a slot's row of nKv*D is
// contiguous); block tables, positions, queryStart, slotMapping i32; counts i32
// {numTokens, numSeqs, ...}.
//
// Precision. q, k and v arrive in f32 (the projections' outputs after RoPE). K and V are
// rounded to bf16 once, into the cache, and both kernels read them from there (so prefill
// and decode see the same keys). Q never is: each thread reads its mma fragments of Q
// straight from global memory and splits every value into hi = bf16(q) and
// lo = bf16(q - hi) (kQSplit), and S = Q_hi K^T + Q_lo K^T on the tensor cores, which
// carries ~16 bits of q's mantissa (error ~2^-17 |q|) instead of bf16's 8. The second
// product costs one more mma per QK^T step (the K fragments are shared): nothing in
// decode, which is bound by reading the cache; a few percent of prefill attention.
//
// Kernels (D = head dim, one instantiation per supported D: 32, 64, 80, 96, 128):
//   kv_cache_write_f32             one CTA per token row: 2 float4 in, one 16-byte bf16 vector out.
//   attn_prefill_d{D}              sequences with more than one query row. FlashAttention-2
//       style: a CTA owns 64 "rows" = (query token, head of one KV group) pairs of one
//       sequence (GQA packing: the G heads sharing a KV head share every K/V tile), 4 warps
//       of 16 rows; K/V tiles of 64 keys stream through shared memory with cp.async (K of the
//       next tile loads while this tile's softmax and PV run); QK^T and PV on tensor cores
//       (mma.sync m16n8k16 bf16, f32 accumulate); online softmax in f32 (exp2 with the
//       scale folded in). P is rounded to bf16 for the PV product, as FlashAttention does.
//   attn_decode_d{D}               sequences with exactly one query row (decode). A CTA owns
//       16 rows = up to 16 heads of one KV group, 4 warps split each 64-key tile (16 keys
//       each) and merge their softmax states at the end. Long contexts are split into up to
//       MAX_SPLITS chunks (flash-decoding); the split depends only on the sequence's own
//       context length, never on the batch, so a sequence's result does not depend on what
//       it is batched with. The grid is persistent (work items are (sequence, chunk, group)
//       found on the device from counts / queryStart / positions), so one captured graph
//       serves any batch within the capacity.
//   attn_decode_reduce_d{D}        merges the chunks of split sequences (log-sum-exp weights);
//       one CTA per sequence, dynamic shared memory nH * MAX_SPLITS floats.
//
// Every row's result depends only on its own sequence: fully masked key tiles leave the
// online-softmax state bit-for-bit unchanged, so tile-mates never matter. Sequences are
// split between the two kernels by their own query length (1: decode, >1: prefill), so
// a mixed step launches both and each skips the other's sequences.
//
// Decode scratch (maxSplits > 1): f32, [seqCap, MAX_SPLITS, nH, D] normalized partial
// outputs followed by [seqCap, MAX_SPLITS, nH, 2] (max in the log2 domain, sum of exp).
// maxSplits = 1 needs no scratch (every context in one pass).
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/attention.cubin attention.cu

#include "common.cuh"

using namespace inlaid;

namespace {

constexpr int kThreads = 128;    // 4 warps for both attention kernels
constexpr int kMaxSplits = 16;   // flash-decoding: at most this many chunks per sequence
constexpr bool kQSplit = true;   // Q as hi + lo bf16 parts in QK^T (see "Precision" above)

// Exclusive prefix sum over the CTA (blockDim.x <= 1024, multiple of 32); *total gets the sum.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int wsum[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) wsum[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nw ? wsum[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    wsum[lane] = w;
  }
  __syncthreads();
  const int before = warp > 0 ? wsum[warp - 1] : 0;
  *total = wsum[nw - 1];
  __syncthreads();
  return before + x - v;
}

// pre[s] = sum of count(s') for s' < s, for s in 0..n (pre[n] = total), in shared memory.
template <typename F>
__device__ int build_prefix(int* pre, int n, F count) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, (int)threadIdx.x * per), hi = min(n, lo + per);
  int local = 0;
  for (int s = lo; s < hi; s++) local += count(s);
  int total;
  int run = block_exclusive_scan(local, &total);
  for (int s = lo; s < hi; s++) {
    pre[s] = run;
    run += count(s);
  }
  if (threadIdx.x == 0) pre[n] = total;
  __syncthreads();
  return total;
}

// The s with pre[s] <= b < pre[s+1], given 0 <= b < pre[n].
__device__ __forceinline__ int find_segment(const int* pre, int n, int b) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (pre[mid] <= b) lo = mid;
    else hi = mid;
  }
  return lo;
}

// How a decode context of ctx keys is split: chunks of *chunkLen keys (a multiple of 64).
// A pure function of ctx, shared by the decode and reduce kernels and by ops.ts.
struct Split {
  int chunks, chunkLen;
};
__device__ __forceinline__ Split decode_split(int ctx, int maxSplits, int minChunk) {
  int n = (ctx + minChunk - 1) / minChunk;
  n = max(1, min(maxSplits, n));
  int per = (ctx + n - 1) / n;
  per = (per + 63) / 64 * 64;
  return Split{max(1, (ctx + per - 1) / per), per};
}

// Issues the cp.async copies of keys [j0, j0 + ROWS) of one KV head into dst[ROWS][D + 8];
// keys >= jEnd are zero-filled (never read, so masked probabilities meet zeros, not NaNs).
template <int D, int ROWS>
__device__ __forceinline__ void load_kv_tile(unsigned dst, const bf16* __restrict__ cache, const int* __restrict__ table,
                                             int j0, int jEnd, int blockSize, int nKv, int hkv) {
  constexpr int LD = D + 8, CPR = D / 8;
#pragma unroll
  for (int i = 0; i < (ROWS * CPR + kThreads - 1) / kThreads; i++) {
    const int ci = threadIdx.x + i * kThreads;
    if ((ROWS * CPR) % kThreads == 0 || ci < ROWS * CPR) {
      const int r = ci / CPR, part = ci % CPR;
      const int j = j0 + r;
      const bool valid = j < jEnd;
      const bf16* src = cache;
      if (valid) {
        const long long slot = (long long)table[j / blockSize] * blockSize + j % blockSize;
        src = cache + (slot * nKv + hkv) * D + part * 8;
      }
      cp_async16(dst + 2u * (r * LD + part * 8), src, valid);
    }
  }
}

// S[nt] = Q K^T for the 16 query rows in (qh + lo) and keys kbase[0 .. 8*NT) (rows of LD
// elements). The lo part (kQSplit) comes from registers ql, or, when LO_SMEM, from a
// 16 x D bf16 tile at shared address qlBase (LD-strided), fragment by fragment (the decode
// kernel, whose register budget holds only one copy of Q).
template <int D, int NT, bool LO_SMEM = false>
__device__ __forceinline__ void qk_tile(float (*s)[4], const unsigned (*qh)[4], const unsigned (*ql)[4], unsigned kbase,
                                        int lane, unsigned qlBase = 0) {
  constexpr int LD = D + 8;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    unsigned lf[4];
    if constexpr (kQSplit && LO_SMEM) ldmatrix_x4(lf, a_frag(qlBase, LD, 0, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NT / 2; np++) {
      unsigned b[4];
      ldmatrix_x4(b, bt_frag(kbase, LD, np * 16, kk * 16, lane));
      mma_bf16(s[2 * np], qh[kk], b[0], b[1]);
      mma_bf16(s[2 * np + 1], qh[kk], b[2], b[3]);
      if constexpr (kQSplit) {
        const unsigned* lo = LO_SMEM ? lf : ql[kk];
        mma_bf16(s[2 * np], lo, b[0], b[1]);
        mma_bf16(s[2 * np + 1], lo, b[2], b[3]);
      }
    }
  }
}

// O += P V for P in s (NT key n-tiles of 8 keys, as accumulators) and V rows vbase[0 .. 8*NT).
template <int D, int NT>
__device__ __forceinline__ void pv_tile(float (*o)[4], float (*s)[4], unsigned vbase, int lane) {
  constexpr int LD = D + 8;
#pragma unroll
  for (int ks = 0; ks < NT / 2; ks++) {
    unsigned a[4];
    a[0] = pack_bf16x2(s[2 * ks][0], s[2 * ks][1]);
    a[1] = pack_bf16x2(s[2 * ks][2], s[2 * ks][3]);
    a[2] = pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
    a[3] = pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; dp++) {
      unsigned b[4];
      ldmatrix_x4_trans(b, b_trans_frag(vbase, LD, ks * 16, dp * 16, lane));
      mma_bf16(o[2 * dp], a, b[0], b[1]);
      mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Online-softmax update of the two rows a thread holds (r0: elements 0,1; r1: elements 2,3).
// s holds scaled (log2-domain) scores with masked entries at -inf; on return it holds p.
template <int D, int NT>
__device__ __forceinline__ void softmax_update(float (*s)[4], float (*o)[4], float* m, float* l) {
  float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
    mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
  // A row that has seen no key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
  const float b0 = n0 == neg_inf() ? 0.f : n0, b1 = n1 == neg_inf() ? 0.f : n1;
  const float al0 = exp2f(m[0] - b0), al1 = exp2f(m[1] - b1);
  m[0] = n0;
  m[1] = n1;
  float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    s[nt][0] = exp2f(s[nt][0] - b0);
    s[nt][1] = exp2f(s[nt][1] - b0);
    s[nt][2] = exp2f(s[nt][2] - b1);
    s[nt][3] = exp2f(s[nt][3] - b1);
    rs0 += s[nt][0] + s[nt][1];
    rs1 += s[nt][2] + s[nt][3];
  }
  l[0] = l[0] * al0 + rs0;
  l[1] = l[1] * al1 + rs1;
#pragma unroll
  for (int dn = 0; dn < D / 8; dn++) {
    o[dn][0] *= al0;
    o[dn][1] *= al0;
    o[dn][2] *= al1;
    o[dn][3] *= al1;
  }
}

// hi = bf16(v), lo = bf16(v - hi), each as a packed pair (low half: v.x).
__device__ __forceinline__ void split_pair(float2 v, unsigned& hi, unsigned& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
  const float2 hf = __bfloat1622float2(h);
  hi = *reinterpret_cast<const unsigned*>(&h);
  lo = pack_bf16x2(v.x - hf.x, v.y - hf.y);
}

// The A-operand fragments (m16n8k16, every k-step) of a 16-row f32 Q block, read from
// global memory: this thread holds rows g (row0) and g + 8 (row1), columns 2*c4 + {0, 1}
// and 2*c4 + 8 + {0, 1} of each 16-column step (the layout ldmatrix_x4 of a_frag gives).
// A null row reads as zeros. qh = bf16(q), ql = bf16(q - qh) (only when kQSplit). When
// LO_SMEM, lo goes to the 16 x D bf16 tile `loTile` (LD-strided; rows g and g + 8) instead
// of ql, written only by warp 0 (every warp holds the same 16 rows).
template <int D, bool LO_SMEM = false>
__device__ __forceinline__ void load_q_frags_f32(unsigned (*qh)[4], unsigned (*ql)[4], const float* __restrict__ row0,
                                                 const float* __restrict__ row1, int c4, bf16* loTile = nullptr,
                                                 int g = 0) {
  const float2 zero = make_float2(0.f, 0.f);
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    const int c = kk * 16 + 2 * c4;
    const float2 v[4] = {
        row0 ? *reinterpret_cast<const float2*>(row0 + c) : zero,
        row1 ? *reinterpret_cast<const float2*>(row1 + c) : zero,
        row0 ? *reinterpret_cast<const float2*>(row0 + c + 8) : zero,
        row1 ? *reinterpret_cast<const float2*>(row1 + c + 8) : zero,
    };
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned lo;
      split_pair(v[j], qh[kk][j], lo);
      if constexpr (kQSplit && !LO_SMEM) ql[kk][j] = lo;
      if constexpr (kQSplit && LO_SMEM) {
        // fragment j holds row g + 8 * (j & 1), columns c + 8 * (j >> 1) + {0, 1}
        constexpr int LD = D + 8;
        if (threadIdx.x < 32) *reinterpret_cast<unsigned*>(loTile + (g + 8 * (j & 1)) * LD + c + 8 * (j >> 1)) = lo;
      }
    }
  }
}

// ------------------------------------------------------------------------------------
// Prefill: one CTA per (sequence tile of 64 packed rows, KV head).

template <int D>
__device__ __forceinline__ void attn_prefill(bf16* __restrict__ out, const float* __restrict__ q,
                                             const bf16* __restrict__ kCache, const bf16* __restrict__ vCache,
                                             const int* __restrict__ queryStart, const int* __restrict__ positions,
                                             const int* __restrict__ blockTables, const int* __restrict__ counts,
                                             int seqCap, int maxBlocksPerSeq, int blockSize, int nH, int nKv, float scale) {
  constexpr int BM = 64, BN = 64, LD = D + 8, NT = BN / 8;
  __shared__ __align__(16) bf16 kv[2 * BN * LD];
  extern __shared__ int pre[];  // [seqCap + 1]
  const unsigned ks = smem_addr(kv);
  const unsigned vs = ks + 2u * BN * LD;

  const int G = nH / nKv, TQ = BM / G;
  const int numSeqs = min(counts[1], seqCap);
  const int total = build_prefix(pre, numSeqs, [&](int s) {
    const int ql = queryStart[s + 1] - queryStart[s];
    return ql > 1 ? (ql + TQ - 1) / TQ : 0;
  });
  const int b = blockIdx.x;
  if (b >= total) return;
  const int s = find_segment(pre, numSeqs, b);
  const int hkv = blockIdx.y;
  const int t0 = queryStart[s] + (b - pre[s]) * TQ;
  const int nTok = min(TQ, queryStart[s + 1] - t0);
  const int* table = blockTables + (long long)s * maxBlocksPerSeq;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;

  // Causal limits of this thread's two rows; padding rows attend key 0 and are not written.
  int pos[2];
  bool rowValid[2];
  int rowTok[2], rowHead[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = warp * 16 + g + 8 * i;
    const int tok = r / G;
    rowValid[i] = tok < nTok;
    rowTok[i] = t0 + tok;
    rowHead[i] = hkv * G + r % G;
    pos[i] = rowValid[i] ? positions[t0 + tok] : 0;
  }
  int maxPos = 0, minPos = 0x7fffffff;
  for (int i = 0; i < nTok; i++) {
    const int p = positions[t0 + i];
    maxPos = max(maxPos, p);
    minPos = min(minPos, p);
  }
  const int kvEnd = maxPos + 1;

  const int nTiles = (kvEnd + BN - 1) / BN;
  load_kv_tile<D, BN>(ks, kCache, table, 0, kvEnd, blockSize, nKv, hkv);
  cp_async_commit();
  load_kv_tile<D, BN>(vs, vCache, table, 0, kvEnd, blockSize, nKv, hkv);
  cp_async_commit();

  // This warp's 16 rows of Q (f32) straight into registers while the first tile lands.
  unsigned qh[D / 16][4], ql[kQSplit ? D / 16 : 1][4];
  load_q_frags_f32<D>(qh, ql, rowValid[0] ? q + ((long long)rowTok[0] * nH + rowHead[0]) * D : nullptr,
                      rowValid[1] ? q + ((long long)rowTok[1] * nH + rowHead[1]) * D : nullptr, c4);

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
  const float sl2 = scale * 1.4426950408889634f;

  for (int jt = 0; jt < nTiles; jt++) {
    const int j0 = jt * BN;
    const bool more = jt + 1 < nTiles;
    cp_async_wait<1>();  // K of this tile has landed (V may still be in flight)
    __syncthreads();
    float s[NT][4];
    qk_tile<D, NT>(s, qh, ql, ks, lane);
    __syncthreads();  // every warp is done with K: the next tile's K may overwrite it
    if (more) {
      load_kv_tile<D, BN>(ks, kCache, table, j0 + BN, kvEnd, blockSize, nKv, hkv);
      cp_async_commit();
    }
    const bool needMask = j0 + BN - 1 > minPos;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float v = s[nt][e] * sl2;
        if (needMask && j0 + nt * 8 + 2 * c4 + (e & 1) > pos[e >> 1]) v = neg_inf();
        s[nt][e] = v;
      }
    }
    softmax_update<D, NT>(s, o, m, l);
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();  // V of this tile has landed
    pv_tile<D, NT>(o, s, vs, lane);
    __syncthreads();  // every warp is done with V
    if (more) {
      load_kv_tile<D, BN>(vs, vCache, table, j0 + BN, kvEnd, blockSize, nKv, hkv);
      cp_async_commit();
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (!rowValid[i]) continue;
    const float inv = 1.f / l[i];
    bf16* dst = out + ((long long)rowTok[i] * nH + rowHead[i]) * D + 2 * c4;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
      *reinterpret_cast<__nv_bfloat162*>(dst + dn * 8) = __floats2bfloat162_rn(o[dn][2 * i] * inv, o[dn][2 * i + 1] * inv);
    }
  }
}

// ------------------------------------------------------------------------------------
// Decode: persistent CTAs over work items (sequence, chunk, head group).

template <int D>
__device__ __forceinline__ void attn_decode(bf16* __restrict__ out, float* __restrict__ scratch, const float* __restrict__ q,
                                            const bf16* __restrict__ kCache, const bf16* __restrict__ vCache,
                                            const int* __restrict__ queryStart, const int* __restrict__ positions,
                                            const int* __restrict__ blockTables, const int* __restrict__ counts,
                                            int seqCap, int maxBlocksPerSeq, int blockSize, int nH, int nKv, float scale,
                                            int maxSplits, int minChunk) {
  constexpr int NW = kThreads / 32, BN = 16 * NW, LD = D + 8;
  __shared__ __align__(16) bf16 kv[2 * BN * LD];
  __shared__ __align__(16) bf16 qlo[kQSplit ? 16 * LD : 8];  // Q's lo parts (see qk_tile)
  extern __shared__ int pre[];  // [seqCap + 1]
  const unsigned ks = smem_addr(kv);
  const unsigned vs = ks + 2u * BN * LD;
  const unsigned qloA = smem_addr(qlo);

  const int G = nH / nKv, gPerKv = (G + 15) / 16, nGroups = nKv * gPerKv;
  const int numSeqs = min(counts[1], seqCap);
  const int totalChunks = build_prefix(pre, numSeqs, [&](int s) {
    const int t = queryStart[s];
    if (queryStart[s + 1] - t != 1) return 0;
    return decode_split(positions[t] + 1, maxSplits, minChunk).chunks;
  });
  const int items = totalChunks * nGroups;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const float sl2 = scale * 1.4426950408889634f;
  const long long partStride = (long long)seqCap * kMaxSplits * nH;  // rows of the partial-O block

  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int grp = item % nGroups, ci = item / nGroups;
    const int s = find_segment(pre, numSeqs, ci);
    const int c = ci - pre[s];
    const int t = queryStart[s];
    const int ctx = positions[t] + 1;
    const Split sp = decode_split(ctx, maxSplits, minChunk);
    const int nChunks = sp.chunks, chunkLen = sp.chunkLen;
    const int jBegin = c * chunkLen, jEnd = min(ctx, jBegin + chunkLen);
    const int hkv = grp / gPerKv, head0 = hkv * G + (grp % gPerKv) * 16;
    const int nRows = min(16, G - (grp % gPerKv) * 16);
    const int* table = blockTables + (long long)s * maxBlocksPerSeq;

    load_kv_tile<D, BN>(ks, kCache, table, jBegin, jEnd, blockSize, nKv, hkv);
    cp_async_commit();
    load_kv_tile<D, BN>(vs, vCache, table, jBegin, jEnd, blockSize, nKv, hkv);
    cp_async_commit();
    // Q rows (up to 16 heads of this KV group; zeros past the group), f32 from global
    // while the first K/V tile lands: hi parts into registers (every warp holds all 16
    // rows), lo parts into shared memory (the tile loop's first barrier publishes them).
    unsigned qh[D / 16][4];
    load_q_frags_f32<D, true>(qh, nullptr, g < nRows ? q + ((long long)t * nH + head0 + g) * D : nullptr,
                              g + 8 < nRows ? q + ((long long)t * nH + head0 + g + 8) * D : nullptr, c4, qlo, g);

    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};

    const int nTiles = (jEnd - jBegin + BN - 1) / BN;
    for (int jt = 0; jt < nTiles; jt++) {
      const int j0 = jBegin + jt * BN;
      const bool more = jt + 1 < nTiles;
      cp_async_wait<1>();
      __syncthreads();
      float sc[2][4];
      qk_tile<D, 2, true>(sc, qh, nullptr, ks + 2u * warp * 16 * LD, lane, qloA);
      __syncthreads();
      if (more) {
        load_kv_tile<D, BN>(ks, kCache, table, j0 + BN, jEnd, blockSize, nKv, hkv);
        cp_async_commit();
      }
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float v = sc[nt][e] * sl2;
          if (j0 + warp * 16 + nt * 8 + 2 * c4 + (e & 1) >= jEnd) v = neg_inf();
          sc[nt][e] = v;
        }
      }
      softmax_update<D, 2>(sc, o, m, l);
      if (more) cp_async_wait<1>();
      else cp_async_wait<0>();
      __syncthreads();
      pv_tile<D, 2>(o, sc, vs + 2u * warp * 16 * LD, lane);
      __syncthreads();
      if (more) {
        load_kv_tile<D, BN>(vs, vCache, table, j0 + BN, jEnd, blockSize, nKv, hkv);
        cp_async_commit();
      }
    }

#pragma unroll
    for (int i = 0; i < 2; i++) {
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    // Merge the warps' states through the (now idle) K/V buffers: warps 1..NW-1 publish
    // (m, l, O) per row, warp 0 combines them with log-sum-exp weights.
    float* mo = reinterpret_cast<float*>(kv);              // [NW-1][16][D]
    float* ml = mo + (NW - 1) * 16 * D;                    // [NW-1][16][2]
    if (warp > 0) {
      float* ow = mo + (warp - 1) * 16 * D;
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const int r = g + 8 * i;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
          *reinterpret_cast<float2*>(ow + r * D + dn * 8 + 2 * c4) = make_float2(o[dn][2 * i], o[dn][2 * i + 1]);
        }
        if (c4 == 0) {
          ml[((warp - 1) * 16 + r) * 2] = m[i];
          ml[((warp - 1) * 16 + r) * 2 + 1] = l[i];
        }
      }
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const int r = g + 8 * i;
        float M = m[i];
        for (int w = 1; w < NW; w++) M = fmaxf(M, ml[((w - 1) * 16 + r) * 2]);
        const float f0 = exp2f(m[i] - M);
        float L = l[i] * f0;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
          o[dn][2 * i] *= f0;
          o[dn][2 * i + 1] *= f0;
        }
        for (int w = 1; w < NW; w++) {
          const float f = exp2f(ml[((w - 1) * 16 + r) * 2] - M);
          L += ml[((w - 1) * 16 + r) * 2 + 1] * f;
          const float* ow = mo + (w - 1) * 16 * D + r * D;
#pragma unroll
          for (int dn = 0; dn < D / 8; dn++) {
            const float2 v = *reinterpret_cast<const float2*>(ow + dn * 8 + 2 * c4);
            o[dn][2 * i] += v.x * f;
            o[dn][2 * i + 1] += v.y * f;
          }
        }
        if (r >= nRows) continue;
        const float inv = 1.f / L;
        const int head = head0 + r;
        if (nChunks == 1) {
          bf16* dst = out + ((long long)t * nH + head) * D + 2 * c4;
#pragma unroll
          for (int dn = 0; dn < D / 8; dn++) {
            *reinterpret_cast<__nv_bfloat162*>(dst + dn * 8) = __floats2bfloat162_rn(o[dn][2 * i] * inv, o[dn][2 * i + 1] * inv);
          }
        } else {
          const long long prow = ((long long)s * kMaxSplits + c) * nH + head;
          float* dst = scratch + prow * D + 2 * c4;
#pragma unroll
          for (int dn = 0; dn < D / 8; dn++) {
            *reinterpret_cast<float2*>(dst + dn * 8) = make_float2(o[dn][2 * i] * inv, o[dn][2 * i + 1] * inv);
          }
          if (c4 == 0) {
            float* mlDst = scratch + partStride * D + prow * 2;
            mlDst[0] = M;
            mlDst[1] = L;
          }
        }
      }
    }
    __syncthreads();  // the buffers are reused by the next item
  }
}

// Merges the chunks of every split decode sequence: out = sum_c w_c O_c with
// w_c = l_c 2^(m_c - max m) / sum_c' (...) (O_c normalized, m in the log2 domain).
// One CTA per sequence; the weights of all heads go to shared memory first.
template <int D>
__device__ __forceinline__ void attn_decode_reduce(bf16* __restrict__ out, const float* __restrict__ scratch,
                                                   const int* __restrict__ queryStart, const int* __restrict__ positions,
                                                   const int* __restrict__ counts, int seqCap, int nH, int maxSplits, int minChunk) {
  extern __shared__ float wsm[];  // [nH][kMaxSplits]
  const int s = blockIdx.x;
  if (s >= min(counts[1], seqCap)) return;
  const int t = queryStart[s];
  if (queryStart[s + 1] - t != 1) return;
  const int n = decode_split(positions[t] + 1, maxSplits, minChunk).chunks;
  if (n <= 1) return;
  const long long partStride = (long long)seqCap * kMaxSplits * nH;
  const float* ml = scratch + partStride * D;
  for (int h = threadIdx.x; h < nH; h += blockDim.x) {
    float M = neg_inf();
    for (int c = 0; c < n; c++) M = fmaxf(M, ml[(((long long)s * kMaxSplits + c) * nH + h) * 2]);
    float W = 0.f;
    for (int c = 0; c < n; c++) {
      const long long prow = ((long long)s * kMaxSplits + c) * nH + h;
      const float w = ml[prow * 2 + 1] * exp2f(ml[prow * 2] - M);
      wsm[h * kMaxSplits + c] = w;
      W += w;
    }
    const float inv = 1.f / W;
    for (int c = 0; c < n; c++) wsm[h * kMaxSplits + c] *= inv;
  }
  __syncthreads();
  for (int hd = threadIdx.x; hd < nH * D; hd += blockDim.x) {
    const int h = hd / D, d = hd % D;
    float acc = 0.f;
    for (int c = 0; c < n; c++) acc += wsm[h * kMaxSplits + c] * scratch[(((long long)s * kMaxSplits + c) * nH + h) * D + d];
    out[((long long)t * nH + h) * D + d] = __float2bfloat16_rn(acc);
  }
}

}  // namespace

extern "C" __global__ void kv_cache_write_f32(bf16* __restrict__ kCache, bf16* __restrict__ vCache,
                                              const float* __restrict__ k, const float* __restrict__ v,
                                              const int* __restrict__ slotMapping, const int* __restrict__ live, int cap,
                                              int rowWidth) {
  const int t = blockIdx.x;
  if (t >= live_rows(live, cap)) return;
  const long long slot = slotMapping[t];
  if (slot < 0) return;
  const float4* ks = reinterpret_cast<const float4*>(k + (long long)t * rowWidth);
  const float4* vs = reinterpret_cast<const float4*>(v + (long long)t * rowWidth);
  uint4* kd = reinterpret_cast<uint4*>(kCache + slot * rowWidth);
  uint4* vd = reinterpret_cast<uint4*>(vCache + slot * rowWidth);
  for (int c = threadIdx.x; c < rowWidth / 8; c += blockDim.x) {
    const float4 k0 = ks[2 * c], k1 = ks[2 * c + 1], v0 = vs[2 * c], v1 = vs[2 * c + 1];
    const float kf[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
    const float vf[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    kd[c] = pack8(kf);
    vd[c] = pack8(vf);
  }
}

#define ATTN_INSTANTIATE(D)                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads) attn_prefill_d##D(                                            \
      bf16* __restrict__ out, const float* __restrict__ q, const bf16* __restrict__ kCache,                            \
      const bf16* __restrict__ vCache, const int* __restrict__ queryStart, const int* __restrict__ positions,          \
      const int* __restrict__ blockTables, const int* __restrict__ counts, int seqCap, int maxBlocksPerSeq,            \
      int blockSize, int nH, int nKv, float scale) {                                                                   \
    attn_prefill<D>(out, q, kCache, vCache, queryStart, positions, blockTables, counts, seqCap, maxBlocksPerSeq,      \
                    blockSize, nH, nKv, scale);                                                                        \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads, 3) attn_decode_d##D(                                           \
      bf16* __restrict__ out, float* __restrict__ scratch, const float* __restrict__ q,                                \
      const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, const int* __restrict__ queryStart,            \
      const int* __restrict__ positions, const int* __restrict__ blockTables, const int* __restrict__ counts,          \
      int seqCap, int maxBlocksPerSeq, int blockSize, int nH, int nKv, float scale, int maxSplits, int minChunk) {     \
    attn_decode<D>(out, scratch, q, kCache, vCache, queryStart, positions, blockTables, counts, seqCap,               \
                   maxBlocksPerSeq, blockSize, nH, nKv, scale, maxSplits, minChunk);                                   \
  }                                                                                                                    \
  extern "C" __global__ void attn_decode_reduce_d##D(bf16* __restrict__ out, const float* __restrict__ scratch,        \
                                                     const int* __restrict__ queryStart,                               \
                                                     const int* __restrict__ positions,                                \
                                                     const int* __restrict__ counts, int seqCap, int nH,               \
                                                     int maxSplits, int minChunk) {                                    \
    attn_decode_reduce<D>(out, scratch, queryStart, positions, counts, seqCap, nH, maxSplits, minChunk);               \
  }

ATTN_INSTANTIATE(32)
ATTN_INSTANTIATE(64)
ATTN_INSTANTIATE(80)
ATTN_INSTANTIATE(96)
ATTN_INSTANTIATE(128)
