// Vectorised CPU pieces of the LUT ops (x86-64 AVX2 + FMA, chosen at run time; csrc/cpu/lut_avx2.cpp).
//
// The portable CPU path decodes W one scalar code at a time, a shift, a mask and a table load per
// weight, and at small M the decode is nearly all of the time. With AVX2 eight codes decode at
// once: the BITS bytes that hold eight consecutive codes (every packing of csrc/codes.h keeps
// eight codes in BITS bytes) are broadcast to the eight lanes of a register, each lane shifts its
// own code down (vpsrlvd) and the codes index the (row, group) table held in one or two registers
// (vpermps; a blend on bit 3 for 16 entries). A weight then costs about one instruction, and at
// decode sizes the weights go straight into FMAs with the tokens instead of through memory.
//
// No torch types here: the callers (lut_ops_cpu.cpp) hand over raw fp32 buffers, and these
// functions are the only code compiled for AVX2, behind a run-time CPU check, so no inline function
// shared with the rest of the library is ever compiled with instructions an older CPU lacks.
#pragma once
#include <cstdint>

namespace spallm::cpu {

// Rows of one sketch as the vector kernels read them: codes in the canonical layout, the LUT in fp32.
struct CodeRows {
  const uint8_t* codes = nullptr;  // [N, row_bytes]
  const float* lut = nullptr;      // [N, G, E]
  int64_t N = 0, K = 0, G = 0, E = 0, group_size = 0, row_bytes = 0;
  int bits = 0;
};

// True on an x86-64 CPU with AVX2 and FMA (and an OS that saves the ymm registers).
bool avx2_available();

// True where the CPU multiplies bf16 natively (AVX512-BF16 dot products; every CPU with AMX-BF16
// has them too), so a bf16 GEMM runs at about twice the fp32 rate instead of converting to fp32.
bool native_bf16_available();

// Whether the vector kernels take this shape: eight-column chunks that never straddle a group.
inline bool avx2_supports(int64_t in_features, int64_t group_size) {
  return group_size % 8 == 0 && in_features % 8 == 0;
}

// out[(r - r0) * K + c] = W[r, c] for rows r0 <= r < r1. Requires avx2_available() and avx2_supports(K, group_size).
void decode_rows_avx2(const CodeRows& w, int64_t r0, int64_t r1, float* out);

// The same rows as bf16 bit patterns. Only for a LUT whose fp32 values came from bf16 (every
// value exactly representable): the high half of each fp32 word then is the bf16 value itself.
void decode_rows_avx2_bf16(const CodeRows& w, int64_t r0, int64_t r1, uint16_t* out);

// y[m * N + r] = sum_c x[m * K + c] W[r, c] for rows r0 <= r < r1 and all M tokens of x (fp32,
// [M, K] contiguous), W decoded in registers and never stored. Each (token, row) sums in eight
// lanes in column order, then across the lanes: a fixed order, so results repeat bit for bit.
void gemv_rows_avx2(const CodeRows& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y);

}  // namespace spallm::cpu
