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
// A low-rank branch (spallm.lut_linear_lowrank: y += (x l1) l2) joins before the one rounding.
// t = x l1 either comes from the caller (a skinny GEMM; the finished accumulators then get bias +
// t[m, :] . l2[:, n] in the epilogue, or in the split-K reduction) or, when K is split, from extra
// block columns of this launch that treat the rows of l1^T as their weights (low_rank_t_block):
// they read the same x tiles as the code blocks, so x is read once and no launch is added.
// Multi-adapter batches (tokens grouped by adapter, Segments) run in the same launch: blockIdx.y
// walks the token tiles of every adapter's segment in turn, a block takes tokens of one adapter
// only and reads that adapter's LUT; the codes tiles are shared through L2, so HBM still sees them
// about once.
//
// Two ways to decode (same blocks, ring, split-K and epilogue; dispatch.cpp picks one):
//   tile (lut_mma_kernel, any block_m): the block decodes the W tile into shared memory as above,
//     then its warps read it back with ldmatrix. Shared-memory traffic per weight: a 4-byte
//     lookup, a 2-byte store and a 2-byte ldmatrix read, about 1/15 clock per weight and SM, which
//     is below the ~26 weights per clock and SM that the codes arrive at from HBM when M is small.
//   regs (lut_mma_regs_kernel, block_m 16 or 32): every warp owns 16 rows and all tokens, so each
//     lane decodes exactly its own A-fragment values into registers and nothing goes back through
//     shared memory. Two choices make that conflict-free:
//     * The order of k inside an mma is free (a permutation applied to both operands leaves the
//       dot product alone), so lane (g, t) takes the 16 contiguous columns 16t..16t+15 of each
//       64-column step, four per mma (16t+4q..16t+4q+3 in mma q) instead of the ISA's scattered
//       2t, 2t+1, 2t+8, 2t+9: its codes are one 8 / 6 / 4-byte piece of each of its two rows, and
//       its x values one 16-byte load per token row and half step.
//     * Lane-private LUTs: lane l keeps the LUTs of its rows g and g+8 in column l of a
//       [warp][2 * 2^BITS][32] fp32 table, so the 32 lookups of a warp hit 32 banks whatever the
//       codes, and a lane only reads what it wrote itself (no barrier around refills).
//     One 4-byte lookup per weight is then the whole shared-memory cost of the decode. Its codes
//     come through a cp.async ring of code tiles or, with codes_direct (mma_regs_direct), from
//     global memory straight into registers (see "regs" below).
#include <cuda_runtime.h>

#include <algorithm>
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

// ---- Shared by both kernels ----------------------------------------------------------------

// Where a block works: rows [n0, n0 + 128) of W, tokens [m0, m0 + block_m) clipped to its adapter's
// segment [.., m_end), K-steps [step_begin, step_begin + nsteps) of its split.
// K-steps and row offsets fit 32 bits (K / 64 and N are far below 2^31); token and LUT offsets may
// not. Fewer 64-bit fields keep the 128-token tile kernel's main loop free of spills.
struct BlockWork {
  int64_t m0, m_end, lut_offset;
  int n0, step_begin, steps_per_group, split, nsteps;
};

template <int BM>
__device__ __forceinline__ BlockWork block_work(const LutProblem& p, int splits, const Segments& seg) {
  BlockWork b;
  b.split = blockIdx.z;
  b.n0 = static_cast<int>(blockIdx.x) * kBlockN;
  b.m0 = int64_t(blockIdx.y) * BM;
  b.m_end = p.M;
  b.lut_offset = 0;
  if (seg.offsets != nullptr) {
    // blockIdx.y numbers the token tiles of all adapters one after another: adapter a has
    // ceil(len_a / BM) of them, so the grid needs at most ceil(M / BM) + A rows of blocks and only
    // the few left over (m0 >= m_end below) have no work. Every thread walks the offsets (cached
    // broadcast loads), so the outcome is block-uniform and comes before any barrier.
    int64_t tile = blockIdx.y;
    b.m0 = b.m_end = 0;
    for (int64_t a = 0; a < seg.count; ++a) {
      const int64_t begin = seg.offsets[a], end = seg.offsets[a + 1];
      const int64_t tiles = (end - begin + BM - 1) / BM;
      if (tile < tiles) {
        b.m0 = begin + tile * BM;
        b.m_end = end;
        b.lut_offset = a * seg.lut_stride;
        break;
      }
      tile -= tiles;
    }
  }
  const int64_t steps_total = p.K / kBlockK;
  b.steps_per_group = static_cast<int>(p.K / p.G / kBlockK);
  b.step_begin = static_cast<int>(steps_total * b.split / splits);
  b.nsteps = static_cast<int>(steps_total * (b.split + 1) / splits) - b.step_begin;
  return b;
}

