// dx = dy W on tensor cores with W decoded tile by tile in shared memory: the backward twin of
// lut_mma.cu, built from the same pieces (lut_tile.cuh, mma.cuh). sm_80+, bf16 / fp16.
//
// The reduction runs over W's rows, so each step brings new rows and with them new LUTs: the block
// tile is 128 columns of W (the MMA's M side, swap-AB again: dx^T = W^T dy^T) x block_m tokens,
// and a step covers 64 rows. Per step:
//   1. cp.async: the codes of 64 rows x 128 columns and dy[tokens, 64 rows] into a ring.
//   2. The LUT table of the step's 64 rows, [column half][entry][row] (each 64-column half lies in
//      one group), is filled from registers loaded one step earlier, so its global latency hides
//      behind the previous step's mma.
//   3. Decode: thread (row = tid % 64, quarter = tid / 64) turns 32 codes into 32 weights
//      (decode32, conflict-free as in the forward) into a swizzled [64 rows][128 columns] W tile.
//   4. mma: A = W^T fragments come straight from that tile with ldmatrix.trans; B = dy fragments as
//      in the forward.
// Split over the rows for small M, partials added in split order (splitk_reduce_kernel).
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
constexpr int kBlockC = 128;  // columns of W (outputs of dx) per block
constexpr int kBlockR = 64;   // rows of W per step (the reduction)
static_assert(kThreads == 4 * kBlockR, "decode: four threads (32 columns each) per row of the tile");

template <int BITS, int BM>
struct DxSmem {
  using C = WarpTiling<BM, kBlockC>;
  static constexpr int kEntries = 1 << BITS;
  static constexpr int kCodeWords = kBlockC * BITS / 32;   // per row and step
  static constexpr int kCodeStride = kCodeWords + 1;        // odd: conflict-free row-per-lane reads
  static constexpr int kDyBytes = BM * SwizzledTile64::kRowBytes;
  static constexpr int kWBytes = kBlockR * SwizzledTile128::kRowBytes;
  static constexpr int kTableFloats = 2 * kEntries * kBlockR;  // [half][entry][row]
  static constexpr int kLutPerThread = kTableFloats / kThreads;
  static constexpr int kCodeBytes = kBlockR * kCodeStride * 4;
  static constexpr int kDy = 0;
  static constexpr int kW = kDy + C::kStages * kDyBytes;
  static constexpr int kTable = kW + 2 * kWBytes;
  static constexpr int kCodes = kTable + 2 * kTableFloats * 4;
  static constexpr int kBytes = kCodes + C::kStages * kCodeBytes;
  static_assert(kTableFloats % kThreads == 0, "table fill: whole values per thread");
};

