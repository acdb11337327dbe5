// dLUT without dense dW in HBM: dlut[r, g, k] = sum over columns c of group g with code[r, c] = k
// of dW[r, c], dW = dy^T x, computed tile by tile on tensor cores and reduced into the 2^BITS
// buckets on chip. sm_80+, bf16 / fp16 activations, fp32 accumulation throughout.
//
// Block tile: 128 rows of W x 64 columns (one column tile lies inside one group, since the group
// size is a multiple of 64); the reduction runs over tokens in steps of 32. Per step, cp.async
// brings dy[m0:m0+32, rows] (32 x 128) and x[m0:m0+32, cols] (32 x 64) into a ring; the warps
// (4 over rows x 2 over columns, 32 x 32 each) multiply them with m16n8k16. Both operands have the
// token index slow in memory, i.e. they are the transposes of what the mma wants, which
// ldmatrix.trans fixes on the fly.
//
// Then the dW tile (fp32) goes to shared memory, and each thread owns one row and 32 columns: it
// reads its 32 codes and adds each dW value into its own bucket column of a [2^BITS][256] table (so
// the sums are sequential per thread: no shared atomics, and lane-major buckets never conflict).
// The two halves of a row are added in a fixed order, and the tile's 2^BITS sums per row leave
// the block either as one float atomicAdd per bucket into dlut (default), or, in deterministic
// mode, as plain stores into a [column tile, N, 2^BITS] workspace that a second kernel adds up in
// column-tile order.
#include <cuda_runtime.h>

#include <cstdint>

#include "codes.h"
#include "cuda/dtype.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"
#include "cuda/lut_tile.cuh"
#include "cuda/mma.cuh"

namespace spallm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockN = 128;  // rows of W
constexpr int kBlockC = 64;   // columns of W
constexpr int kBlockT = 32;   // tokens per step
constexpr int kStages = 3;
constexpr int kWarpsN = 4, kWarpsC = 2;
constexpr int kWarpRows = kBlockN / kWarpsN, kWarpCols = kBlockC / kWarpsC;  // 32 x 32
constexpr int TN = kWarpRows / 16, TC = kWarpCols / 8;                       // 2 x 4 mma tiles
constexpr int kDwStride = kBlockC + 1;  // fp32 dW tile row stride: lane = row reads conflict-free
static_assert(kThreads == 2 * kBlockN, "bucket pass: two threads (32 columns each) per row");

template <int BITS>
struct GradSmem {
  static constexpr int kEntries = 1 << BITS;
  static constexpr int kDyBytes = kBlockT * SwizzledTile128::kRowBytes;  // [tokens][128 rows]
  static constexpr int kXBytes = kBlockT * SwizzledTile64::kRowBytes;    // [tokens][64 cols]
  static constexpr int kStageBytes = kDyBytes + kXBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  // After the token loop the pipeline's space is reused for the dW tile and the buckets.
  static constexpr int kDwBytes = kBlockN * kDwStride * 4;
  static constexpr int kBucketBytes = kEntries * kThreads * 4;
  static constexpr int kEpiBytes = kDwBytes + kBucketBytes;
  static constexpr int kBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
};

template <int BITS, typename A>
__global__ void __launch_bounds__(kThreads, 2)
lut_grad_mma_kernel(LutProblem p, const A* __restrict__ dy, const A* __restrict__ x,
                    const uint8_t* __restrict__ codes, float* __restrict__ dlut, float* __restrict__ partials) {
  using S = GradSmem<BITS>;
  constexpr int kEntries = S::kEntries;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t c_tile = blockIdx.x, n0 = int64_t(blockIdx.y) * kBlockN, c0 = c_tile * kBlockC;

  auto dy_tile = [&](int stage) { return SwizzledTile128{smem + stage * S::kStageBytes}; };
  auto x_tile = [&](int stage) { return SwizzledTile64{smem + stage * S::kStageBytes + S::kDyBytes}; };

  auto load_stage = [&](int stage, int64_t m0) {
    const SwizzledTile128 dt = dy_tile(stage);
    for (int i = tid; i < kBlockT * SwizzledTile128::kUnits; i += kThreads) {
      const int tok = i / SwizzledTile128::kUnits, u = i % SwizzledTile128::kUnits;
      const int64_t m = m0 + tok, n = n0 + u * 8;
      const bool ok = m < p.M && n < p.N;  // N % 8 == 0: a unit is wholly inside or outside
      cp_async<16>(dt.unit(tok, u), ok ? dy + m * p.N + n : dy, ok);
    }
    const SwizzledTile64 xt = x_tile(stage);
    for (int i = tid; i < kBlockT * SwizzledTile64::kUnits; i += kThreads) {
      const int tok = i / SwizzledTile64::kUnits, u = i % SwizzledTile64::kUnits;
      const int64_t m = m0 + tok;
      const bool ok = m < p.M;
      cp_async<16>(xt.unit(tok, u), ok ? x + m * p.K + c0 + u * 8 : x, ok);
    }
  };

  const int wn = warp % kWarpsN, wc = warp / kWarpsN;
  float acc[TN][TC][4] = {};
  auto mma_step = [&](int stage) {
    const SwizzledTile128 dt = dy_tile(stage);
    const SwizzledTile64 xt = x_tile(stage);
#pragma unroll
    for (int kk = 0; kk < kBlockT; kk += 16) {
      uint32_t a[TN][4];
      uint32_t b[TC][2];
      // A[r][m] = dy[m][r]: stored [token][row], so matrix i of the x4 load is rows
      // (i % 2) * 8.. of the fragment and tokens (i / 2) * 8.., transposed by ldmatrix.
#pragma unroll
      for (int i = 0; i < TN; ++i) {
        const int mat = lane / 8;
        ldmatrix_x4_trans(a[i], dt.at(kk + (mat / 2) * 8 + lane % 8, wn * kWarpRows + i * 16 + (mat % 2) * 8));
      }
      // B^T[c][m] = x[m][c]: stored [token][col]; matrix i: columns (i / 2) * 8.., tokens (i % 2) * 8..
#pragma unroll
      for (int j = 0; j < TC; j += 2) {
        const int mat = lane / 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, xt.at(kk + (mat % 2) * 8 + lane % 8, wc * kWarpCols + j * 8 + (mat / 2) * 8));
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
      mma_tiles<A>(acc, a, b);
    }
  };

  const int64_t nsteps = (p.M + kBlockT - 1) / kBlockT;
  ring_prologue<kStages>(static_cast<int>(nsteps < kStages ? nsteps : kStages), 0,
                         [&](int slot, int64_t step) { load_stage(slot, step * kBlockT); });
  for (int64_t it = 0; it < nsteps; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // this stage landed for every thread; the stage refilled below is consumed
    mma_step(static_cast<int>(it % kStages));
    const int64_t next = it + kStages - 1;
    if (next < nsteps) load_stage(static_cast<int>(next % kStages), next * kBlockT);
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the dW tile

  float* dw = reinterpret_cast<float*>(smem);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int j = 0; j < TC; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = wn * kWarpRows + i * 16 + g + (e / 2) * 8;
        const int col = wc * kWarpCols + j * 8 + 2 * t + e % 2;
        dw[row * kDwStride + col] = acc[i][j][e];
      }
    }
  }
  float* bucket = reinterpret_cast<float*>(smem + S::kDwBytes);  // [entry][thread]