// x[m0 .. m0 + BM, step's 64 columns] into a swizzled tile. Tokens past m_end are zero-filled for
// readers of whole tiles (ldmatrix); with ZERO_FILL = false they are not written at all, for the
// register decode, whose lanes never read them: at M = 1 that drops 15 of 16 copies per step.
template <int BM, bool ZERO_FILL = true, typename A>
__device__ __forceinline__ void load_x_tile(const SwizzledTile64& xt, const A* x, const LutProblem& p,
                                            const BlockWork& b, int64_t step, int tid) {
  const int rows = ZERO_FILL ? BM : static_cast<int>(b.m_end - b.m0 < BM ? b.m_end - b.m0 : BM);
  for (int i = tid; i < rows * SwizzledTile64::kUnits; i += kThreads) {
    const int tok = i / SwizzledTile64::kUnits, u = i % SwizzledTile64::kUnits;
    const int64_t m = b.m0 + tok;
    const bool ok = m < b.m_end;
    cp_async<16>(xt.unit(tok, u), ok ? x + m * p.K + step * kBlockK + u * 8 : x, ok);
  }
}

// t[m, :] . l2[:, n] in fp32 from a precomputed t (0 without one). Threads of a warp share m and
// take 8 consecutive n, so the l2 reads of one j are one 32-byte segment; t's row stays in L1.
__device__ __forceinline__ float low_rank_term(const LowRank& lr, int64_t m, int64_t n, int64_t N) {
  if (lr.t == nullptr) return 0.f;
  const float* t = lr.t + m * lr.rank;
  float s = 0.f;
  for (int64_t j = 0; j < lr.rank; ++j) s += __ldg(t + j) * __ldg(lr.l2 + j * N + n);
  return s;
}

// A warp's TN x TM accumulator tiles, rows from row0 and tokens from tok0: lane (g, t) holds rows
// g, g+8 and tokens 2t, 2t+1 of each mma tile. Without split-K they get bias and the low-rank term
// and are rounded once into y; with it they go to the split's fp32 slice of the workspace.
template <typename A, int TN, int TM>
__device__ __forceinline__ void store_accumulators(const float (&acc)[TN][TM][4], const LutProblem& p,
                                                   const BlockWork& b, int64_t row0, int64_t tok0, int lane,
                                                   const A* bias, A* y, float* workspace, int splits,
                                                   const LowRank& lowrank) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = row0 + i * 16 + g + h * 8;
      if (n >= p.N) continue;
      const float bn = (splits == 1 && bias != nullptr) ? to_float(bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = tok0 + j * 8 + 2 * t + e;
          if (m >= b.m_end) continue;
          const float v = acc[i][j][h * 2 + e];
          if (splits == 1) {
            y[m * p.N + n] = from_float<A>(v + bn + low_rank_term(lowrank, m, n, p.N));
          } else {
            workspace[(b.split * p.M + m) * p.N + n] = v;
          }
        }
      }
    }
  }
}

// One K-step of mma over a W tile in shared memory: the warp's TN x TM tiles, A fragments (rows of
// W) by ldmatrix from `wt`, B fragments (tokens) from `xt`, both [row][64 columns] swizzled.
template <typename A, typename C>
__device__ __forceinline__ void mma_w_tile(float (&acc)[C::TN][C::TM][4], const SwizzledTile64& wt,
                                           const SwizzledTile64& xt, int wn, int wm, int lane) {
#pragma unroll
  for (int kk = 0; kk < kBlockK; kk += 16) {
    uint32_t a[C::TN][4];
    uint32_t bf[C::TM][2];
#pragma unroll
    for (int i = 0; i < C::TN; ++i) {
      ldmatrix_x4(a[i], wt.at(wn * C::kWarpRows + i * 16 + lane % 16, kk + (lane / 16) * 8));
    }
    load_token_fragments<C::TM>(xt, wm * C::kWarpTokens, kk, lane, bf);
    mma_tiles<A>(acc, a, bf);
  }
}

// ---- low-rank branch with t on chip: the extra block columns ------------------------------
//
// With LowRank::l1 set, the grid has ceil(rank / 64) block columns past the last row tile of W. Each
// runs low_rank_t_block instead of a decode: its "weights" are 64 rows of l1^T, read from global
// memory (K x rank values that every block of the column shares, so they stay in L2) one K-step
// ahead into registers, rounded to the activation dtype and stored as a W tile; the mma is the tile
// kernel's (mma_w_tile), against x tiles loaded into the kernel's own ring by the same code as the
// code blocks'. Its tokens and K-steps are its block_work, so it produces exactly its split's part
// of t = x l1 for its token tile, written in fp32 to t_partials[split]; the split-K reduction adds
// the parts in split order. 64 rows per block, not 128: every thread then carries 16 prefetched
// values rather than 32 (registers are what these kernels run short of first), and the warps over
// rows 64..127 simply skip the mma; a t block is one of ~N/128 + 1 in its grid row anyway.
constexpr int kLowRankRows = 64;

// Shared memory a t block uses: the x ring (STAGES tiles of BM tokens from offset 0, the layout of
// both kernels) and one 64-row W tile after it.
template <int BM, int STAGES>
constexpr int low_rank_smem_bytes() {
  return STAGES * BM * SwizzledTile64::kRowBytes + kLowRankRows * SwizzledTile64::kRowBytes;
}