template <int BITS, typename A, int BM>
__global__ void __launch_bounds__(kThreads, 2)
lut_dx_mma_kernel(LutProblem p, const A* __restrict__ dy, const uint8_t* __restrict__ codes,
                  const void* __restrict__ lut, DType lut_type, A* __restrict__ dx, float* __restrict__ workspace,
                  int splits) {
  using C = WarpTiling<BM, kBlockC>;
  using S = DxSmem<BITS, BM>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t c0 = int64_t(blockIdx.x) * kBlockC, m0 = int64_t(blockIdx.y) * BM;
  const int split = blockIdx.z;
  const int64_t steps_total = (p.N + kBlockR - 1) / kBlockR;
  const int64_t step_begin = steps_total * split / splits, step_end = steps_total * (split + 1) / splits;
  const int nsteps = static_cast<int>(step_end - step_begin);
  const int64_t group_size = p.K / p.G;
  // The group of each 64-column half of this block's columns (group size is a multiple of 64). With
  // in_features an odd multiple of 64 the last block's second half lies past K (group1 == G): its
  // codes are zero-filled, its LUT values are zeros, and its columns are never stored.
  const int64_t group0 = c0 / group_size, group1 = (c0 + 64) / group_size;

  auto dy_tile = [&](int stage) { return SwizzledTile64{smem + S::kDy + stage * S::kDyBytes}; };
  auto w_tile = [&](int buf) { return SwizzledTile128{smem + S::kW + buf * S::kWBytes}; };
  auto table = [&](int buf) { return reinterpret_cast<float*>(smem + S::kTable) + buf * S::kTableFloats; };
  auto code_tile = [&](int stage) { return reinterpret_cast<uint32_t*>(smem + S::kCodes + stage * S::kCodeBytes); };

  auto load_stage = [&](int stage, int64_t step) {
    const int64_t r0 = step * kBlockR;
    uint32_t* ct = code_tile(stage);
    for (int i = tid; i < kBlockR * S::kCodeWords; i += kThreads) {
      const int row = i / S::kCodeWords, word = i % S::kCodeWords;
      const int64_t r = r0 + row;
      const bool ok = r < p.N && c0 + word * 32 / BITS < p.K;  // the word's first column
      cp_async<4>(ct + row * S::kCodeStride + word, ok ? codes + r * p.row_bytes + c0 * BITS / 8 + word * 4 : codes, ok);
    }
    const SwizzledTile64 dt = dy_tile(stage);
    for (int i = tid; i < BM * SwizzledTile64::kUnits; i += kThreads) {
      const int tok = i / SwizzledTile64::kUnits, u = i % SwizzledTile64::kUnits;
      const int64_t m = m0 + tok, r = r0 + u * 8;
      const bool ok = m < p.M && r < p.N;  // N % 8 == 0: a unit is wholly inside or outside
      cp_async<16>(dt.unit(tok, u), ok ? dy + m * p.N + r : dy, ok);
    }
  };

  // This thread's share of the step's LUT table: value i = tid + j * kThreads of [half][entry][row].
  float lut_regs[S::kLutPerThread];
  auto load_luts = [&](int64_t step) {
    const int64_t r0 = step * kBlockR;
#pragma unroll
    for (int j = 0; j < S::kLutPerThread; ++j) {
      const int i = tid + j * kThreads;
      const int half = i / (S::kEntries * kBlockR), e = (i / kBlockR) % S::kEntries, row = i % kBlockR;
      const int64_t r = r0 + row;
      lut_regs[j] = r < p.N && (half == 0 || group1 < p.G)
                        ? load_float(lut, lut_type, (r * p.G + (half == 0 ? group0 : group1)) * S::kEntries + e)
                        : 0.f;
    }
  };
  auto store_luts = [&](int buf) {
    float* t = table(buf);
#pragma unroll
    for (int j = 0; j < S::kLutPerThread; ++j) t[tid + j * kThreads] = lut_regs[j];
  };

  auto decode = [&](int stage, int buf) {
    const int row = tid % kBlockR, quarter = tid / kBlockR;
    const uint32_t* cw = code_tile(stage) + row * S::kCodeStride + quarter * BITS;
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = smem_load(cw + i, "code_words");
    uint32_t packed[16];
    // Row (bits 2..7), then the scaled code (bits 8..), then the half and buffer offsets.
    static_assert(S::kEntries * kBlockR * 4 == (kBlockR * 4) << BITS, "halves start above the code bits");
    decode32<BITS, A, kBlockR>(words, table(0),
                               row * 4 | ((quarter / 2) * S::kEntries * kBlockR + buf * S::kTableFloats) * 4, packed);
    store_units(w_tile(buf), row, quarter * 4, packed);
  };

  const int wn = warp % C::kWarpsN, wm = warp / C::kWarpsN;
  float acc[C::TN][C::TM][4] = {};
  auto mma_step = [&](int buf, int stage) {
    const SwizzledTile128 wt = w_tile(buf);
    const SwizzledTile64 dt = dy_tile(stage);
#pragma unroll
    for (int kk = 0; kk < kBlockR; kk += 16) {
      uint32_t a[C::TN][4];
      uint32_t b[C::TM][2];
      // A[c][r] = W[r][c], stored [row][column]: matrix i of the x4 load is columns (i % 2) * 8..
      // and rows (i / 2) * 8.. of the fragment, transposed by ldmatrix.
#pragma unroll
      for (int i = 0; i < C::TN; ++i) {
        const int mat = lane / 8;
        ldmatrix_x4_trans(a[i], wt.at(kk + (mat / 2) * 8 + lane % 8, wn * C::kWarpRows + i * 16 + (mat % 2) * 8));
      }
      load_token_fragments<C::TM>(dt, wm * C::kWarpTokens, kk, lane, b);
      mma_tiles<A>(acc, a, b);
    }
  };

  ring_prologue<C::kStages>(nsteps, step_begin, load_stage);
  if (nsteps > 0) load_luts(step_begin);
  for (int it = 0; it < nsteps; ++it) {
    const int stage = it % C::kStages, buf = it & 1;
    cp_async_wait<C::kStages - 2>();
    // Buffer `buf` was last read by decode(it - 2), which every thread finished before the
    // barrier after decode(it - 1).
    store_luts(buf);
    __syncthreads();
    decode(stage, buf);
    __syncthreads();
    if (it + 1 < nsteps) load_luts(step_begin + it + 1);  // in flight during the mma below
    mma_step(buf, stage);
    const int next = it + C::kStages - 1;
    if (next < nsteps) load_stage(next % C::kStages, step_begin + next);
    cp_async_commit();
  }
  cp_async_wait<0>();

  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < C::TN; ++i) {
#pragma unroll
    for (int j = 0; j < C::TM; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = c0 + wn * C::kWarpRows + i * 16 + g + (e / 2) * 8;
        const int64_t m = m0 + wm * C::kWarpTokens + j * 8 + 2 * t + e % 2;
        if (m >= p.M || c >= p.K) continue;
        if (splits == 1) {
          dx[m * p.K + c] = from_float<A>(acc[i][j][e]);
        } else {
          workspace[(split * p.M + m) * p.K + c] = acc[i][j][e];
        }
      }
    }
  }
}

