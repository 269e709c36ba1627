// Step metadata on the device, for multi-step decoding (Backend.decodeSteps): between two
// decode steps captured in one graph, the next step's metadata is made from the sampled
// tokens without the host. Reference: src/backend/decode_steps.ts nextDecodeBatch.
//
//   advance_decode_step: for each sequence i < counts[1] (numSeqs) of a decode-only step
//   (token row i is sequence i's only row, sampled as row i):
//     p = positions[i] + 1
//     tokenIds[i]    = sampled[i]
//     positions[i]   = p
//     slotMapping[i] = blockTables[i * B + p / bs] * bs + p % bs   (-1 if that block is -1:
//                      no KV write; the host reserves blocks, so this is only a guard)
//     contextLens[i] += 1
//     counters[i]    += 1
//   Padded rows (i >= numSeqs) are left as they are (slot -1, context 0).
//
// Launched without programmatic dependent launch: it starts after the sampling kernel has
// completed (a plain stream dependency), and the step's copy of the tokens to the host comes
// after it, so the next step's first kernel (whose launch follows that copy) sees its writes
// even in work before its pdl_wait() (common.cuh's rule: the step's metadata is fixed there).
//
// Build check: nvcc -arch=sm_90 -std=c++17 -cubin -o /tmp/step.cubin step.cu

#include "common.cuh"

extern "C" __global__ void advance_decode_step(int* __restrict__ tokenIds, int* __restrict__ positions, int* __restrict__ slotMapping,
                                               int* __restrict__ contextLens, unsigned* __restrict__ counters,
                                               const int* __restrict__ blockTables, const int* __restrict__ counts,
                                               const int* __restrict__ sampled, int capSeqs, int blocksPerSeq, int blockSize) {
  const int n = min(counts[1], capSeqs);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int p = positions[i] + 1;
    const int j = p / blockSize;
    const int block = j < blocksPerSeq ? blockTables[(long long)i * blocksPerSeq + j] : -1;
    tokenIds[i] = sampled[i];
    positions[i] = p;
    slotMapping[i] = block < 0 ? -1 : block * blockSize + p % blockSize;
    contextLens[i] += 1;
    counters[i] += 1u;
  }
}