// v[i] = l1 value at p[i * stride] (16 consecutive k of one column of l1), as fp32.
template <typename T>
__device__ __forceinline__ void fetch_l1_column(const T* p, int64_t stride, float (&v)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = to_float(p[i * stride]);
}

template <int BM, int STAGES, typename A>
__device__ __forceinline__ void low_rank_t_block(const LutProblem& p, const A* __restrict__ x, const LowRank& lr,
                                                 const BlockWork& b, int64_t r0, uint8_t* smem) {
  using C = WarpTiling<BM, kBlockN>;
  constexpr int kXBytes = BM * SwizzledTile64::kRowBytes;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  auto x_tile = [&](int stage) { return SwizzledTile64{smem + stage * kXBytes}; };
  const SwizzledTile64 wt{smem + STAGES * kXBytes};

  // Thread (row, quarter) carries l1[k, r0 + row] for the 16 columns of its quarter of a K-step; a
  // warp's lanes are 32 consecutive r, so each k is one coalesced read of a row-major l1 [K, rank].
  const int row = tid % kLowRankRows, quarter = tid / kLowRankRows;
  const int64_t r = r0 + row;
  const bool live = r < lr.rank;
  float next[16];
  auto fetch = [&](int64_t step) {
    if (!live) {
#pragma unroll
      for (int i = 0; i < 16; ++i) next[i] = 0.f;
      return;
    }
    const int64_t at = (step * kBlockK + quarter * 16) * lr.l1_stride_k + r * lr.l1_stride_r;
    switch (lr.l1_type) {
      case DType::F16: fetch_l1_column(static_cast<const __half*>(lr.l1) + at, lr.l1_stride_k, next); break;
      case DType::BF16: fetch_l1_column(static_cast<const __nv_bfloat16*>(lr.l1) + at, lr.l1_stride_k, next); break;
      default: fetch_l1_column(static_cast<const float*>(lr.l1) + at, lr.l1_stride_k, next); break;
    }
  };

  ring_prologue<STAGES>(b.nsteps, b.step_begin,
                        [&](int stage, int64_t step) { load_x_tile<BM>(x_tile(stage), x, p, b, step, tid); });
  if (b.nsteps > 0) fetch(b.step_begin);
  const int wn = warp % C::kWarpsN, wm = warp / C::kWarpsN;
  const bool warp_live = wn * C::kWarpRows < kLowRankRows;
  float acc[C::TN][C::TM][4] = {};
  for (int it = 0; it < b.nsteps; ++it) {
    const int stage = it % STAGES;
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // this step's x tile has landed for all, and every warp is done with wt
    uint32_t packed[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) packed[i] = pack2<A>(next[2 * i], next[2 * i + 1]);
    store_units(wt, row, quarter * 2, packed);
    if (it + 1 < b.nsteps) fetch(b.step_begin + it + 1);  // in flight during the mma below
    __syncthreads();  // wt complete
    if (warp_live) mma_w_tile<A, C>(acc, wt, x_tile(stage), wn, wm, lane);
    const int next_step = it + STAGES - 1;
    if (next_step < b.nsteps) load_x_tile<BM>(x_tile(next_step % STAGES), x, p, b, b.step_begin + next_step, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();
  if (!warp_live) return;
  // Same fragment map as store_accumulators: lane (g, t) holds rows g, g + 8 and tokens 2t, 2t + 1.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < C::TN; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t rr = r0 + wn * C::kWarpRows + i * 16 + g + h * 8;
      if (rr >= lr.rank) continue;
#pragma unroll
      for (int j = 0; j < C::TM; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = b.m0 + wm * C::kWarpTokens + j * 8 + 2 * t + e;
          if (m < b.m_end) lr.t_partials[(b.split * p.M + m) * lr.rank + rr] = acc[i][j][h * 2 + e];
        }
      }
    }
  }
}

// y = bias + the split partials (in split order) + t . l2, for a low-rank call with K split. A block
// owns 256 columns and 8 tokens: t's values for its tokens pass through shared memory 32 ranks at a
// time (in on-chip mode summed from their split partials, in split order), and every l2 value read
// serves the 8 tokens, so l2 crosses L2 ceil(M / 8) times instead of M times.
constexpr int kReduceTokens = 8;
constexpr int kReduceRanks = 32;