template <int BITS, typename A, int BM>
cudaError_t launch(const LutProblem& p, const A* dy, const uint8_t* codes, const void* lut, DType lut_type, A* dx,
                   int splits, float* workspace, cudaStream_t stream) {
  using S = DxSmem<BITS, BM>;
  auto kernel = lut_dx_mma_kernel<BITS, A, BM>;
  cudaError_t err = allow_smem<S>(kernel, S::kBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.K, kBlockC)), static_cast<unsigned>(ceil_div(p.M, BM)),
                  static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, S::kBytes, stream>>>(p, dy, codes, lut, lut_type, dx, workspace, splits);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t total = p.M * p.K;
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, 256) < 65536 ? ceil_div(total, 256) : 65536);
  splitk_reduce_kernel<A><<<blocks, 256, 0, stream>>>(p.M, p.K, splits, workspace, nullptr, dx);
  return cudaGetLastError();
}

}  // namespace

int lut_dx_mma_smem_bytes(int bits, int block_m) {
  return SPALLM_DISPATCH_BITS(bits, [&] { return smem_bytes_for<DxSmem, BITS>(block_m); });
}

cudaError_t lut_linear_dx_mma(const LutProblem& p, const void* dy, DType act_type, const uint8_t* codes,
                              const void* lut, DType lut_type, void* dx, int block_m, int splits, float* workspace,
                              cudaStream_t stream) {
  if (p.bits < 2 || p.bits > 4 || p.G < 1 || p.K % 64 != 0 || (p.K / p.G) % 64 != 0 || p.N % 8 != 0 ||
      splits < 1 || (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0) return cudaSuccess;
  auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&]() -> cudaError_t {
      const A* d = static_cast<const A*>(dy);
      A* o = static_cast<A*>(dx);
      switch (block_m) {
        case 16: return launch<BITS, A, 16>(p, d, codes, lut, lut_type, o, splits, workspace, stream);
        case 32: return launch<BITS, A, 32>(p, d, codes, lut, lut_type, o, splits, workspace, stream);
        case 64: return launch<BITS, A, 64>(p, d, codes, lut, lut_type, o, splits, workspace, stream);
        case 128: return launch<BITS, A, 128>(p, d, codes, lut, lut_type, o, splits, workspace, stream);
        default: return cudaErrorInvalidValue;
      }
    });
  };
  return dispatch_half(act_type, run);
}

}  // namespace spallm::cuda
