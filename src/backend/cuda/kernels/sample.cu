// Token selection on the GPU, one CTA (1024 threads) per sampled row.
// Reference: src/backend/cpu/sample.ts (sampleRow, logSoftmax, topK) and src/backend/rng.ts.
//
//   sample_rows: for r < *live (numSample), logits f32 [cap, V] row r, with temperature[r], topP[r],
//   topK[r], seeds[r], counters[r]:
//     lse = max + log(sum exp(l - max))                            (raw logits, no temperature)
//     tokens[r]   = argmax (ties -> lowest index)                 when temperature <= 0, else
//                   the CPU's keep-set draw:
//         p_i = exp((l_i - max) / T)
//         minLogit = k-th largest logit (k = topK > 0 ? min(topK, V) : V)
//         tau = logit of the first token, in (logit desc, index asc) order over l >= minLogit,
//               at which the cumulative p reaches topP * sum(p over l >= minLogit)  (topP < 1)
//         keep = { i : l_i >= max(minLogit, tau) }
//         u = uniform(seed, counter) * sum(p over keep); scanning keep in vocabulary order,
//         the first token whose cumulative p exceeds u (the last kept token if rounding runs out)
//     logprobs[r] = l[token] - lse
//     topIds / topLogprobs [cap, nTop]: the nTop largest logits (ties -> lower index), best first,
//         as l - lse; entries past V are id 0, logprob 0 (as the CPU leaves them).
//   uniform() is src/backend/rng.ts bit for bit (lowbias32).
//
// How (no full sort of the vocabulary):
//   pass 1  max / argmax;  pass 2  sum exp(l - max) and a 512-bin histogram of (max - l) * 16;
//   the histogram gives the largest set C = { l >= cut } of at most 4096 tokens (C holds every
//   token tied with any of its members); pass 3 compacts C into shared memory as 64-bit keys
//   (orderable logit bits << 32 | ~index) and a bitonic sort orders it exactly as the CPU's
//   sort does. Top-n, the top-k threshold and the top-p threshold (a double-precision prefix
//   scan of p in sorted order, like the CPU's loop) come from C whenever C contains them;
//   otherwise (flat distributions, k > |C|) exact bisection over the 32-bit key space with
//   block-wide counts / sums over the whole row finds them. The draw scans C re-sorted by index
//   when the keep set lies in C, else the whole row in per-thread contiguous chunks with a
//   block prefix sum. Probabilities inside C are computed in f64 as the CPU does; whole-row sums
//   use f32 exp with f64 accumulation (a token differs from the CPU's only when u falls within
//   ~1e-7 of a cumulative boundary).
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/sample.cubin sample.cu

#include "common.cuh"

using namespace inlaid;