template <typename A>
__global__ void __launch_bounds__(256)
splitk_low_rank_reduce_kernel(int64_t M, int64_t N, int splits, const float* __restrict__ workspace,
                              const A* __restrict__ bias, A* __restrict__ y, LowRank lr) {
  static_assert(kReduceTokens * kReduceRanks == 256, "one staged t value per thread");
  __shared__ float t_stage[kReduceTokens][kReduceRanks];
  const int tid = threadIdx.x;
  const int64_t total = M * N;
  // Loop bounds depend on the block only, so every thread reaches every barrier.
  for (int64_t m0 = int64_t(blockIdx.y) * kReduceTokens; m0 < M; m0 += int64_t(gridDim.y) * kReduceTokens) {
    for (int64_t n0 = int64_t(blockIdx.x) * 256; n0 < N; n0 += int64_t(gridDim.x) * 256) {
      const int64_t n = n0 + tid;
      const bool col = n < N;
      const float bn = (col && bias != nullptr) ? to_float(bias[n]) : 0.f;
      float acc[kReduceTokens], branch[kReduceTokens];
#pragma unroll
      for (int e = 0; e < kReduceTokens; ++e) {
        acc[e] = bn;
        branch[e] = 0.f;
        if (col && m0 + e < M) {
          for (int k = 0; k < splits; ++k) acc[e] += workspace[k * total + (m0 + e) * N + n];
        }
      }
      for (int64_t r0 = 0; r0 < lr.rank; r0 += kReduceRanks) {
        __syncthreads();  // the previous chunk's readers are done
        {
          const int e = tid / kReduceRanks, j = tid % kReduceRanks;
          const int64_t m = m0 + e, rr = r0 + j;
          float v = 0.f;
          if (m < M && rr < lr.rank) {
            if (lr.t != nullptr) {
              v = lr.t[m * lr.rank + rr];
            } else {
              for (int k = 0; k < splits; ++k) v += lr.t_partials[(k * M + m) * lr.rank + rr];
            }
          }
          t_stage[e][j] = v;
        }
        __syncthreads();
        if (col) {
          const int64_t chunk = lr.rank - r0 < kReduceRanks ? lr.rank - r0 : kReduceRanks;
          for (int j = 0; j < chunk; ++j) {
            const float l = __ldg(lr.l2 + (r0 + j) * N + n);
#pragma unroll
            for (int e = 0; e < kReduceTokens; ++e) branch[e] += t_stage[e][j] * l;
          }
        }
      }
#pragma unroll
      for (int e = 0; e < kReduceTokens; ++e) {
        if (col && m0 + e < M) y[(m0 + e) * N + n] = from_float<A>(acc[e] + branch[e]);
      }
    }
  }
}

// ---- tile: W decoded into shared memory, read back with ldmatrix ----------------------------

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
  const BlockWork b = block_work<BM>(p, splits, seg);
  if (b.m0 >= b.m_end) return;
  if constexpr (BM <= kLowRankMaxBlockM) {
    if (b.n0 >= p.N) {  // past W's rows: a low-rank block column (the grid has them only with LowRank::l1)
      static_assert(S::kX == 0 && low_rank_smem_bytes<BM, C::kStages>() <= S::kBytes, "t blocks reuse the x ring");
      low_rank_t_block<BM, C::kStages>(p, x, lowrank, b, (blockIdx.x - ceil_div(p.N, kBlockN)) * kLowRankRows, smem);
      return;
    }
  }
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
      const int64_t n = b.n0 + row;
      const bool ok = n < p.N;
      const uint8_t* src = ok ? codes + n * p.row_bytes + step * code_step_bytes + word * 4 : codes;
      cp_async<4>(ct + row * S::kCodeStride + word, src, ok);
    }
    load_x_tile<BM>(x_tile(stage), x, p, b, step, tid);
  };

  // The LUTs of group g for the tile's rows, transposed to [entry][row]; rows past N read as 0.
  auto fill_table = [&](int buf, int64_t g) {
    float* t = table(buf);
    for (int i = tid; i < S::kTableFloats; i += kThreads) {
      const int e = i / kBlockN, row = i % kBlockN;
      const int64_t n = b.n0 + row;
      t[i] = n < p.N ? load_float(lut, lut_type, b.lut_offset + (n * p.G + g) * S::kEntries + e) : 0.f;
    }
  };

  auto decode = [&](int stage, int buf, int tbuf) {
    const int row = tid % kBlockN, half = tid / kBlockN;
    const uint32_t* cw = code_tile(stage) + row * S::kCodeStride + half * BITS;
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = smem_load(cw + i, "code_words");
    uint32_t packed[16];
    // Row (bits 2..8) and buffer (bit BITS + 9) offsets sit around the scaled code (bits 9..).
    static_assert(S::kTableFloats * 4 == (kBlockN * 4) << BITS, "table buffers start above the code bits");
    decode32<BITS, A, kBlockN>(words, table(0), row * 4 | tbuf * S::kTableFloats * 4, packed);
    store_units(w_tile(buf), row, half * 4, packed);
  };

  const int wn = warp % C::kWarpsN, wm = warp / C::kWarpsN;
  float acc[C::TN][C::TM][4] = {};

  ring_prologue<C::kStages>(b.nsteps, b.step_begin, load_stage);
  int64_t table_group = -1;
  int tbuf = 1;
  for (int it = 0; it < b.nsteps; ++it) {
    const int stage = it % C::kStages;
    cp_async_wait<C::kStages - 2>();
    // Groups advance by at most one per K-step (group size is a multiple of kBlockK), and every
    // thread has finished decode(it - 1) (barrier below), so the other table buffer is free.
    const int64_t g = (b.step_begin + it) / b.steps_per_group;
    if (g != table_group) {
      tbuf ^= 1;
      fill_table(tbuf, g);
      table_group = g;
    }
    __syncthreads();  // codes/x of this stage and the table are visible to all
    decode(stage, it & 1, tbuf);
    __syncthreads();  // W tile complete
    mma_w_tile<A, C>(acc, w_tile(it & 1), x_tile(stage), wn, wm, lane);
    const int next = it + C::kStages - 1;
    if (next < b.nsteps) load_stage(next % C::kStages, b.step_begin + next);
    cp_async_commit();
  }
  cp_async_wait<0>();
  store_accumulators<A>(acc, p, b, b.n0 + wn * C::kWarpRows, b.m0 + wm * C::kWarpTokens, lane, bias, y, workspace,
                        splits, lowrank);
}

