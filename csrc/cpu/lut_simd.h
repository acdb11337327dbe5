// Vectorised CPU pieces of the LUT ops (x86-64, chosen at run time; the kernels are written once in
// csrc/cpu/lut_vec.h and compiled per instruction set in lut_avx2.cpp and lut_avx512.cpp).
//
// The portable CPU path decodes W one scalar code at a time, a shift, a mask and a table load per
// weight, and at small M the decode is nearly all of the time. The vector kernels decode a
// register of codes at once: the bytes that hold them are broadcast to the lanes, each lane shifts
// its own code down (vpsrlvd) and the codes index the (row, group) table held in registers (a
// permute). AVX2 + FMA: eight codes per step, a 16-entry table in two registers (two vpermps and a
// blend on bit 3). AVX-512: sixteen codes per step and every table in one register (one vpermps),
// so a weight costs under half an instruction. At decode sizes the weights go straight into FMAs
// with the tokens instead of through memory.
//
// No torch types here: the callers (lut_ops_cpu.cpp) hand over raw fp32 buffers, and these
// functions are the only code compiled for AVX2 / AVX-512, behind a run-time CPU check, so no
// inline function shared with the rest of the library is ever compiled with instructions an older
// CPU lacks.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// One instruction set's kernels. A sketch takes them when its group size is a multiple of `width`
// (steps of `width` columns never straddle a group; in_features is then a multiple too).
struct VectorKernels {
  const char* name = nullptr;  // "avx2" or "avx512": the CPU plans are named after it
  int width = 0;               // codes decoded per step
  // out[(r - r0) * (c1 - c0) + c - c0] = W[r, c] for rows r0 <= r < r1 and columns c0 <= c < c1
  // (multiples of `width`, not necessarily of the group size).
  void (*decode)(const CodeRows& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out) = nullptr;
  // The same window as bf16 bit patterns. Only for a LUT whose fp32 values came from bf16 (every
  // value exactly representable): the high half of each fp32 word then is the bf16 value itself.
  void (*decode_bf16)(const CodeRows& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, uint16_t* out) = nullptr;
  // y[m * N + r] = sum_c x[m * K + c] W[r, c] for rows r0 <= r < r1 and all M tokens of x (fp32,
  // [M, K] contiguous), W decoded in registers and never stored. Each (token, row) sums in the
  // lanes in column order, then across the lanes: a fixed order, so results repeat bit for bit.
  void (*gemv)(const CodeRows& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y) = nullptr;
  // The same pass for bf16 tokens (x as bf16 bit patterns) on bf16 dot products: W must come from
  // a bf16-valued LUT (as decode_bf16's); products are exact, sums fp32. Only avx512bf16_kernels().
  void (*gemv_bf16)(const CodeRows& w, const uint16_t* x, int64_t M, int64_t r0, int64_t r1, float* y) = nullptr;

  bool supports(int64_t group_size) const { return group_size % width == 0; }
};

// The kernels of each instruction set, nullptr where this CPU (or build) lacks it: AVX2 + FMA,
// and AVX-512F (whose check also confirms that the OS saves the zmm registers).
const VectorKernels* avx2_kernels();
const VectorKernels* avx512_kernels();
// The fused pass for bf16 models on AVX512-BF16 (vdpbf16ps: 32 weights x tokens per instruction,
// twice the fp32 FMA's 16): only `gemv_bf16` is set, width 32.
const VectorKernels* avx512bf16_kernels();

}  // namespace spallm::cpu
