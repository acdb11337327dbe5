// Simple, exact CUDA kernels for the four spallm ops (the contract is kernels.h). They decode W one
// element at a time into fp32 registers and never materialize it; fast tiled kernels come later.
//
// Work is a flat 64-bit index of independent block-sized items walked with a grid-stride loop, so
// any M, N, K fits in gridDim.x alone. Activations are read through a register tile of kTokens
// tokens: every decoded weight feeds kTokens FMAs. All reductions run in a fixed order (see
// reduce.cuh), so every kernel here, lut_grad included, is deterministic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "codes.h"
#include "cuda/decode.cuh"
#include "cuda/dtype.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"

namespace spallm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTokens = 8;
// Enough blocks to fill any GPU many times over; the grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

unsigned blocks_for(int64_t items) { return static_cast<unsigned>(std::min(items, kMaxBlocks)); }

// Whole warps covering `cols` columns, at most kThreads: small rows don't launch idle warps.
unsigned threads_for(int64_t cols) {
  return static_cast<unsigned>(std::min<int64_t>(kThreads, ceil_div(cols, kWarp) * kWarp));
}

bool bad_problem(const LutProblem& p) {
  return p.bits < 2 || p.bits > 4 || p.G < 1 || p.K < 1 || p.M < 0 || p.N < 0;
}

// acc[t] += w * a[m0 + t, i] for the tokens of the tile that exist; a is [M, ld] row-major.
template <typename A>
__device__ __forceinline__ void fma_tile(float (&acc)[kTokens], float w, const A* __restrict__ a,
                                         int64_t ld, int64_t m0, int64_t M, int64_t i) {
  const A* col = a + m0 * ld + i;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (m0 + t < M) acc[t] += w * to_float(col[t * ld]);
  }
}

// y = x W^T (+ bias). Item = (token tile, row n): the block's threads stride over the K columns
// (coalesced x and code reads), then one block reduction per token. Rows vary fastest across the
// grid, so the blocks in flight share one x tile through L2.
template <int BITS, typename A, typename L>
__global__ void __launch_bounds__(kThreads)
lut_linear_kernel(LutProblem p, const A* __restrict__ x, const uint8_t* __restrict__ codes,
                  const L* __restrict__ lut, const A* __restrict__ bias, A* __restrict__ y) {
  __shared__ float partials[kWarps * kTokens];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const LutWeight<BITS, L> weight(p, codes, lut);
  const int64_t items = ceil_div(p.M, kTokens) * p.N;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item % p.N, m0 = item / p.N * kTokens;
    const LutRow<BITS, L> w = weight.row(n);
    float acc[kTokens] = {};
    for (int64_t c = threadIdx.x; c < p.K; c += blockDim.x) fma_tile(acc, w(c), x, p.K, m0, p.M, c);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (m0 + t >= p.M) break;  // block-uniform: short tiles (decode, M = 1) skip dead tokens
      const float s = warp_sum(acc[t]);
      if (lane == 0) partials[warp * kTokens + t] = s;
    }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < kTokens && m0 + t < p.M) {
      float s = sum_over_warps(partials, warps, kTokens, t);
      if (bias != nullptr) s += to_float(bias[n]);
      y[(m0 + t) * p.N + n] = from_float<A>(s);
    }
    __syncthreads();  // partials are rewritten by the next item
  }
}

// dx = dy W. Item = (token tile, 32 columns): lane = column, so code reads and dx stores are
// coalesced, and the block's warps split the N rows; their partial sums meet in shared memory.
// dy[m, n] is the same address across a warp (a broadcast load).
template <int BITS, typename A, typename L>
__global__ void __launch_bounds__(kThreads)
lut_linear_dx_kernel(LutProblem p, const A* __restrict__ dy, const uint8_t* __restrict__ codes,
                     const L* __restrict__ lut, A* __restrict__ dx) {
  constexpr int kSlots = kTokens * kWarp;  // (token, column) outputs per item
  __shared__ float partials[kWarps * kSlots];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const LutWeight<BITS, L> weight(p, codes, lut);
  const int64_t col_tiles = ceil_div(p.K, kWarp);
  const int64_t items = ceil_div(p.M, kTokens) * col_tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c0 = item % col_tiles * kWarp, m0 = item / col_tiles * kTokens;
    const int64_t c = c0 + lane;
    float acc[kTokens] = {};
    if (c < p.K) {
      for (int64_t n = warp; n < p.N; n += warps) fma_tile(acc, weight.row(n)(c), dy, p.N, m0, p.M, n);
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t) partials[warp * kSlots + t * kWarp + lane] = acc[t];
    __syncthreads();
    for (int s = threadIdx.x; s < kSlots; s += blockDim.x) {
      const int64_t m = m0 + s / kWarp, cs = c0 + s % kWarp;
      if (m < p.M && cs < p.K) dx[m * p.K + cs] = from_float<A>(sum_over_warps(partials, warps, kSlots, s));
    }
    __syncthreads();
  }
}

