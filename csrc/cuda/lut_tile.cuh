// Pieces shared by the tensor-core LUT kernels (lut_mma.cu forward, lut_dx_mma.cu backward):
// decoding a thread's 32 codes through a transposed LUT table, and the ldmatrix loads of an
// activation operand whose rows are tokens.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "codes.h"
#include "cuda/dtype.cuh"
#include "cuda/kernels.h"
#include "cuda/mma.cuh"

namespace spallm::cuda {

__host__ __device__ constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v / 2); }

// Byte offset code_i * (1 << SHIFT) of code i of a row piece held as little-endian words (bytes
// 0.. of `w` in the canonical layout, csrc/codes.h), for a table whose entries lie 1 << SHIFT bytes
// apart. With i a compile-time constant, 2- and 4-bit codes cost one shift and one mask: the
// code is moved straight to its scaled position instead of being extracted and then multiplied.
template <int BITS, int SHIFT, int WORDS>
__host__ __device__ __forceinline__ uint32_t code_offset(const uint32_t (&w)[WORDS], int i) {
  if constexpr (BITS == 3) {
    return static_cast<uint32_t>(code_from<3>(RegisterBytes{w}, i)) << SHIFT;
  } else {
    constexpr int kPerByte = 8 / BITS, kPerWord = 32 / BITS;
    const int k = i % kPerWord;
    // Byte k / kPerByte of the word, most significant code first inside the byte.
    const int bit = 8 * (k / kPerByte) + BITS * (kPerByte - 1 - k % kPerByte);
    const uint32_t word = w[i / kPerWord];
    constexpr uint32_t kMask = ((1u << BITS) - 1) << SHIFT;
    return (bit >= SHIFT ? word >> (bit - SHIFT) : word << (SHIFT - bit)) & kMask;
  }
}

// The table value of code i, for a table at `base` whose entries lie 1 << SHIFT bytes apart.
// `lane_bytes` (the caller's row, lane and buffer offsets) must share no bit with the scaled code
// (bits SHIFT .. SHIFT + BITS - 1), so an OR adds it: with `base` a compile-time shared-memory
// offset, a lookup is then one shift, one LOP3 (mask and OR) and the load.
template <int BITS, int SHIFT, int WORDS>
__device__ __forceinline__ float lookup(const float* base, uint32_t lane_bytes, const uint32_t (&w)[WORDS], int i) {
  return smem_load(reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(base) +
                                                (code_offset<BITS, SHIFT>(w, i) | lane_bytes)),
                   "lut_lookup");
}

// 32 consecutive codes of one row, held as BITS 32-bit words (the packed row's bytes from the
// thread's first column on), decoded through a transposed [entry][row] LUT table, entry e of the
// thread's row at byte e * STRIDE * 4 + lane_bytes from `base` (lane_bytes: the row's 4 * row plus
// any buffer offset, all bits apart from the scaled code's, see lookup). The lanes of a warp own
// consecutive rows, so a lookup's 32 addresses fall in 32 banks whatever the codes. Result: 16
// registers of T pairs, column 2i in the low half of register i.
template <int BITS, typename T, int STRIDE>
__device__ __forceinline__ void decode32(const uint32_t (&words)[BITS], const float* base, uint32_t lane_bytes,
                                         uint32_t (&packed)[16]) {
  static_assert(STRIDE > 0 && (STRIDE & (STRIDE - 1)) == 0, "a power-of-two table stride");
  constexpr int kShift = log2_exact(STRIDE * 4);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    packed[i] = pack2<T>(lookup<BITS, kShift>(base, lane_bytes, words, 2 * i),
                         lookup<BITS, kShift>(base, lane_bytes, words, 2 * i + 1));
  }
}