namespace {

constexpr int NT = 1024;          // threads per CTA (one row)
constexpr int NW = NT / 32;
constexpr int CAP = 4096;         // candidate capacity
constexpr int EPT = CAP / NT;     // candidates per thread in scans
constexpr int NB = 512;           // histogram bins over (max - l) * BIN_SCALE
constexpr float BIN_SCALE = 16.f;

// src/backend/rng.ts uniform(seed, counter), exact in f64.
__device__ __forceinline__ double uniform(unsigned seed, unsigned counter) {
  return (double)uniform_bits(seed, counter) / 16777216.0;
}

// Order-preserving map of floats to unsigned keys and back.
__device__ __forceinline__ unsigned fkey(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float keyf(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// Descending order of this key = logit descending, then index ascending (the CPU's sort).
__device__ __forceinline__ unsigned long long cand_key(float l, int i) {
  return ((unsigned long long)fkey(l) << 32) | (unsigned long long)(0xffffffffu - (unsigned)i);
}
__device__ __forceinline__ float cand_logit(unsigned long long k) { return keyf((unsigned)(k >> 32)); }
__device__ __forceinline__ int cand_index(unsigned long long k) { return (int)(0xffffffffu - (unsigned)k); }

__device__ __forceinline__ int bin_of(float l, float mx) {
  return (int)fminf((mx - l) * BIN_SCALE, (float)(NB - 1));  // NaN and -inf land in the last bin
}

struct Smem {
  unsigned long long cand[CAP];
  int hist[NB];
  double rd[NW];
  float rf[NW];
  int ri[NW];
  unsigned long long ru[NW];
  int s0, s1, s2;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Block sums / maxima: deterministic (fixed shuffle tree, then warps in order), all threads get it.
__device__ double block_sum_d(double v, Smem& sm) {
  v = warp_sum(v);
  if (lane_id() == 0) sm.rd[warp_id()] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < NW; w++) r += sm.rd[w];
  __syncthreads();
  return r;
}

__device__ float block_sum_f(float v, Smem& sm) {
  v = warp_sum(v);
  if (lane_id() == 0) sm.rf[warp_id()] = v;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < NW; w++) r += sm.rf[w];
  __syncthreads();
  return r;
}

__device__ int block_sum_i(int v, Smem& sm) {
  v = warp_sum(v);
  if (lane_id() == 0) sm.ri[warp_id()] = v;
  __syncthreads();
  int r = 0;
  for (int w = 0; w < NW; w++) r += sm.ri[w];
  __syncthreads();
  return r;
}

__device__ unsigned long long block_max_u64(unsigned long long v, Smem& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long x = __shfl_xor_sync(0xffffffffu, v, o);
    v = x > v ? x : v;
  }
  if (lane_id() == 0) sm.ru[warp_id()] = v;
  __syncthreads();
  unsigned long long r = 0;
  for (int w = 0; w < NW; w++) r = sm.ru[w] > r ? sm.ru[w] : r;
  __syncthreads();
  return r;
}

// (value, index) maximum, ties -> lower index.
__device__ void block_argmax(float& v, int& i, Smem& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
  if (lane_id() == 0) {
    sm.rf[warp_id()] = v;
    sm.ri[warp_id()] = i;
  }
  __syncthreads();
  v = sm.rf[0];
  i = sm.ri[0];
  for (int w = 1; w < NW; w++) {
    if (sm.rf[w] > v || (sm.rf[w] == v && sm.ri[w] < i)) {
      v = sm.rf[w];
      i = sm.ri[w];
    }
  }
  __syncthreads();
}

// Exclusive prefix sum in thread order (double); *total = the sum.
__device__ double block_exclusive_scan_d(double v, double* total, Smem& sm) {
  double x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane_id() >= o) x += y;
  }
  double excl = __shfl_up_sync(0xffffffffu, x, 1);
  if (lane_id() == 0) excl = 0.0;
  if (lane_id() == 31) sm.rd[warp_id()] = x;
  __syncthreads();
  double before = 0.0, all = 0.0;
  for (int w = 0; w < NW; w++) {
    if (w < warp_id()) before += sm.rd[w];
    all += sm.rd[w];
  }
  __syncthreads();
  *total = all;
  return before + excl;
}

// Inclusive prefix sum in thread order (int).
__device__ int block_inclusive_scan_i(int v, Smem& sm) {
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane_id() >= o) x += y;
  }
  if (lane_id() == 31) sm.ri[warp_id()] = x;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp_id(); w++) before += sm.ri[w];
  __syncthreads();
  return before + x;
}