// ---- regs: each lane decodes its own A fragments (block_m 16 or 32) -------------------------
//
// Where a lane's codes come from (DIRECT, MmaConfig::codes_direct):
//   false: a cp.async ring of code tiles in shared memory, as the tile kernel has; each lane then
//          reads its two rows' pieces back (lane_codes).
//   true:  straight from global memory into a ring of kCodeRegStages register sets, loaded that
//          many K-steps ahead with 8-byte (4-bit) / 4-byte loads. The 4 lanes of a row read one
//          32-byte sector between them (24 bytes of one for 3-bit), so HBM sees the same full
//          sectors; what goes away is the code tile's round trip through shared memory: its
//          cp.async write and the lane_codes read, 8 of the 42 bank wavefronts per 1024 weights
//          at M = 1 (bench/smem_traffic.py), and 16 KB of shared memory per block. The price: the
//          main loop is unrolled by the ring depth (a register array needs constant indices) and
//          the bytes in flight are the ring's (ring depth x 512 bytes per warp, 4-bit), where
//          cp.async keeps them out of the register file.

// Only the 16-token tile has the registers for a ring (ptxas, sm_90a: 128 with a 4-deep ring and
// no spills; the 32-token tile spilled even with a 2-deep one), and only there does the code tile's
// share of shared-memory traffic matter (at M = 1: 8 of 42 wavefronts per 1024 weights).
constexpr int kCodeRegStages = 4;

template <int BITS, int BM, bool DIRECT = false>
struct RegsSmem {
  static_assert(BM == 16 || BM == 32, "every warp owns 16 rows and all tokens");
  static_assert(!DIRECT || BM == 16, "codes in registers: 16-token tiles only");
  static constexpr int kStages = 4;
  static constexpr int kEntries = 1 << BITS;
  static constexpr int kCodeRowBytes = kBlockK * BITS / 8;  // 32 / 24 / 16 bytes per row and K-step
  static constexpr int kCopyBytes = kCodeRowBytes % 16 == 0 ? 16 : 8;  // the ring's cp.async pieces
  static_assert(kCodeRowBytes % kCopyBytes == 0, "whole pieces per code row");
  static constexpr int kXBytes = BM * SwizzledTile64::kRowBytes;
  static constexpr int kCodeBytes = DIRECT ? 0 : kBlockN * kCodeRowBytes;
  static constexpr int kLaneLut = 2 * kEntries;  // floats per lane: rows g and g + 8
  static constexpr int kTableBytes = kThreads * kLaneLut * 4;
  static constexpr int kX = 0;
  static constexpr int kCodes = kX + kStages * kXBytes;
  static constexpr int kTable = kCodes + kStages * kCodeBytes;
  static constexpr int kBytes = kTable + kTableBytes;
};

// A lane's piece of one row's K-step: the 16 codes of columns 16t..16t+15, which are 8 bytes at 8t
// (4-bit), 4 at 4t (2-bit) or 6 at 6t (3-bit: two 8-column bit-plane chunks; 6t is word aligned
// for even t only, so the piece is read as the two words from word 3t / 2 on, and odd t shifts
// them down by 16 bits). kWords raw words per piece, first at word first_word(t) of the row's step.
template <int BITS>
struct LanePiece {
  static constexpr int kWords = BITS == 2 ? 1 : 2;
  static __device__ __forceinline__ int first_word(int t) { return BITS == 4 ? 2 * t : BITS == 2 ? t : (3 * t) / 2; }
  // The raw words as bytes 0.. of w in the canonical layout.
  static __device__ __forceinline__ void codes(const uint32_t (&raw)[kWords], int t, uint32_t (&w)[2]) {
    if constexpr (BITS == 3) {
      const int shift = (t & 1) * 16;
      w[0] = __funnelshift_r(raw[0], raw[1], shift);
      w[1] = raw[1] >> shift;
    } else {
      w[0] = raw[0];
      w[1] = kWords == 2 ? raw[kWords - 1] : 0;
    }
  }
};

// The lane's piece from a code tile row in shared memory (`row`: its kCodeRowBytes bytes).
template <int BITS>
__device__ __forceinline__ void lane_codes(const uint8_t* row, int t, uint32_t (&w)[2]) {
  using P = LanePiece<BITS>;
  const uint32_t* r = reinterpret_cast<const uint32_t*>(row) + P::first_word(t);
  uint32_t raw[P::kWords];
  if constexpr (BITS == 4) {
    const uint2 v = smem_load(reinterpret_cast<const uint2*>(r), "lane_codes");
    raw[0] = v.x;
    raw[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < P::kWords; ++i) raw[i] = smem_load(r + i, "lane_codes");
  }
  P::codes(raw, t, w);
}

