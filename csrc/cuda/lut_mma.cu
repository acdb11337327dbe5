// The fused LUT gather-GEMM: y = x W^T (+ bias) on tensor cores, W decoded tile by tile in shared
// memory and never written to HBM. sm_80+, bf16 / fp16 activations (W is rounded to them, as the
// weight of a bf16 nn.Linear is), fp32 accumulation.
//
// Block tile: 128 rows of W (kBlockN) x block_m tokens, K walked in steps of 64 columns
// (kBlockK). Per K-step, per block:
//   1. cp.async brings the codes tile [128 rows x 64*BITS/8 bytes] and the x tile [block_m x 64]
//      into a STAGES-deep ring, issued STAGES-1 steps ahead so HBM latency hides behind work.
//   2. Decode: thread (row = tid % 128, half = tid / 128) turns its 32 codes (BITS words, read
//      from a row-padded tile: odd word stride, so the 32 rows of a warp hit 32 banks) into 32
//      16-bit weights through the LUT table and stores them as 4 x 16 bytes into a swizzled W tile.
//      The table holds the current group's LUT of the block's rows transposed, [2^BITS][128] fp32:
//      a warp's 32 lanes are 32 consecutive rows, so a lookup's 32 addresses fall in 32 different
//      banks whatever the codes are (SqueezeLLM's layout). One lookup per weight is the whole
//      decode cost; tables are refilled only when the K-step enters a new group.
//   3. mma: warps tile the block (WARPS_N x WARPS_M), fragments come from the swizzled W and x
//      tiles with ldmatrix, m16n8k16 with W as operand A (swap-AB: output rows are the MMA's M, so
//      a single token wastes no more than the n8 width, not a 16-row tile).
// Small M is bound by reading codes: 132 SMs need more blocks than N/128 row tiles, so K is split
// across blockIdx.z (dispatch.cpp picks the split) and the fp32 partials are added in split order
// by a second kernel, with the bias (deterministic, no atomics).
// A low-rank branch (spallm.lut_linear_lowrank: y += (x l1) l2) joins in the epilogue, where the
// finished accumulators get bias + t[m, :] . l2[:, n] before their one rounding (in the split-K
// reduction when K is split); t = x l1 is a skinny GEMM the caller runs first.
// Multi-adapter batches (tokens grouped by adapter, Segments) run in the same launch: blockIdx.z
// also walks the adapters, a block takes token tiles of its adapter's segment only and reads that
// adapter's LUT; the codes tiles are shared through L2, so HBM still sees them about once.
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
constexpr int kBlockN = 128;
constexpr int kBlockK = 64;
static_assert(kThreads == 2 * kBlockN, "decode: two threads (32 columns each) per row of the tile");

template <int BITS, int BM>
struct Smem {
  using C = WarpTiling<BM, kBlockN>;
  static constexpr int kEntries = 1 << BITS;
  static constexpr int kCodeWords = kBlockK * BITS / 32;  // per row and K-step
  static constexpr int kCodeStride = kCodeWords + 1;       // odd: conflict-free row-per-lane reads
  static constexpr int kXBytes = BM * SwizzledTile64::kRowBytes;
  static constexpr int kWBytes = kBlockN * SwizzledTile64::kRowBytes;
  static constexpr int kTableFloats = kEntries * kBlockN;
  static constexpr int kCodeBytes = kBlockN * kCodeStride * 4;
  // 16-byte aligned parts first.
  static constexpr int kX = 0;
  static constexpr int kW = kX + C::kStages * kXBytes;
  static constexpr int kTable = kW + 2 * kWBytes;
  static constexpr int kCodes = kTable + 2 * kTableFloats * 4;
  static constexpr int kBytes = kCodes + C::kStages * kCodeBytes;
};