// WORDS registers of packed pairs (WORDS / 4 16-byte units, 8 columns each, from unit u0 on) into
// `row` of a swizzled tile: a lane per row, so the 8 rows of each quarter warp cover all 32 banks.
template <int UNITS, int WORDS>
__device__ __forceinline__ void store_units(const SwizzledTile<UNITS>& tile, int row, int u0,
                                            const uint32_t (&packed)[WORDS]) {
  static_assert(WORDS % 4 == 0, "whole 16-byte units");
#pragma unroll
  for (int u = 0; u < WORDS / 4; ++u) {
    smem_store(reinterpret_cast<uint4*>(tile.unit(row, u0 + u)),
               make_uint4(packed[4 * u], packed[4 * u + 1], packed[4 * u + 2], packed[4 * u + 3]), "w_store");
  }
}

// B fragments (n8 x k16) of TM token tiles from a tile stored [token][k] (rows = tokens), for the
// k16 slice starting at column kk: one ldmatrix.x4 per pair of token tiles.
template <int TM, int UNITS>
__device__ __forceinline__ void load_token_fragments(const SwizzledTile<UNITS>& tile, int token0, int kk, int lane,
                                                     uint32_t (&b)[TM][2]) {
  static_assert(TM % 2 == 0, "token tiles are loaded in pairs");
#pragma unroll
  for (int j = 0; j < TM; j += 2) {
    uint32_t r[4];
    ldmatrix_x4(r, tile.at(token0 + j * 8 + (lane / 16) * 8 + lane % 8, kk + ((lane / 8) % 2) * 8));
    b[j][0] = r[0];
    b[j][1] = r[1];
    b[j + 1][0] = r[2];
    b[j + 1][1] = r[3];
  }
}

// acc[i][j] += a[i] * b[j] for a warp's TN x TM mma tiles.
template <typename T, int TN, int TM>
__device__ __forceinline__ void mma_tiles(float (&acc)[TN][TM][4], const uint32_t (&a)[TN][4], const uint32_t (&b)[TM][2]) {
#pragma unroll
  for (int i = 0; i < TN; ++i) {
#pragma unroll
    for (int j = 0; j < TM; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
  }
}

// The prologue of a cp.async ring of STAGES slots: load(slot, step) for the first STAGES - 1 steps.
// One commit per slot, empty or not (and the main loops commit once per iteration), so "all but
// the newest STAGES - 2 groups done" always means "this iteration's slot has landed".
template <int STAGES, typename Load>
__device__ __forceinline__ void ring_prologue(int nsteps, int64_t step_begin, Load&& load) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nsteps) load(s, step_begin + s);
    cp_async_commit();
  }
}

// A block tile of ROWS (the MMA's M side: rows of W, or columns for dx) x BM tokens split over
// 8 warps; each warp holds TN x TM mma tiles. Small token tiles put all warps along ROWS.
template <int BM, int ROWS>
struct WarpTiling {
  static constexpr int kWarpsN = BM <= 32 ? 8 : 4;
  static constexpr int kWarpsM = 8 / kWarpsN;
  static constexpr int kWarpRows = ROWS / kWarpsN;  // W rows per warp
  static constexpr int kWarpTokens = BM / kWarpsM;
  static constexpr int TN = kWarpRows / 16;            // m16 tiles (rows of W)
  static constexpr int TM = kWarpTokens / 8;           // n8 tiles (tokens)
  static constexpr int kStages = BM <= 32 ? 4 : 3;
  static_assert(TN >= 1 && TM >= 2 && TM % 2 == 0, "ldmatrix.x4 loads token tiles in pairs");
};

// A kernel defined in a header: an anonymous namespace gives each .cu file its own instantiation,
// so no two translation units register one host stub for their separate device modules.
namespace {

// y[m, n] = sum over splits, in split order, of the partials (+ bias[n]).
template <typename A>
__global__ void __launch_bounds__(256)
splitk_reduce_kernel(int64_t M, int64_t N, int splits, const float* __restrict__ workspace,
                     const A* __restrict__ bias, A* __restrict__ y) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float s = bias != nullptr ? to_float(bias[i % N]) : 0.f;
    for (int k = 0; k < splits; ++k) s += workspace[k * total + i];
    y[i] = from_float<A>(s);
  }
}

}  // namespace

}  // namespace spallm::cuda