// The lane's raw piece straight from global memory (`row`: the step's bytes of a row of W that
// exists; rows past N take zeros, whose lookups hit the zero LUT those rows get).
template <int BITS>
__device__ __forceinline__ void lane_codes_global(const uint8_t* row, bool valid, int t,
                                                  uint32_t (&raw)[LanePiece<BITS>::kWords]) {
  using P = LanePiece<BITS>;
  const uint32_t* r = reinterpret_cast<const uint32_t*>(row) + P::first_word(t);
  if constexpr (BITS == 4) {
    const uint2 v = valid ? ldg_stream(reinterpret_cast<const uint2*>(r)) : uint2{0, 0};
    raw[0] = v.x;
    raw[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < P::kWords; ++i) raw[i] = valid ? ldg_stream(r + i) : 0u;
  }
}

template <int BITS, typename A, int BM, bool DIRECT>
__global__ void __launch_bounds__(kThreads, 2)
lut_mma_regs_kernel(LutProblem p, const A* __restrict__ x, const uint8_t* __restrict__ codes,
                    const void* __restrict__ lut, DType lut_type, const A* __restrict__ bias,
                    A* __restrict__ y, float* __restrict__ workspace, int splits, LowRank lowrank, Segments seg) {
  using S = RegsSmem<BITS, BM, DIRECT>;
  using P = LanePiece<BITS>;
  constexpr int TM = BM / 8;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const BlockWork b = block_work<BM>(p, splits, seg);
  if (b.m0 >= b.m_end) return;
  if (b.n0 >= p.N) {  // a low-rank block column, as in lut_mma_kernel
    static_assert(S::kX == 0 && low_rank_smem_bytes<BM, S::kStages>() <= S::kBytes, "t blocks reuse the x ring");
    low_rank_t_block<BM, S::kStages>(p, x, lowrank, b, (blockIdx.x - ceil_div(p.N, kBlockN)) * kLowRankRows, smem);
    return;
  }

  auto x_tile = [&](int stage) { return SwizzledTile64{smem + S::kX + stage * S::kXBytes}; };
  auto code_tile = [&](int stage) { return smem + S::kCodes + stage * S::kCodeBytes; };
  // Lane-private LUT column: value k (row g + 8 * (k / 2^BITS), entry k % 2^BITS) at float
  // 32 k + lane of the warp's [2 * 2^BITS][32] slice. The lane and warp offsets stay below and above
  // the scaled code's bits (7 .. 6 + BITS; row g + 8 is bit BITS + 7), as lookup() needs.
  float* const lut_table = reinterpret_cast<float*>(smem + S::kTable);
  const uint32_t lut_lane_bytes = (warp * S::kLaneLut * 32 + lane) * 4;
  static_assert(S::kLaneLut * 32 * 4 == 256 << BITS, "warp slices start above the code and row bits");
  float* const lut_col = lut_table + warp * S::kLaneLut * 32 + lane;

  auto load_stage = [&](int stage, int64_t step) {
    if constexpr (!DIRECT) {
      constexpr int kCopies = S::kCodeRowBytes / S::kCopyBytes;
      uint8_t* ct = code_tile(stage);
      for (int i = tid; i < kBlockN * kCopies; i += kThreads) {
        const int row = i / kCopies, part = i % kCopies;
        const int64_t n = b.n0 + row;
        const bool ok = n < p.N;
        const uint8_t* src = ok ? codes + n * p.row_bytes + step * S::kCodeRowBytes + part * S::kCopyBytes : codes;
        cp_async<S::kCopyBytes>(ct + row * S::kCodeRowBytes + part * S::kCopyBytes, src, ok);
      }
    }
    load_x_tile<BM, false>(x_tile(stage), x, p, b, step, tid);
  };

  // DIRECT: the register ring, slot r holding the raw pieces of rows g and g + 8 for K-step
  // it with it % kRing == r.
  const int64_t row0 = b.n0 + warp * 16 + g;
  const uint8_t* const code_row0 = codes + row0 * p.row_bytes;
  const uint8_t* const code_row1 = code_row0 + 8 * p.row_bytes;
  constexpr int kRing = DIRECT ? kCodeRegStages : 1;
  uint32_t code_ring[kRing][2][P::kWords];
  auto fetch_codes = [&](uint32_t (&slot)[2][P::kWords], int64_t step) {
    lane_codes_global<BITS>(code_row0 + step * S::kCodeRowBytes, row0 < p.N, t, slot[0]);
    lane_codes_global<BITS>(code_row1 + step * S::kCodeRowBytes, row0 + 8 < p.N, t, slot[1]);
  };

  // Group changes: the next group's LUT values are loaded into registers one step ahead (their
  // latency hides behind that step's mma) and written to the lane's column when the group starts.
  float next_lut[S::kLaneLut];
  auto fetch_luts = [&](int64_t group) {
#pragma unroll
    for (int k = 0; k < S::kLaneLut; ++k) {
      const int64_t n = row0 + 8 * (k / S::kEntries);
      next_lut[k] = n < p.N ? load_float(lut, lut_type, b.lut_offset + (n * p.G + group) * S::kEntries + k % S::kEntries)
                            : 0.f;
    }
  };
  auto store_luts = [&] {
#pragma unroll
    for (int k = 0; k < S::kLaneLut; ++k) lut_col[32 * k] = next_lut[k];
  };

  float acc[1][TM][4] = {};
  const int64_t tokens = b.m_end - b.m0;  // valid tokens of this tile (more than BM: all BM are)
  // w0 / w1: the lane's codes of rows g and g + 8 in this K-step.
  auto decode_mma = [&](int stage, const uint32_t (&w0)[2], const uint32_t (&w1)[2]) {
    // Entries of a lane's column lie 32 floats (128 bytes) apart, row g + 8's 2^BITS entries on.
    auto weight = [&](const uint32_t(&w)[2], int half, int i) {
      return lookup<BITS, 7>(lut_table + 32 * half * S::kEntries, lut_lane_bytes, w, i);
    };
    const SwizzledTile64 xt = x_tile(stage);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Token g of each n8 tile, columns 16t + 8h .. +7: the B fragments of mmas 2h and 2h + 1.
      // Lanes whose token is past the tile's last take zeros without a shared-memory read (nor were
      // those rows copied in: load_x_tile<BM, false>): at M = 1 a warp reads 64 bytes of x per load
      // instead of 512, and x would otherwise be a third of the decode's shared-memory traffic
      // (bench/smem_traffic.py).
      uint4 xv[TM];
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        xv[j] = smem_load_if(j * 8 + g < tokens, reinterpret_cast<const uint4*>(xt.at(j * 8 + g, 16 * t + 8 * h)),
                             "x_regs");
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int i = 8 * h + 4 * q;  // the lane's columns i..i+3 (of its 16) in this mma
        const uint32_t a[4] = {pack2<A>(weight(w0, 0, i), weight(w0, 0, i + 1)),
                               pack2<A>(weight(w1, 1, i), weight(w1, 1, i + 1)),
                               pack2<A>(weight(w0, 0, i + 2), weight(w0, 0, i + 3)),
                               pack2<A>(weight(w1, 1, i + 2), weight(w1, 1, i + 3))};
#pragma unroll
        for (int j = 0; j < TM; ++j) {
          const uint32_t bf[2] = {q == 0 ? xv[j].x : xv[j].z, q == 0 ? xv[j].y : xv[j].w};
          mma_16816<A>(acc[0][j], a, bf);
        }
      }
    }
  };

  // K-step it, with (DIRECT) its codes in code_ring[r]; slot r is refilled with step it + ring
  // depth as soon as its codes are in w0 / w1.
  auto step = [&](int it, int r) {
    const int stage = it % S::kStages;
    const int64_t k_step = b.step_begin + it;
    cp_async_wait<S::kStages - 2>();
    // One barrier per step: this stage has landed for everyone, and every warp is done with the
    // stage that the load below refills (read in step it - 1).
    __syncthreads();
    if (it > 0 && k_step % b.steps_per_group == 0) store_luts();
    if (it + 1 < b.nsteps && (k_step + 1) % b.steps_per_group == 0) fetch_luts((k_step + 1) / b.steps_per_group);
    uint32_t w0[2], w1[2];
    if constexpr (DIRECT) {
      P::codes(code_ring[r][0], t, w0);
      P::codes(code_ring[r][1], t, w1);
      if (it + kRing < b.nsteps) fetch_codes(code_ring[r], k_step + kRing);
    } else {
      const uint8_t* rows = code_tile(stage) + (warp * 16 + g) * S::kCodeRowBytes;
      lane_codes<BITS>(rows, t, w0);
      lane_codes<BITS>(rows + 8 * S::kCodeRowBytes, t, w1);
    }
    decode_mma(stage, w0, w1);
    const int next = it + S::kStages - 1;
    if (next < b.nsteps) load_stage(next % S::kStages, b.step_begin + next);
    cp_async_commit();
  };

  ring_prologue<S::kStages>(b.nsteps, b.step_begin, load_stage);
  if constexpr (DIRECT) {
#pragma unroll
    for (int r = 0; r < kRing; ++r) {
      if (r < b.nsteps) fetch_codes(code_ring[r], b.step_begin + r);
    }
  }
  if (b.nsteps > 0) {
    fetch_luts(b.step_begin / b.steps_per_group);
    store_luts();
  }
  // DIRECT unrolls the loop by the ring depth, so every code_ring index is a constant.
  constexpr int kUnroll = kRing;
  for (int it0 = 0; it0 < b.nsteps; it0 += kUnroll) {
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (it0 + r < b.nsteps) step(it0 + r, r);
    }
  }
  cp_async_wait<0>();
  store_accumulators<A>(acc, p, b, b.n0 + warp * 16, b.m0, lane, bias, y, workspace, splits, lowrank);
}

