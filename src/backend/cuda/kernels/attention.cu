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
// carries ~16 bits of q's mantissa (error ~2^-17 |q|) instead of bf16's 8. In prefill the
// second product costs one more mma per QK^T step (the K fragments are shared), a few
// percent; decode puts hi and lo in the two halves of one mma's rows, so it costs nothing.
//
// Kernels (D = head dim, one instantiation per supported D: 32, 64, 80, 96, 128):
//   kv_cache_write_f32             one CTA per token row: 2 float4 in, one 16-byte bf16 vector out;
//       also zeroes the split-decode arrival counters (see "Decode").
//   attn_prefill_d{D}              sequences with more than one query row. FlashAttention-2
//       style: a CTA owns 64 "rows" = (query token, head of one KV group) pairs of one
//       sequence (GQA packing: the G heads sharing a KV head share every K/V tile), 4 warps
//       of 16 rows; K/V tiles of 64 keys stream through shared memory with cp.async (K of the
//       next tile loads while this tile's softmax and PV run); QK^T and PV on tensor cores
//       (mma.sync m16n8k16 bf16, f32 accumulate); online softmax in f32 (exp2 with the
//       scale folded in). P is rounded to bf16 for the PV product, as FlashAttention does.
//   attn_decode_d{D}               sequences with exactly one query row (decode). Work items
//       are (sequence, chunk, group of up to 8 query heads of one KV head), and ONE warp
//       owns an item end to end. Long contexts are split into up to MAX_SPLITS chunks
//       (flash-decoding); the split depends only on the sequence's own context length,
//       never on the batch, so a sequence's result does not depend on what it is batched
//       with. The grid is persistent and one wave (items are found on the device from
//       counts / queryStart / positions), so one captured graph serves any batch within
//       the capacity. Split sequences are merged in the same launch (see "Decode" below).
//
// Decode. One query row per sequence makes decode a stream of the KV cache: it is bound by
// how many bytes each SM keeps in flight (~35-40 KB at an H100's ~3 TB/s and its loaded
// latency) at every moment, and by serial latency chains, not by math. The previous kernel
// (4 warps splitting each 64-key tile, one K and one V buffer) issued the next K tile only
// after this tile's QK^T and the next V after PV, so every tile cost a memory round trip;
// every item began with dependent global loads (sequence lookup, Q, block table) and ended
// with a cross-warp softmax merge through shared memory and barriers: 1.0-2.0 TB/s, and
// shorter chunks were slower. Now:
//   - each warp streams its item through its own 3-stage ring of 16-key (K, V) tiles in
//     dynamic shared memory (cp.async): while stage k is computed, k+1 and k+2 are in
//     flight (17 KB per warp at D = 128, ~140 KB per SM with every warp busy, so a warp
//     stalled on its item's set-up or on a late tile costs the SM nothing). A stage's
//     block-table entries are loaded a step before its copies are issued;
//   - after the prologue there is no block-wide barrier: warps synchronize with
//     __syncwarp only and never wait for each other, and a single warp's online softmax
//     needs no merge at the end of an item;
//   - each CTA computes every sequence's query row, context and chunk prefix once, into
//     shared memory, so an item's set-up touches global memory only for Q and the table;
//   - QK^T takes A = [q_hi of 8 heads; q_lo of the same heads]: one mma gives both
//     products and S = row g + row g+8 in-thread (kQSplit at no cost). PV is computed
//     transposed, O^T = V^T P^T: S's accumulator layout (head g, keys 2*c4 + {0, 1}) is
//     exactly P^T's B-fragment layout, so P stays in its registers, a stage needs D/16
//     PV mmas, and O takes D/4 registers per thread instead of D/2. Items hold 8 heads, so
//     GQA groups up to 8 (Llama, Mistral, Qwen) read K/V once; larger groups take several
//     items of the same KV head, which run side by side and share the reads through L2;
//   - a split (sequence, head group) is merged by the warp that completes its last chunk
//     (an arrival counter per group; partials are published with a fence before it), in
//     chunk order, so the result does not depend on which chunk finished last. This
//     replaces a separate reduce launch, which cost a launch and a chain of dependent
//     loads on every step even when nothing split. kv_cache_write_f32, launched just
//     before on the same stream, zeroes the counters, so every launch (and graph replay)
//     starts from zero.
// Occupancy: the ring is 768 * (D + 8) bytes per CTA (D = 128: 102 KB), so 2 CTAs per SM
// at D = 96 and 128, 3 at 80, 4 at 64 and 32 (registers: __launch_bounds__ below); ops.ts
// sizes the grid to exactly that, assuming an H100's 228 KB of shared memory per SM.
//
// Every row's result depends only on its own sequence: fully masked key tiles leave the
// online-softmax state bit-for-bit unchanged, so tile-mates never matter. Sequences are
// split between the two kernels by their own query length (1: decode, >1: prefill), so
// a mixed step launches both and each skips the other's sequences.
//
// Decode scratch (maxSplits > 1): f32, [seqCap, MAX_SPLITS, nH, D] normalized partial
// outputs followed by [seqCap, MAX_SPLITS, nH, 2] (max in the log2 domain, sum of exp),
// then i32 arrival counters [seqCap, nH] (one per (sequence, head group) used). maxSplits
// = 1 needs no scratch (every context in one pass).
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
// elements); the lo parts (kQSplit) come from ql.
template <int D, int NT>
__device__ __forceinline__ void qk_tile(float (*s)[4], const unsigned (*qh)[4], const unsigned (*ql)[4], unsigned kbase,
                                        int lane) {
  constexpr int LD = D + 8;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
    for (int np = 0; np < NT / 2; np++) {
      unsigned b[4];
      ldmatrix_x4(b, bt_frag(kbase, LD, np * 16, kk * 16, lane));
      mma_bf16(s[2 * np], qh[kk], b[0], b[1]);
      mma_bf16(s[2 * np + 1], qh[kk], b[2], b[3]);
      if constexpr (kQSplit) {
        mma_bf16(s[2 * np], ql[kk], b[0], b[1]);
        mma_bf16(s[2 * np + 1], ql[kk], b[2], b[3]);
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
// A null row reads as zeros. qh = bf16(q), ql = bf16(q - qh) (only when kQSplit).
template <int D>
__device__ __forceinline__ void load_q_frags_f32(unsigned (*qh)[4], unsigned (*ql)[4], const float* __restrict__ row0,
                                                 const float* __restrict__ row1, int c4) {
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
      if constexpr (kQSplit) ql[kk][j] = lo;
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
// Decode: persistent warps over work items (sequence, chunk, group of 8 query heads).

constexpr int kDecodeWarps = 4;   // warps per CTA; each is an independent worker
constexpr int kDecodeKeys = 16;   // keys per pipeline stage (one m16n8k16 k-step of PV)
constexpr int kDecodeStages = 3;  // a warp's ring: two stages in flight while one is computed
constexpr int kDecodeHeads = 8;   // query heads per item: mma rows 0-7 carry q_hi, rows 8-15 q_lo
static_assert(kMaxSplits <= 16, "the chunk merge holds 4 chunks per lane of a quad");

// CTAs per SM the launch assumes (ops.ts DECODE_CTAS_PER_SM mirrors it): what the ring fits
// in an H100's 228 KB of shared memory per SM, enforced for registers by __launch_bounds__.
template <int D>
constexpr int kDecodeMinBlocks = D <= 64 ? 4 : D <= 80 ? 3 : 2;

template <int D>
struct DecodeRing {
  static constexpr int LD = D + 8;                                    // padded rows: conflict-free ldmatrix
  static constexpr int kTileBytes = kDecodeKeys * LD * 2;             // K or V of one stage
  static constexpr int kStageBytes = 2 * kTileBytes;                  // K, then V
  static constexpr int kWarpBytes = kDecodeStages * kStageBytes;      // one warp's ring
  static constexpr int kBytes = kDecodeWarps * kWarpBytes;            // every warp's ring (the smem head)
};

// 16-byte L2-coherent loads (bypassing L1) of partials other warps wrote in this launch.
__device__ __forceinline__ float2 ld_cg_f2(const float* p) {
  float2 v;
  asm volatile("ld.global.cg.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ float4 ld_cg_f4(const float* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p) : "memory");
  return v;
}

// Merges the nChunks partials of one (sequence, head group) into out (bf16), in chunk
// order, so the result does not depend on which chunk finished last:
//   out = sum_c w_c O_c,  w_c = l_c 2^(m_c - max m) / sum_c' (...)   (O_c normalized, m log2-domain).
// Run by the warp that completed the group's last chunk; wsm: 8 x 16 floats of its idle ring.
template <int D>
__device__ __forceinline__ void merge_chunks(bf16* __restrict__ dst, const float* __restrict__ part,
                                             const float* __restrict__ ml, long long row0, int nH, int nRows,
                                             int nChunks, float* wsm, int lane) {
  {
    // Lanes 4h..4h+3 take head h, chunks (lane & 3) + 4i.
    const int h = lane >> 2;
    float mc[4], lc[4], M = neg_inf();
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = (lane & 3) + 4 * i;
      mc[i] = neg_inf();
      lc[i] = 0.f;
      if (h < nRows && c < nChunks) {
        const float2 v = ld_cg_f2(ml + (row0 + (long long)c * nH + h) * 2);
        mc[i] = v.x;
        lc[i] = v.y;
        M = fmaxf(M, v.x);
      }
    }
    M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, 1));
    M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, 2));
    float W = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      lc[i] = lc[i] == 0.f ? 0.f : lc[i] * exp2f(mc[i] - M);  // absent chunks: 0 (not 0 * NaN)
      W += lc[i];
    }
    W += __shfl_xor_sync(0xffffffffu, W, 1);
    W += __shfl_xor_sync(0xffffffffu, W, 2);
    const float inv = 1.f / W;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = (lane & 3) + 4 * i;
      if (h < nRows && c < nChunks) wsm[h * 16 + c] = lc[i] * inv;
    }
  }
  __syncwarp();
  constexpr int Q4 = D / 4, kBatch = 8;  // chunks whose loads are in flight together
  for (int idx = lane; idx < nRows * Q4; idx += 32) {
    const int h = idx / Q4, dq = idx % Q4;
    const float* src = part + (row0 + h) * D + 4 * dq;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int c0 = 0; c0 < kMaxSplits; c0 += kBatch) {
      if (c0 >= nChunks) break;
      float4 v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; i++) {
        if (c0 + i < nChunks) v[i] = ld_cg_f4(src + (long long)(c0 + i) * nH * D);
      }
