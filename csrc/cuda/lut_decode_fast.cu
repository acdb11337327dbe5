// Decode a sketched W into a dense [N, K] matrix at memory speed: the decode half of the
// decode_gemm path (W in the activation dtype, then cuBLAS) and the CUDA lut_decode op.
//
// A block owns one row at a time. The row's LUT (G x 2^BITS values) goes to shared memory as fp32;
// each thread then turns one unit of 8 columns (BITS bytes of codes: one aligned 32-bit word for
// 4-bit, 16-bit for 2-bit, three bytes for 3-bit) into 8 outputs stored with one 16-byte (or two,
// for fp32) vector store. A warp covers 256 consecutive columns, so at most four groups of one row
// meet in a warp's lookups (group size >= 64) and the table reads rarely conflict. The traffic is
// the codes plus the dense output, so for bf16 output ~4.5x the codes' bytes: cheap next to a
// compute-bound GEMM, which is the only place decode_gemm is chosen.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "codes.h"
#include "cuda/decode.cuh"
#include "cuda/dtype.cuh"
#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace spallm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnit = 8;  // columns per thread step

// The BITS bytes of one 8-column unit, as the low bytes of a 32-bit word.
template <int BITS>
__device__ __forceinline__ uint32_t load_unit(const uint8_t* row, int64_t u) {
  if constexpr (BITS == 4) {
    return *reinterpret_cast<const uint32_t*>(row + u * 4);
  } else if constexpr (BITS == 2) {
    return *reinterpret_cast<const uint16_t*>(row + u * 2);
  } else {
    const uint8_t* b = row + u * 3;
    return uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16);
  }
}

template <typename O>
__device__ __forceinline__ void store_unit(O* out, const float (&v)[kUnit]) {
  if constexpr (sizeof(O) == 4) {
    float4* o = reinterpret_cast<float4*>(out);
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *reinterpret_cast<uint4*>(out) =
        make_uint4(pack2<O>(v[0], v[1]), pack2<O>(v[2], v[3]), pack2<O>(v[4], v[5]), pack2<O>(v[6], v[7]));
  }
}

template <int BITS, typename O>
__global__ void __launch_bounds__(kThreads)
lut_decode_fast_kernel(LutProblem p, const uint8_t* __restrict__ codes, const void* __restrict__ lut,
                       DType lut_type, O* __restrict__ w) {
  extern __shared__ float table[];  // this row's LUT: [G][2^BITS]
  constexpr int kEntries = 1 << BITS;
  const int64_t lut_row = p.G * kEntries, units = p.K / kUnit, group_units = p.K / p.G / kUnit;
  for (int64_t r = blockIdx.x; r < p.N; r += gridDim.x) {
    __syncthreads();  // the previous row's lookups are done before its table is replaced
    for (int64_t i = threadIdx.x; i < lut_row; i += kThreads) table[i] = load_float(lut, lut_type, r * lut_row + i);
    __syncthreads();
    const uint8_t* row = codes + r * p.row_bytes;
    O* out = w + r * p.K;
    for (int64_t u = threadIdx.x; u < units; u += kThreads) {
      const uint32_t word[1] = {load_unit<BITS>(row, u)};
      const float* t = table + div_nonneg(u, group_units) * kEntries;
      float v[kUnit];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) v[j] = t[code_from<BITS>(RegisterBytes{word}, j)];
      store_unit(out + u * kUnit, v);
    }
  }
}

}  // namespace

cudaError_t lut_decode_fast(const LutProblem& p, const uint8_t* codes, const void* lut, DType lut_type,
                            void* w, DType out_type, cudaStream_t stream) {
  if (p.bits < 2 || p.bits > 4 || p.G < 1 || p.K % kUnit != 0 || (p.K / p.G) % kUnit != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.N == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.N, int64_t(1) << 20));
  const size_t smem = static_cast<size_t>(p.G << p.bits) * sizeof(float);
  return dispatch_dtype(out_type, [&](auto ot) {
    using O = typename decltype(ot)::type;
    return SPALLM_DISPATCH_BITS(p.bits, [&] {
      lut_decode_fast_kernel<BITS, O><<<blocks, kThreads, smem, stream>>>(p, codes, lut, lut_type,
                                                                          static_cast<O*>(w));
      return cudaGetLastError();
    });
  });
}

}  // namespace spallm::cuda