#pragma unroll
  for (int k = 0; k < kEntries; ++k) bucket[k * kThreads + tid] = 0.f;
  __syncthreads();

  const int row = tid % kBlockN, half = tid / kBlockN;
  const int64_t n = n0 + row;
  if (n < p.N) {
    // This thread's 32 codes: BITS words of the packed row (4-byte aligned, checked by dispatch).
    const uint32_t* cw = reinterpret_cast<const uint32_t*>(codes + n * p.row_bytes + (c0 + half * 32) * BITS / 8);
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = cw[i];
    const float* dwr = dw + row * kDwStride + half * 32;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      bucket[code_from<BITS>(RegisterBytes{words}, c) * kThreads + tid] += smem_load(dwr + c, "grad_dw");
    }
  }
  __syncthreads();
  if (half == 0 && n < p.N) {
    const int64_t group = c0 / (p.K / p.G);
#pragma unroll
    for (int k = 0; k < kEntries; ++k) {
      const float v = bucket[k * kThreads + tid] + bucket[k * kThreads + tid + kBlockN];
      if (partials != nullptr) {
        partials[(c_tile * p.N + n) * kEntries + k] = v;
      } else {
        atomicAdd(dlut + (n * p.G + group) * kEntries + k, v);
      }
    }
  }
}

// Deterministic mode: dlut[r, g, k] = sum of the column tiles of group g, in column order.
__global__ void __launch_bounds__(256)
grad_tiles_reduce_kernel(int64_t N, int64_t G, int entries, int64_t tiles_per_group,
                         const float* __restrict__ partials, float* __restrict__ dlut) {
  const int64_t total = N * G * entries;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % entries, rg = i / entries, g = rg % G, n = rg / G;
    float s = 0.f;
    for (int64_t t = 0; t < tiles_per_group; ++t) s += partials[((g * tiles_per_group + t) * N + n) * entries + k];
    dlut[i] = s;
  }
}

template <int BITS, typename A>
cudaError_t launch(const LutProblem& p, const A* dy, const A* x, const uint8_t* codes, float* dlut,
                   float* partials, cudaStream_t stream) {
  using S = GradSmem<BITS>;
  auto kernel = lut_grad_mma_kernel<BITS, A>;
  cudaError_t err = allow_smem<S>(kernel, S::kBytes);
  if (err != cudaSuccess) return err;
  const int64_t col_tiles = p.K / kBlockC;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(ceil_div(p.N, kBlockN)));
  kernel<<<grid, kThreads, S::kBytes, stream>>>(p, dy, x, codes, dlut, partials);
  err = cudaGetLastError();
  if (err != cudaSuccess || partials == nullptr) return err;
  const int64_t total = p.N * p.G * (int64_t(1) << BITS);
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, 256) < 65536 ? ceil_div(total, 256) : 65536);
  grad_tiles_reduce_kernel<<<blocks, 256, 0, stream>>>(p.N, p.G, 1 << BITS, col_tiles / p.G, partials, dlut);
  return cudaGetLastError();
}

}  // namespace

int lut_grad_mma_smem_bytes(int bits) {
  return SPALLM_DISPATCH_BITS(bits, [&]() -> int { return GradSmem<BITS>::kBytes; });
}

cudaError_t lut_grad_mma(const LutProblem& p, const void* dy, const void* x, DType act_type, const uint8_t* codes,
                         float* dlut, float* workspace, cudaStream_t stream) {
  if (p.bits < 2 || p.bits > 4 || p.G < 1 || p.K % kBlockC != 0 || (p.K / p.G) % kBlockC != 0 || p.N % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.N == 0) return cudaSuccess;
  auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      return launch<BITS, A>(p, static_cast<const A*>(dy), static_cast<const A*>(x), codes, dlut, workspace,
                             stream);
    });
  };
  return dispatch_half(act_type, run);
}

}  // namespace spallm::cuda