#pragma unroll
      for (int i = 0; i < kBatch; i++) {
        if (c0 + i < nChunks) {
          const float w = wsm[h * 16 + c0 + i];
          acc.x += w * v[i].x;
          acc.y += w * v[i].y;
          acc.z += w * v[i].z;
          acc.w += w * v[i].w;
        }
      }
    }
    uint2 packed;
    packed.x = pack_bf16x2(acc.x, acc.y);
    packed.y = pack_bf16x2(acc.z, acc.w);
    *reinterpret_cast<uint2*>(dst + (long long)h * D + 4 * dq) = packed;
  }
  __syncwarp();  // wsm is the ring the next item's copies land in
}

template <int D>
__device__ __forceinline__ void attn_decode(bf16* __restrict__ out, float* __restrict__ scratch, const float* __restrict__ q,
                                            const bf16* __restrict__ kCache, const bf16* __restrict__ vCache,
                                            const int* __restrict__ queryStart, const int* __restrict__ positions,
                                            const int* __restrict__ blockTables, const int* __restrict__ counts,
                                            int seqCap, int maxBlocksPerSeq, int blockSize, int nH, int nKv, float scale,
                                            int maxSplits, int minChunk) {
  using Ring = DecodeRing<D>;
  constexpr int LD = Ring::LD, KT = D / 16, CPR = D / 8;
  extern __shared__ __align__(16) unsigned char decodeSmem[];
  // [rings][pre: seqCap + 1][seqT: seqCap][seqCtx: seqCap] (ops.ts decodeSmemBytes)
  int* pre = reinterpret_cast<int*>(decodeSmem + Ring::kBytes);
  int* seqT = pre + seqCap + 1;
  int* seqCtx = seqT + seqCap;

  const int G = nH / nKv, gPerKv = (G + kDecodeHeads - 1) / kDecodeHeads, nGroups = nKv * gPerKv;
  const int numSeqs = min(counts[1], seqCap);
  // Every sequence's query row, context and chunk count, once per CTA, so that an item's
  // set-up reads shared memory only; pre = the exclusive prefix of the chunk counts.
  {
    const int per = (numSeqs + blockDim.x - 1) / blockDim.x;
    const int lo = min(numSeqs, (int)threadIdx.x * per), hi = min(numSeqs, lo + per);
    int local = 0;
    for (int s = lo; s < hi; s++) {
      const int t = queryStart[s];
      const bool dec = queryStart[s + 1] - t == 1;
      const int ctx = dec ? positions[t] + 1 : 0;
      const int n = dec ? decode_split(ctx, maxSplits, minChunk).chunks : 0;
      seqT[s] = t;
      seqCtx[s] = ctx;
      pre[s] = n;
      local += n;
    }
    int total;
    int run = block_exclusive_scan(local, &total);
    for (int s = lo; s < hi; s++) {
      const int n = pre[s];
      pre[s] = run;
      run += n;
    }
    if (threadIdx.x == 0) pre[numSeqs] = total;
    __syncthreads();  // the last block-wide barrier: from here on, warps run their own items
  }
  const int items = pre[numSeqs] * nGroups;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c4 = lane & 3, r16 = lane & 15;
  const unsigned ring = smem_addr(decodeSmem) + warp * Ring::kWarpBytes;
  const float sl2 = scale * 1.4426950408889634f;
  const long long partStride = (long long)seqCap * kMaxSplits * nH;  // rows of the partial-O block
  const long long slotElems = (long long)nKv * D;                     // one cache slot: every KV head

  // Warp w of CTA b takes items w * gridDim.x + b, then strides by every warp of the grid:
  // consecutive items spread over CTAs (SMs) first, so a short list still loads every SM.
  for (int item = warp * gridDim.x + blockIdx.x; item < items; item += kDecodeWarps * gridDim.x) {
    const int grp = item % nGroups, ci = item / nGroups;
    const int s = find_segment(pre, numSeqs, ci);
    const int c = ci - pre[s];
    const int t = seqT[s], ctx = seqCtx[s];
    const Split sp = decode_split(ctx, maxSplits, minChunk);
    const int jBegin = c * sp.chunkLen, jEnd = min(ctx, jBegin + sp.chunkLen);
    const int hkv = grp / gPerKv, sub = grp % gPerKv;
    const int head0 = hkv * G + sub * kDecodeHeads, nRows = min(kDecodeHeads, G - sub * kDecodeHeads);
    const int* table = blockTables + (long long)s * maxBlocksPerSeq;
    const long long headOff = (long long)hkv * D;

    // This lane's head (g) of q, f32; its loads overlap the block-table loads below.
    float2 qv[KT][2];
    {
      const float* qrow = q + ((long long)t * nH + head0 + g) * D + 2 * c4;
#pragma unroll
      for (int kk = 0; kk < KT; kk++) {
        qv[kk][0] = g < nRows ? *reinterpret_cast<const float2*>(qrow + kk * 16) : make_float2(0.f, 0.f);
        qv[kk][1] = g < nRows ? *reinterpret_cast<const float2*>(qrow + kk * 16 + 8) : make_float2(0.f, 0.f);
      }
    }

    // Lane r (and r + 16) holds the cache slot of key j0 + r of a stage (-1 past the chunk:
    // those rows are zero-filled and masked). One stage's slots are loaded a step before
    // its copies are issued, so the block-table load is off the copy path.
    auto slot_of = [&](int j) { return j < jEnd ? table[j / blockSize] * blockSize + j % blockSize : -1; };
    auto issue = [&](unsigned kdst, int slotLane) {
#pragma unroll
      for (int i = 0; i < KT; i++) {
        const int ch = lane + 32 * i, r = ch / CPR, part = ch % CPR;
        const int slot = __shfl_sync(0xffffffffu, slotLane, r);
        const bool valid = slot >= 0;
        const long long off = valid ? slot * slotElems + headOff + part * 8 : 0;
        const unsigned so = 2u * (r * LD + part * 8);
        cp_async16(kdst + so, kCache + off, valid);
        cp_async16(kdst + Ring::kTileBytes + so, vCache + off, valid);
      }
    };

    __syncwarp();  // the previous item's last reads of the ring are done
    const int nT = (jEnd - jBegin + kDecodeKeys - 1) / kDecodeKeys;
    issue(ring, slot_of(jBegin + r16));
    cp_async_commit();
    int slotNext = slot_of(jBegin + kDecodeKeys + r16);
    if (nT > 1) issue(ring + Ring::kStageBytes, slotNext);
    cp_async_commit();
    slotNext = slot_of(jBegin + 2 * kDecodeKeys + r16);

    // A = [q_hi; q_lo] of 8 heads (rows g and g + 8), so one QK^T mma gives both products
    // and S = row g + row g + 8 in-thread (kQSplit without a second mma).
    unsigned qf[KT][4];
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
      split_pair(qv[kk][0], qf[kk][0], qf[kk][1]);
      split_pair(qv[kk][1], qf[kk][2], qf[kk][3]);
    }

    // O^T (D x 8 heads) accumulates V^T P^T: rows = dims 16*dt + g (+8), columns = heads
    // 2*c4, 2*c4 + 1. S's accumulator layout (head g, keys 2*c4 + {0, 1} per n-tile) is
    // exactly P^T's B-fragment layout, so P never moves between lanes; the transposed
    // product needs D/16 mmas per stage instead of D/8, and no register is spent on
    // the 8 empty rows of a 16-row tile.
    float o[KT][4];
#pragma unroll
    for (int dt = 0; dt < KT; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m = neg_inf(), l = 0.f;  // head g's running max (log2 domain) and this lane's part of the sum

    unsigned bufC = ring, bufI = ring + 2 * Ring::kStageBytes;
    const unsigned ringEnd = ring + Ring::kWarpBytes;
    for (int k = 0; k < nT; k++) {
      cp_async_wait<kDecodeStages - 2>();  // stage k has landed (this lane's copies)...
      __syncwarp();                        // ...and every lane's; stage k - 1's buffer is free
      if (k + kDecodeStages - 1 < nT) issue(bufI, slotNext);
      cp_async_commit();
      slotNext = slot_of(jBegin + (k + kDecodeStages) * kDecodeKeys + r16);
      bufI = bufI + Ring::kStageBytes == ringEnd ? ring : bufI + Ring::kStageBytes;

      const int j0 = jBegin + k * kDecodeKeys;
      float sc[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KT; kk++) {
        unsigned b[4];
        ldmatrix_x4(b, bt_frag(bufC, LD, 0, kk * 16, lane));
        mma_bf16(sc[0], qf[kk], b[0], b[1]);
        mma_bf16(sc[1], qf[kk], b[2], b[3]);
      }
      float p[2][2], mx = neg_inf();
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const float v = (sc[nt][e] + sc[nt][2 + e]) * sl2;
          p[nt][e] = j0 + nt * 8 + 2 * c4 + e < jEnd ? v : neg_inf();
          mx = fmaxf(mx, p[nt][e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mNew = fmaxf(m, mx);
      // A head that has seen no key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
      const float base = mNew == neg_inf() ? 0.f : mNew;
      const float alpha = exp2f(m - base);
      m = mNew;
      float rs = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
          p[nt][e] = exp2f(p[nt][e] - base);
          rs += p[nt][e];
        }
      }
      l = l * alpha + rs;
      const float aA = __shfl_sync(0xffffffffu, alpha, 8 * c4), aB = __shfl_sync(0xffffffffu, alpha, 8 * c4 + 4);
      const unsigned b0 = pack_bf16x2(p[0][0], p[0][1]), b1 = pack_bf16x2(p[1][0], p[1][1]);
#pragma unroll
      for (int dt = 0; dt < KT; dt++) {
        o[dt][0] *= aA;
        o[dt][1] *= aB;
        o[dt][2] *= aA;
        o[dt][3] *= aB;
        unsigned a[4];
        ldmatrix_x4_trans(a, bt_frag(bufC + Ring::kTileBytes, LD, 0, dt * 16, lane));
        mma_bf16(o[dt], a, b0, b1);
      }
      bufC = bufC + Ring::kStageBytes == ringEnd ? ring : bufC + Ring::kStageBytes;
    }

    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // This lane's output columns: heads hA = 2*c4 and hB = 2*c4 + 1 (their state lives on lanes 4h).
    const int hA = 2 * c4, hB = hA + 1;
    const float invA = 1.f / __shfl_sync(0xffffffffu, l, 4 * hA), invB = 1.f / __shfl_sync(0xffffffffu, l, 4 * hB);
    if (sp.chunks == 1) {
      bf16* dst = out + ((long long)t * nH + head0) * D + g;
#pragma unroll
      for (int dt = 0; dt < KT; dt++) {
        if (hA < nRows) {
          dst[hA * D + dt * 16] = __float2bfloat16_rn(o[dt][0] * invA);
          dst[hA * D + dt * 16 + 8] = __float2bfloat16_rn(o[dt][2] * invA);
        }
        if (hB < nRows) {
          dst[hB * D + dt * 16] = __float2bfloat16_rn(o[dt][1] * invB);
          dst[hB * D + dt * 16 + 8] = __float2bfloat16_rn(o[dt][3] * invB);
        }
      }
      continue;
    }

    // Split: publish this chunk's normalized O and (m, l); the warp that completes the
    // group's last chunk merges them (no separate reduce launch). The arrival counters
    // are zeroed by kv_cache_write_f32, launched just before on the same stream.
    const long long row0 = (long long)s * kMaxSplits * nH + head0;  // partial row of (chunk 0, head0)
    const long long prow = row0 + (long long)c * nH;
    float* part = scratch + prow * D + g;
#pragma unroll
    for (int dt = 0; dt < KT; dt++) {
      if (hA < nRows) {
        part[hA * D + dt * 16] = o[dt][0] * invA;
        part[hA * D + dt * 16 + 8] = o[dt][2] * invA;
      }
      if (hB < nRows) {
        part[hB * D + dt * 16] = o[dt][1] * invB;
        part[hB * D + dt * 16 + 8] = o[dt][3] * invB;
      }
    }
    float* ml = scratch + partStride * D;
    if (c4 == 0 && g < nRows) *reinterpret_cast<float2*>(ml + (prow + g) * 2) = make_float2(m, l);
    int* arrivals = reinterpret_cast<int*>(scratch + partStride * (D + 2));
    __threadfence();  // this lane's partials are visible GPU-wide before the arrival counts
    __syncwarp();
    int prev = 0;
    if (lane == 0) prev = atomicAdd(arrivals + (long long)s * nGroups + grp, 1);
    prev = __shfl_sync(0xffffffffu, prev, 0);
    if (prev == sp.chunks - 1) {
      __threadfence();  // every other chunk's partials (published before its arrival) are visible
      // No other warp touches this counter again in this launch: leave it at zero, as found.
      if (lane == 0) arrivals[(long long)s * nGroups + grp] = 0;
      merge_chunks<D>(out + ((long long)t * nH + head0) * D, scratch, ml, row0, nH, nRows, sp.chunks,
                      reinterpret_cast<float*>(decodeSmem + warp * Ring::kWarpBytes), lane);
    }
  }
}

}  // namespace