template <int BITS, typename A, int BM>
__global__ void __launch_bounds__(kThreads, 2)
lut_mma_kernel(LutProblem p, const A* __restrict__ x, const uint8_t* __restrict__ codes,
               const void* __restrict__ lut, DType lut_type, const A* __restrict__ bias,
               A* __restrict__ y, float* __restrict__ workspace, int splits, LowRank lowrank, Segments seg) {
  using C = WarpTiling<BM, kBlockN>;
  using S = Smem<BITS, BM>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int split = blockIdx.z % splits;
  const int64_t adapter = blockIdx.z / splits;
  // Token rows [m_begin, m_end) belong to this block's adapter; the grid has tiles for the largest
  // possible segment, so blocks past the end of theirs leave at once (block-uniform, before any
  // barrier).
  const int64_t m_begin = seg.offsets != nullptr ? seg.offsets[adapter] : 0;
  const int64_t m_end = seg.offsets != nullptr ? seg.offsets[adapter + 1] : p.M;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN, m0 = m_begin + int64_t(blockIdx.y) * BM;
  if (m0 >= m_end) return;
  const int64_t lut_offset = adapter * seg.lut_stride;

  const int64_t steps_total = p.K / kBlockK, steps_per_group = p.K / p.G / kBlockK;
  const int64_t step_begin = steps_total * split / splits, step_end = steps_total * (split + 1) / splits;
  const int nsteps = static_cast<int>(step_end - step_begin);
  const int64_t code_step_bytes = kBlockK * BITS / 8;

  auto x_tile = [&](int stage) { return SwizzledTile64{smem + S::kX + stage * S::kXBytes}; };
  auto w_tile = [&](int buf) { return SwizzledTile64{smem + S::kW + buf * S::kWBytes}; };
  auto table = [&](int buf) { return reinterpret_cast<float*>(smem + S::kTable) + buf * S::kTableFloats; };
  auto code_tile = [&](int stage) {
    return reinterpret_cast<uint32_t*>(smem + S::kCodes + stage * S::kCodeBytes);
  };

  auto load_stage = [&](int stage, int64_t step) {
    uint32_t* ct = code_tile(stage);
    for (int i = tid; i < kBlockN * S::kCodeWords; i += kThreads) {
      const int row = i / S::kCodeWords, word = i % S::kCodeWords;
      const int64_t n = n0 + row;
      const bool ok = n < p.N;
      const uint8_t* src = ok ? codes + n * p.row_bytes + step * code_step_bytes + word * 4 : codes;
      cp_async<4>(ct + row * S::kCodeStride + word, src, ok);
    }
    const SwizzledTile64 xt = x_tile(stage);
    for (int i = tid; i < BM * SwizzledTile64::kUnits; i += kThreads) {
      const int tok = i / SwizzledTile64::kUnits, u = i % SwizzledTile64::kUnits;
      const int64_t m = m0 + tok;
      const bool ok = m < m_end;
      const A* src = ok ? x + m * p.K + step * kBlockK + u * 8 : x;
      cp_async<16>(xt.unit(tok, u), src, ok);
    }
  };

  // The LUTs of group g for the tile's rows, transposed to [entry][row]; rows past N read as 0.
  auto fill_table = [&](int buf, int64_t g) {
    float* t = table(buf);
    for (int i = tid; i < S::kTableFloats; i += kThreads) {
      const int e = i / kBlockN, row = i % kBlockN;
      const int64_t n = n0 + row;
      t[i] = n < p.N ? load_float(lut, lut_type, lut_offset + (n * p.G + g) * S::kEntries + e) : 0.f;
    }
  };

  auto decode = [&](int stage, int buf, int tbuf) {
    const int row = tid % kBlockN, half = tid / kBlockN;
    const uint32_t* cw = code_tile(stage) + row * S::kCodeStride + half * BITS;
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = cw[i];
    uint32_t packed[16];
    decode32<BITS, A>(words, table(tbuf) + row, kBlockN, packed);
    store32(w_tile(buf), row, half * 4, packed);
  };

  const int wn = warp % C::kWarpsN, wm = warp / C::kWarpsN;
  float acc[C::TN][C::TM][4] = {};
  auto mma_step = [&](int buf, int stage) {
    const SwizzledTile64 wt = w_tile(buf), xt = x_tile(stage);
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      uint32_t a[C::TN][4];
      uint32_t b[C::TM][2];
#pragma unroll
      for (int i = 0; i < C::TN; ++i) {
        ldmatrix_x4(a[i], wt.at(wn * C::kWarpRows + i * 16 + lane % 16, kk + (lane / 16) * 8));
      }
      load_token_fragments<C::TM>(xt, wm * C::kWarpTokens, kk, lane, b);
      mma_tiles<A>(acc, a, b);
    }
  };

  ring_prologue<C::kStages>(nsteps, step_begin, load_stage);
  int64_t table_group = -1;
  int tbuf = 1;
  for (int it = 0; it < nsteps; ++it) {
    const int stage = it % C::kStages;
    cp_async_wait<C::kStages - 2>();
    // Groups advance by at most one per K-step (group size is a multiple of kBlockK), and every
    // thread has finished decode(it - 1) (barrier below), so the other table buffer is free.
    const int64_t g = (step_begin + it) / steps_per_group;
    if (g != table_group) {
      tbuf ^= 1;
      fill_table(tbuf, g);
      table_group = g;
    }
    __syncthreads();  // codes/x of this stage and the table are visible to all
    decode(stage, it & 1, tbuf);
    __syncthreads();  // W tile complete
    mma_step(it & 1, stage);
    const int next = it + C::kStages - 1;
    if (next < nsteps) load_stage(next % C::kStages, step_begin + next);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Epilogue: lane (g, t) holds rows g, g+8 and tokens 2t, 2t+1 of each mma tile.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < C::TN; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + wn * C::kWarpRows + i * 16 + g + h * 8;
      if (n >= p.N) continue;
      const float b = (splits == 1 && bias != nullptr) ? to_float(bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < C::TM; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + wm * C::kWarpTokens + j * 8 + 2 * t + e;
          if (m >= m_end) continue;
          const float v = acc[i][j][h * 2 + e];
          if (splits == 1) {
            y[m * p.N + n] = from_float<A>(v + b + low_rank_term(lowrank, m, n, p.N));
          } else {
            workspace[(split * p.M + m) * p.N + n] = v;
          }
        }
      }
    }
  }
}