// Bitonic sort of sm.cand[0 .. n) (n a power of two), descending or ascending.
__device__ void bitonic_sort(Smem& sm, int n, bool descending) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += NT) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const unsigned long long a = sm.cand[i], b = sm.cand[ixj];
          const bool dirDesc = ((i & k) == 0) == descending;
          if (dirDesc ? (a < b) : (a > b)) {
            sm.cand[i] = b;
            sm.cand[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Largest key x with count(fkey(l) >= x) >= k (so keyf(x) is the k-th largest logit).
__device__ unsigned bisect_kth(const float* __restrict__ L, int V, int k, Smem& sm) {
  unsigned long long lo = 0, hi = 0x100000000ull;
  while (hi - lo > 1) {
    const unsigned mid = (unsigned)((lo + hi) >> 1);
    int c = 0;
    for (int i = threadIdx.x; i < V; i += NT) c += fkey(L[i]) >= mid;
    if (block_sum_i(c, sm) >= k) lo = mid;
    else hi = mid;
  }
  return (unsigned)lo;
}

// Largest key x in [lo, hi) with sum(p over fkey(l) >= x) >= target, p = exp((l - mx) / T);
// lo must satisfy the predicate (it is returned when nothing larger does).
__device__ unsigned bisect_mass(const float* __restrict__ L, int V, float mx, float T, unsigned long long lo,
                                unsigned long long hi, double target, Smem& sm) {
  while (hi - lo > 1) {
    const unsigned mid = (unsigned)((lo + hi) >> 1);
    double acc = 0.0;
    for (int i = threadIdx.x; i < V; i += NT) {
      const float l = L[i];
      if (fkey(l) >= mid) acc += (double)expf((l - mx) / T);
    }
    if (block_sum_d(acc, sm) >= target) lo = mid;
    else hi = mid;
  }
  return (unsigned)lo;
}

__device__ __forceinline__ double prob(float l, float mx, float T) { return exp(((double)l - (double)mx) / (double)T); }

}  // namespace

extern "C" __global__ void __launch_bounds__(NT) sample_rows(int* __restrict__ tokens, float* __restrict__ logprobs,
                                                             int* __restrict__ topIds, float* __restrict__ topLogprobs,
                                                             const float* __restrict__ logits,
                                                             const float* __restrict__ temperature,
                                                             const float* __restrict__ topP, const int* __restrict__ topK,
                                                             const unsigned* __restrict__ seeds,
                                                             const unsigned* __restrict__ counters,
                                                             const int* __restrict__ live, int cap, int V, int nTop) {
  pdl_wait();
  __shared__ Smem sm;
  const int row = blockIdx.x;
  if (row >= live_rows(live, cap)) return;
  const int tid = threadIdx.x;
  const float* L = logits + (long long)row * V;
  const float T = temperature[row];
  const bool sampling = T > 0.f;
  const bool needCand = sampling || nTop > 0;

  // ---- pass 1: max and argmax
  float mx = neg_inf();
  int am = 0x7fffffff;
  for (int i = tid; i < V; i += NT) {
    const float l = L[i];
    if (l > mx) {
      mx = l;
      am = i;
    }
  }
  block_argmax(mx, am, sm);
  if (am == 0x7fffffff) am = 0;  // every logit NaN: nothing sensible to pick

  // ---- pass 2: sum exp(l - max); histogram of distances from the max
  if (needCand) {
    for (int b = tid; b < NB; b += NT) sm.hist[b] = 0;
    if (tid == 0) sm.s0 = 0;
    __syncthreads();
  }
  float se = 0.f;
  for (int i = tid; i < V; i += NT) {
    const float l = L[i];
    se += expf(l - mx);
    if (needCand) atomicAdd(&sm.hist[bin_of(l, mx)], 1);
  }
  const float lse = mx + logf(block_sum_f(se, sm));

  int nC = 0;
  int k = V;
  const float topPr = topP[row];
  if (sampling && topK[row] > 0) k = min(topK[row], V);
  double massOut = 0.0;  // sum of p outside C, needed only for top-p without top-k
  const bool needMassOut = sampling && k == V && topPr < 1.f;

  if (needCand) {
    // ---- the candidate cut: the largest bin prefix holding at most CAP tokens
    if (tid == 0) sm.s1 = -1;
    __syncthreads();
    static_assert(NB <= NT, "one histogram bin per thread");
    const int cum = block_inclusive_scan_i(tid < NB ? sm.hist[tid] : 0, sm);
    if (tid < NB && cum <= CAP) atomicMax(&sm.s1, tid);
    __syncthreads();
    const int cutBin = sm.s1;

    // ---- pass 3: compact C (warp-aggregated slots); p mass outside C when needed
    double mo = 0.0;
    for (int base = 0; base < V; base += NT) {
      const int i = base + tid;
      const float l = i < V ? L[i] : neg_inf();
      const bool in = i < V && bin_of(l, mx) <= cutBin;
      const unsigned ballot = __ballot_sync(0xffffffffu, in);
      int slot0 = 0;
      if (lane_id() == 0 && ballot) slot0 = atomicAdd(&sm.s0, __popc(ballot));
      slot0 = __shfl_sync(0xffffffffu, slot0, 0);
      if (in) sm.cand[slot0 + __popc(ballot & ((1u << lane_id()) - 1u))] = cand_key(l, i);
      if (needMassOut && i < V && !in) mo += (double)expf((l - mx) / T);
    }
    __syncthreads();
    nC = sm.s0;
    if (needMassOut) massOut = block_sum_d(mo, sm);
    const int P = pow2_at_least(nC);
    for (int i = nC + tid; i < P; i += NT) sm.cand[i] = 0ull;
    __syncthreads();
    if (nC > 1) bitonic_sort(sm, P, true);
  }

  // ---- top-n logprobs
  if (nTop > 0) {
    int* ids = topIds + (long long)row * nTop;
    float* lps = topLogprobs + (long long)row * nTop;
    const int want = min(nTop, V);
    if (nC >= want) {
      for (int i = tid; i < nTop; i += NT) {
        if (i < want) {
          ids[i] = cand_index(sm.cand[i]);
          lps[i] = cand_logit(sm.cand[i]) - lse;
        } else {
          ids[i] = 0;
          lps[i] = 0.f;
        }
      }
    } else {
      // C does not reach the n-th token (more than CAP logits within 1/16 of the max):
      // extract the best keys one by one over the whole row.
      unsigned long long prev = ~0ull;
      for (int n = 0; n < want; n++) {
        unsigned long long best = 0;
        for (int i = tid; i < V; i += NT) {
          const unsigned long long kk = cand_key(L[i], i);
          if (kk < prev && kk > best) best = kk;
        }
        best = block_max_u64(best, sm);
        if (tid == 0) {
          ids[n] = cand_index(best);
          lps[n] = cand_logit(best) - lse;
        }
        prev = best;
      }
      for (int i = want + tid; i < nTop; i += NT) {
        ids[i] = 0;
        lps[i] = 0.f;
      }
    }
  }

  int token = am;
  if (sampling) {
    // ---- top-k threshold
    const bool haveMin = k < V;
    float minLogit = neg_inf();
    bool minInC = false;
    if (haveMin) {
      if (k <= nC) {
        minLogit = cand_logit(sm.cand[k - 1]);
        minInC = true;
      } else {
        minLogit = keyf(bisect_kth(L, V, k, sm));
      }
    }

    // ---- top-p threshold
    float lo = minLogit;
    bool loInC = minInC;
    if (topPr < 1.f) {
      // p over C in sorted order, restricted to the top-k set.
      double pl[EPT];
      bool valid[EPT];
      double local = 0.0;
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        const float l = i < nC ? cand_logit(sm.cand[i]) : neg_inf();
        valid[e] = i < nC && l >= minLogit;
        pl[e] = valid[e] ? prob(l, mx, T) : 0.0;
        local += pl[e];
      }
      double massC;
      double cum = block_exclusive_scan_d(local, &massC, sm);
      double massK;
      if (!haveMin) massK = massC + massOut;
      else if (minInC) massK = massC;
      else {
        double acc = 0.0;
        for (int i = tid; i < V; i += NT) {
          const float l = L[i];
          if (l >= minLogit) acc += (double)expf((l - mx) / T);
        }
        massK = block_sum_d(acc, sm);
      }
      const double target = (double)topPr * massK;
      if (tid == 0) sm.s1 = 0x7fffffff;
      __syncthreads();
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        cum += pl[e];
        if (valid[e] && cum >= target) {
          atomicMin(&sm.s1, i);
          break;
        }
      }
      __syncthreads();
      const int j = sm.s1;
      if (j != 0x7fffffff) {
        lo = cand_logit(sm.cand[j]);
        loInC = true;
      } else if (minInC) {
        lo = minLogit;  // rounding: the whole top-k set is kept, as the CPU's loop ends there
        loInC = true;
      } else if (nC == V && nC > 0) {
        lo = cand_logit(sm.cand[nC - 1]);
        loInC = true;
      } else {
        // The nucleus reaches below C: bisection over the whole row. Its threshold lies below
        // the smallest candidate (whose suffix mass is short of the target).
        const unsigned long long loKey = haveMin ? fkey(minLogit) : 0ull;
        const unsigned long long hiKey = nC > 0 ? (unsigned long long)fkey(cand_logit(sm.cand[nC - 1])) : 0x100000000ull;
        lo = keyf(bisect_mass(L, V, mx, T, loKey, hiKey > loKey ? hiKey : loKey + 1, target, sm));
        loInC = false;
      }
    }

    // ---- the draw, scanning the keep set { l >= lo } in vocabulary order
    const double u01 = uniform(seeds[row], counters[row]);
    if (loInC) {
      if (tid == 0) sm.s2 = 0;
      __syncthreads();
      for (int i = tid; i < nC; i += NT)
        if (cand_logit(sm.cand[i]) >= lo) atomicMax(&sm.s2, i + 1);
      __syncthreads();
      const int m = sm.s2;
      const int P = pow2_at_least(m);
      // Re-key the kept prefix by index (ascending), pad with the largest key.
      unsigned long long mine[EPT];
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        mine[e] = i < m ? (((unsigned long long)(unsigned)cand_index(sm.cand[i]) << 32) | fkey(cand_logit(sm.cand[i]))) : ~0ull;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        if (i < P) sm.cand[i] = mine[e];
      }
      __syncthreads();
      if (m > 1) bitonic_sort(sm, P, false);
      double pl[EPT];
      double local = 0.0;
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        pl[e] = i < m ? prob(keyf((unsigned)sm.cand[i]), mx, T) : 0.0;
        local += pl[e];
      }
      double kept;
      double cum = block_exclusive_scan_d(local, &kept, sm);
      const double u = u01 * kept;
      if (tid == 0) {
        sm.s1 = 0x7fffffff;
        sm.s0 = -1;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        const int i = tid * EPT + e;
        if (pl[e] > 0.0) {
          cum += pl[e];
          atomicMax(&sm.s0, i);
          if (u < cum) {
            atomicMin(&sm.s1, i);
            break;
          }
        }
      }
      __syncthreads();
      const int pick = sm.s1 != 0x7fffffff ? sm.s1 : sm.s0;
      token = pick >= 0 ? (int)(sm.cand[pick] >> 32) : am;
    } else {
      // Whole row: thread t owns the contiguous chunk [t * chunk, (t + 1) * chunk).
      const int chunk = (V + NT - 1) / NT;
      const int b = min(V, tid * chunk), e = min(V, b + chunk);
      double local = 0.0;
      int lastKept = -1;
      for (int i = b; i < e; i++) {
        const float l = L[i];
        if (l >= lo) {
          const float p = expf((l - mx) / T);
          if (p > 0.f) {
            local += (double)p;
            lastKept = i;
          }
        }
      }
      double kept;
      const double before = block_exclusive_scan_d(local, &kept, sm);
      const double u = u01 * kept;
      if (tid == 0) {
        sm.s1 = 0x7fffffff;
        sm.s0 = -1;
      }
      __syncthreads();
      if (lastKept >= 0) atomicMax(&sm.s0, lastKept);
      if (local > 0.0 && u >= before && u < before + local) {
        double cum = before;
        int found = lastKept;
        for (int i = b; i < e; i++) {
          const float l = L[i];
          if (l >= lo) {
            const float p = expf((l - mx) / T);
            if (p > 0.f) {
              cum += (double)p;
              if (u < cum) {
                found = i;
                break;
              }
            }
          }
        }
        atomicMin(&sm.s1, found);
      }
      __syncthreads();
      const int pick = sm.s1 != 0x7fffffff ? sm.s1 : sm.s0;
      token = pick >= 0 ? pick : am;
    }
  }

  if (tid == 0) {
    tokens[row] = token;
    logprobs[row] = L[token] - lse;
  }
}