// ---- launch --------------------------------------------------------------------------------

// DECODE: 0 tile, 1 regs with the code ring in shared memory, 2 regs with codes in registers.
template <int BITS, typename A, int BM, int DECODE>
cudaError_t launch(const LutProblem& p, const A* x, const uint8_t* codes, const void* lut, DType lut_type,
                   const A* bias, A* y, int splits, float* workspace, const LowRank& lowrank, const Segments& seg,
                   cudaStream_t stream) {
  cudaError_t err;
  const int64_t token_tiles = ceil_div(p.M, BM) + (seg.offsets != nullptr ? seg.count : 0);
  const int64_t t_columns = lowrank.l1 != nullptr ? ceil_div(lowrank.rank, kLowRankRows) : 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kBlockN) + t_columns), static_cast<unsigned>(token_tiles),
                  static_cast<unsigned>(splits));
  if constexpr (DECODE != 0) {
    using S = RegsSmem<BITS, BM, DECODE == 2>;
    auto kernel = lut_mma_regs_kernel<BITS, A, BM, DECODE == 2>;
    err = allow_smem<S>(kernel, S::kBytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, S::kBytes, stream>>>(p, x, codes, lut, lut_type, bias, y, workspace, splits, lowrank, seg);
  } else {
    using S = Smem<BITS, BM>;
    auto kernel = lut_mma_kernel<BITS, A, BM>;
    err = allow_smem<S>(kernel, S::kBytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, S::kBytes, stream>>>(p, x, codes, lut, lut_type, bias, y, workspace, splits, lowrank, seg);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  if (lowrank.t != nullptr || lowrank.l1 != nullptr) {
    const dim3 rgrid(static_cast<unsigned>(std::min<int64_t>(ceil_div(p.N, 256), 65535)),
                     static_cast<unsigned>(std::min<int64_t>(ceil_div(p.M, kReduceTokens), 65535)));
    splitk_low_rank_reduce_kernel<A><<<rgrid, 256, 0, stream>>>(p.M, p.N, splits, workspace, bias, y, lowrank);
  } else {
    const int64_t total = p.M * p.N;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65536));
    splitk_reduce_kernel<A><<<blocks, 256, 0, stream>>>(p.M, p.N, splits, workspace, bias, y);
  }
  return cudaGetLastError();
}

