// Decoding of single weights W[r, c] = lut[r, c / group_size, code[r, c]] on the device.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "codes.h"
#include "cuda/dtype.cuh"
#include "cuda/kernels.h"

namespace spallm::cuda {

// c / d for non-negative 64-bit values. Real shapes fit in 32 bits, where the hardware divides in
// a few instructions; a 64-bit division is a long software routine, so take it only when needed.
__device__ __forceinline__ int64_t div_nonneg(int64_t c, int64_t d) {
  if (((c | d) >> 32) == 0) return static_cast<uint32_t>(c) / static_cast<uint32_t>(d);
  return c / d;
}

// One row of W: its packed codes and its [G, 2^BITS] slice of the LUT. The slice is small and read
// by every column of the row, so its gathers hit L1.
template <int BITS, typename L>
struct LutRow {
  static constexpr int kEntries = 1 << BITS;
  const uint8_t* codes;
  const L* lut;
  int64_t group_size;

  // The LUT value itself, bit for bit (what lut_decode stores).
  __device__ __forceinline__ L raw(int64_t c) const {
    return lut[div_nonneg(c, group_size) * kEntries + code_at<BITS>(codes, c)];
  }
  __device__ __forceinline__ float operator()(int64_t c) const { return to_float(raw(c)); }
};

// The whole sketched weight; row(r) is cheap, so kernels take it inside their loops.
template <int BITS, typename L>
struct LutWeight {
  const uint8_t* codes;
  const L* lut;
  int64_t row_bytes;
  int64_t lut_row;  // LUT entries per row, G * 2^BITS
  int64_t group_size;

  __device__ __forceinline__ LutWeight(const LutProblem& p, const uint8_t* codes_, const L* lut_)
      : codes(codes_),
        lut(lut_),
        row_bytes(p.row_bytes),
        lut_row(p.G << BITS),
        group_size(div_nonneg(p.K, p.G)) {}

  __device__ __forceinline__ LutRow<BITS, L> row(int64_t r) const {
    return {codes + r * row_bytes, lut + r * lut_row, group_size};
  }
};

}  // namespace spallm::cuda
