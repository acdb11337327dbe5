// Fixed-order reductions: the same inputs give bit-identical sums on every run (no atomics, no
// dependence on warp scheduling).
#pragma once
#include <cuda_runtime.h>

namespace spallm::cuda {

constexpr int kWarp = 32;

// Butterfly sum over the 32 lanes of a full warp; every lane gets the same value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// partials[w * slots + s] holds warp w's part of slot s: returns the slot's total, added in warp
// order. The caller synchronizes the block around writing and reading `partials`.
__device__ __forceinline__ float sum_over_warps(const float* partials, int warps, int slots, int s) {
  float v = 0.f;
  for (int w = 0; w < warps; ++w) v += partials[w * slots + s];
  return v;
}

}  // namespace spallm::cuda