template <int BITS, typename A>
cudaError_t launch_config(int block_m, int decode, const LutProblem& p, const A* x, const uint8_t* codes,
                          const void* lut, DType lut_type, const A* bias, A* y, int splits, float* workspace,
                          const LowRank& lr, const Segments& seg, cudaStream_t stream) {
  if (decode == 2) {
    if (block_m != 16) return cudaErrorInvalidValue;
    return launch<BITS, A, 16, 2>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
  }
  if (decode == 1) {
    switch (block_m) {
      case 16: return launch<BITS, A, 16, 1>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
      case 32: return launch<BITS, A, 32, 1>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (block_m) {
    case 16: return launch<BITS, A, 16, 0>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 32: return launch<BITS, A, 32, 0>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 64: return launch<BITS, A, 64, 0>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    case 128: return launch<BITS, A, 128, 0>(p, x, codes, lut, lut_type, bias, y, splits, workspace, lr, seg, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The register decode's figure is its code-ring variant's, the larger of the two (mma_regs_direct
// has no code tiles), so one check covers both.
int lut_mma_smem_bytes(int bits, int block_m, bool regs) {
  return SPALLM_DISPATCH_BITS(bits, [&]() -> int {
    if (regs) return block_m == 16 ? RegsSmem<BITS, 16>::kBytes : block_m == 32 ? RegsSmem<BITS, 32>::kBytes : -1;
    return smem_bytes_for<Smem, BITS>(block_m);
  });
}

cudaError_t lut_linear_mma(const LutProblem& p, const void* x, DType act_type, const uint8_t* codes,
                           const void* lut, DType lut_type, const void* bias, void* y, const MmaConfig& config,
                           float* workspace, const LowRank& lowrank, const Segments& segments, cudaStream_t stream) {
  const int splits = config.splits;
  if (p.bits < 2 || p.bits > 4 || p.G < 1 || p.K % kBlockK != 0 || (p.K / p.G) % kBlockK != 0 || splits < 1 ||
      (splits > 1 && workspace == nullptr) ||
      ((lowrank.t != nullptr || lowrank.l1 != nullptr) && (lowrank.l2 == nullptr || lowrank.rank < 1)) ||
      (lowrank.l1 != nullptr && (lowrank.t != nullptr || lowrank.t_partials == nullptr || splits < 2 ||
                                 config.block_m > kLowRankMaxBlockM)) ||
      segments.count < 1 || splits > 65535 ||
      ceil_div(p.M, config.block_m) + (segments.offsets != nullptr ? segments.count : 0) > 65535 ||
      (config.regs && reinterpret_cast<uintptr_t>(codes) % 16 != 0) || (config.codes_direct && !config.regs)) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  auto run = [&](auto tag) {
    using A = typename decltype(tag)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      const int decode = config.regs ? (config.codes_direct ? 2 : 1) : 0;
      return launch_config<BITS, A>(config.block_m, decode, p, static_cast<const A*>(x), codes, lut, lut_type,
                                    static_cast<const A*>(bias), static_cast<A*>(y), splits, workspace, lowrank,
                                    segments, stream);
    });
  };
  return dispatch_half(act_type, run);
}

}  // namespace spallm::cuda