// Also zeroes zero[0 .. nZero) (the split-decode arrival counters; nZero = 0 when unused):
// attn_decode_d{D} runs next on the same stream and counts on them starting at 0.
extern "C" __global__ void kv_cache_write_f32(bf16* __restrict__ kCache, bf16* __restrict__ vCache,
                                              const float* __restrict__ k, const float* __restrict__ v,
                                              const int* __restrict__ slotMapping, const int* __restrict__ live, int cap,
                                              int rowWidth, int* __restrict__ zero, int nZero) {
  pdl_wait();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nZero; i += gridDim.x * blockDim.x) zero[i] = 0;
  const int t = blockIdx.x;
  const float4* ks = reinterpret_cast<const float4*>(k + (long long)t * rowWidth);
  const float4* vs = reinterpret_cast<const float4*>(v + (long long)t * rowWidth);
  // The first chunk's loads (row t < cap is in bounds) go out with the live-count load,
  // not after it: one memory latency less on a launch that is all latency.
  const int c0 = threadIdx.x, nChunks = rowWidth / 8;
  float4 k0 = make_float4(0.f, 0.f, 0.f, 0.f), k1 = k0, v0 = k0, v1 = k0;
  if (c0 < nChunks) {
    k0 = ks[2 * c0];
    k1 = ks[2 * c0 + 1];
    v0 = vs[2 * c0];
    v1 = vs[2 * c0 + 1];
  }
  if (t >= live_rows(live, cap)) return;
  const long long slot = slotMapping[t];
  if (slot < 0) return;
  uint4* kd = reinterpret_cast<uint4*>(kCache + slot * rowWidth);
  uint4* vd = reinterpret_cast<uint4*>(vCache + slot * rowWidth);
  for (int c = c0; c < nChunks; c += blockDim.x) {
    if (c != c0) {
      k0 = ks[2 * c];
      k1 = ks[2 * c + 1];
      v0 = vs[2 * c];
      v1 = vs[2 * c + 1];
    }
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
    pdl_wait();                                                                                                        \
    attn_prefill<D>(out, q, kCache, vCache, queryStart, positions, blockTables, counts, seqCap, maxBlocksPerSeq,      \
                    blockSize, nH, nKv, scale);                                                                        \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads, kDecodeMinBlocks<D>) attn_decode_d##D(                        \
      bf16* __restrict__ out, float* __restrict__ scratch, const float* __restrict__ q,                                \
      const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, const int* __restrict__ queryStart,            \
      const int* __restrict__ positions, const int* __restrict__ blockTables, const int* __restrict__ counts,          \
      int seqCap, int maxBlocksPerSeq, int blockSize, int nH, int nKv, float scale, int maxSplits, int minChunk) {     \
    pdl_wait();                                                                                                        \
    attn_decode<D>(out, scratch, q, kCache, vCache, queryStart, positions, blockTables, counts, seqCap,               \
                   maxBlocksPerSeq, blockSize, nH, nKv, scale, maxSplits, minChunk);                                   \
  }

ATTN_INSTANTIATE(32)
ATTN_INSTANTIATE(64)
ATTN_INSTANTIATE(80)
ATTN_INSTANTIATE(96)
ATTN_INSTANTIATE(128)