template <int BITS, typename A, int BM>
cudaError_t launch(const LutProblem& p, const A* x, const uint8_t* codes, const void* lut, DType lut_type,
                   const A* bias, A* y, int splits, float* workspace, const LowRank& lowrank, const Segments& seg,
                   cudaStream_t stream) {
  using S = Smem<BITS, BM>;
  auto kernel = lut_mma_kernel<BITS, A, BM>;
  cudaError_t err = allow_smem<S>(kernel, S::kBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kBlockN)), static_cast<unsigned>(ceil_div(p.M, BM)),
                  static_cast<unsigned>(splits * seg.count));
  kernel<<<grid, kThreads, S::kBytes, stream>>>(p, x, codes, lut, lut_type, bias, y, workspace, splits, lowrank, seg);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t total = p.M * p.N;
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, 256) < 65536 ? ceil_div(total, 256) : 65536);
  splitk_reduce_kernel<A><<<blocks, 256, 0, stream>>>(p.M, p.N, splits, workspace, bias, y, lowrank);
  return cudaGetLastError();
}

template <int BITS, typename A>
cudaError_t launch_bm(int block_m, const LutProblem& p, const A* x, const uint8_t* codes, const void* lut,
                      DType lut_type, const A* bias, A* y, int splits, float* workspace, const LowRank& lr,
                      const Segments& seg, cudaStream_t stream) {
  switch (block_m) {
    case 16: return launch<BITS, A, 16>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 32: return launch<BITS, A, 32>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 64: return launch<BITS, A, 64>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 128: return launch<BITS, A, 128>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t lut_linear_mma(const LutProblem& p, const void* x, DType act_type, const uint8_t* codes,
                           const void* lut, DType lut_type, const void* bias, void* y, int block_m,
                           int splits, float* workspace, const LowRank& lowrank, const Segments& segments,
                           cudaStream_t stream) {
  if (p.bits < 2 || p.bits > 4 || p.G < 1 || p.K % kBlockK != 0 || (p.K / p.G) % kBlockK != 0 || splits < 1 ||
      (splits > 1 && workspace == nullptr) || (lowrank.t != nullptr && (lowrank.l2 == nullptr || lowrank.rank < 1)) ||
      segments.count < 1 || splits * segments.count > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      return launch_bm<BITS, A>(block_m, p, static_cast<const A*>(x), codes, lut, lut_type,
                                static_cast<const A*>(bias), static_cast<A*>(y), splits, workspace, lowrank, segments,
                                stream);
    });
  };
  return dispatch_half(act_type, run);
}

}  // namespace spallm::cuda