// dlut[r, g, k] = sum over columns c of group g with code k of dW[r, c], dW = dy^T x.
// Item = (row r, group g). Each thread computes dW[r, c] for one column of a chunk (x reads
// coalesced, dy[m, r] broadcast); each warp then sums the chunk into the 2^BITS buckets with one
// butterfly per bucket, lane k keeping bucket k's running sum over the chunks; the warps' sums are
// added in warp order and each bucket is stored once. No atomics anywhere.
template <int BITS, typename A>
__global__ void __launch_bounds__(kThreads)
lut_grad_kernel(LutProblem p, const A* __restrict__ dy, const A* __restrict__ x,
                const uint8_t* __restrict__ codes, float* __restrict__ dlut) {
  constexpr int kEntries = 1 << BITS;
  static_assert(kEntries <= kWarp, "one lane per bucket");
  __shared__ float partials[kWarps * kEntries];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t group_size = div_nonneg(p.K, p.G);
  const int64_t items = p.N * p.G;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / p.G, begin = item % p.G * group_size, end = begin + group_size;
    const uint8_t* row_codes = codes + r * p.row_bytes;
    float bucket = 0.f;
    // Bounds are block-uniform: every lane of a warp reaches the butterflies.
    for (int64_t chunk = begin; chunk < end; chunk += blockDim.x) {
      const int64_t c = chunk + threadIdx.x;
      float dw = 0.f;
      int code = -1;
      if (c < end) {
        code = code_at<BITS>(row_codes, c);
        const A* dy_r = dy + r;
        const A* x_c = x + c;
#pragma unroll 4
        for (int64_t m = 0; m < p.M; ++m) dw += to_float(dy_r[m * p.N]) * to_float(x_c[m * p.K]);
      }
#pragma unroll
      for (int k = 0; k < kEntries; ++k) {
        const float s = warp_sum(code == k ? dw : 0.f);
        if (lane == k) bucket += s;
      }
    }
    if (lane < kEntries) partials[warp * kEntries + lane] = bucket;
    __syncthreads();
    const int k = threadIdx.x;
    if (k < kEntries) dlut[item * kEntries + k] = sum_over_warps(partials, warps, kEntries, k);
    __syncthreads();
  }
}

// w[r, c] = the LUT value of W[r, c], copied bit for bit. Item = (row, column chunk).
template <int BITS, typename L>
__global__ void __launch_bounds__(kThreads)
lut_decode_kernel(LutProblem p, const uint8_t* __restrict__ codes, const L* __restrict__ lut,
                  L* __restrict__ w) {
  const LutWeight<BITS, L> weight(p, codes, lut);
  const int64_t col_tiles = ceil_div(p.K, blockDim.x);
  for (int64_t item = blockIdx.x; item < p.N * col_tiles; item += gridDim.x) {
    const int64_t r = item / col_tiles, c = item % col_tiles * blockDim.x + threadIdx.x;
    if (c < p.K) w[r * p.K + c] = weight.row(r).raw(c);
  }
}

}  // namespace

cudaError_t lut_linear(const LutProblem& p, const void* x, DType act_type, const uint8_t* codes,
                       const void* lut, DType lut_type, const void* bias, void* y, cudaStream_t stream) {
  if (bad_problem(p)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const unsigned blocks = blocks_for(ceil_div(p.M, kTokens) * p.N), threads = threads_for(p.K);
  return dispatch_dtype(act_type, [&](auto act) {
    using A = typename decltype(act)::type;
    return dispatch_dtype(lut_type, [&](auto lt) {
      using L = typename decltype(lt)::type;
      return SPALLM_DISPATCH_BITS(p.bits, [&] {
        lut_linear_kernel<BITS, A, L><<<blocks, threads, 0, stream>>>(
            p, static_cast<const A*>(x), codes, static_cast<const L*>(lut),
            static_cast<const A*>(bias), static_cast<A*>(y));
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t lut_linear_dx(const LutProblem& p, const void* dy, DType act_type, const uint8_t* codes,
                          const void* lut, DType lut_type, void* dx, cudaStream_t stream) {
  if (bad_problem(p)) return cudaErrorInvalidValue;
  // N == 0 still runs (when M > 0): dx is then all zeros, and the kernel writes them.
  if (p.M == 0) return cudaSuccess;
  const unsigned blocks = blocks_for(ceil_div(p.M, kTokens) * ceil_div(p.K, kWarp));
  return dispatch_dtype(act_type, [&](auto act) {
    using A = typename decltype(act)::type;
    return dispatch_dtype(lut_type, [&](auto lt) {
      using L = typename decltype(lt)::type;
      return SPALLM_DISPATCH_BITS(p.bits, [&] {
        lut_linear_dx_kernel<BITS, A, L><<<blocks, kThreads, 0, stream>>>(
            p, static_cast<const A*>(dy), codes, static_cast<const L*>(lut), static_cast<A*>(dx));
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t lut_grad(const LutProblem& p, const void* dy, const void* x, DType act_type,
                     const uint8_t* codes, float* dlut, bool /*deterministic: always*/, cudaStream_t stream) {
  if (bad_problem(p)) return cudaErrorInvalidValue;
  // M == 0 still runs: the kernel then writes the all-zero dlut the contract promises.
  if (p.N == 0) return cudaSuccess;
  const unsigned blocks = blocks_for(p.N * p.G), threads = threads_for(p.K / p.G);
  return dispatch_dtype(act_type, [&](auto act) {
    using A = typename decltype(act)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      lut_grad_kernel<BITS, A><<<blocks, threads, 0, stream>>>(
          p, static_cast<const A*>(dy), static_cast<const A*>(x), codes, dlut);
      return cudaGetLastError();
    });
  });
}

cudaError_t lut_decode(const LutProblem& p, const uint8_t* codes, const void* lut, DType lut_type,
                       void* w, cudaStream_t stream) {
  if (bad_problem(p)) return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;
  const unsigned threads = threads_for(p.K);
  const unsigned blocks = blocks_for(p.N * ceil_div(p.K, threads));
  return dispatch_dtype(lut_type, [&](auto lt) {
    using L = typename decltype(lt)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      lut_decode_kernel<BITS, L><<<blocks, threads, 0, stream>>>(p, codes, static_cast<const L*>(lut),
                                                                 static_cast<L*>(w));
      return cudaGetLastError();
    });
  });
}

}  // namespace spallm::cuda
