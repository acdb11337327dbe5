// The fused CPU pass of csrc/cpu/lut_vec.h for bf16 models, on AVX512-BF16 dot products. The
// decode is lut_avx512.cpp's (sixteen codes per vpermps, fp32 lanes); two decodes make a step of
// 32 columns, packed into bf16 pairs (vcvtne2ps2bf16: exact for a bf16 LUT, round to nearest even
// for an fp32 one, so W is rounded to bf16 once, as lut.to(bf16) does), and
// one vdpbf16ps per token then multiplies the 32 weights with the token's 32 bf16 values and adds
// the pairs into 16 fp32 lanes. Per weight and token that is half the instructions of the fp32 FMA
// pass, the tokens are read as bf16 (half the bytes) and never converted to fp32 first.
#include "cpu/lut_simd.h"

#if defined(__x86_64__) && ((defined(__GNUC__) && __GNUC__ >= 10) || defined(__clang__))
#define SPALLM_AVX512BF16_KERNELS 1
#include <immintrin.h>
#endif

namespace spallm::cpu {

#ifdef SPALLM_AVX512BF16_KERNELS

namespace {

#define SPALLM_VEC_FN __attribute__((target("avx512f,avx512bf16,avx2,fma")))
#include "cpu/lut_vec.h"

#include "cpu/lut_avx512.h"

struct Avx512Bf16 : Avx512 {
  static constexpr int kWidth = 32;
  // As Avx512: eight tokens share a step's decode, two rows every x load (16 fp32 accumulators).
  static constexpr int kBlock = 8;
  static constexpr int kRows = 2;
  using XElem = uint16_t;
  using WReg = __m512bh;

  // Columns 0..15 and 16..31 of the step from two lookups; vcvtne2ps2bf16 puts its second operand
  // in the low half, so the pairs are (column 2i, 2i + 1), as in the tokens' own memory order.
  template <int BITS>
  static SPALLM_VEC_FN __m512bh weights(__m512 t, const uint8_t* chunk) {
    const __m512 lo = lookup<BITS>(t, codes<BITS>(chunk));
    const __m512 hi = lookup<BITS>(t, codes<BITS>(chunk + 2 * BITS));
    return _mm512_cvtne2ps_pbh(hi, lo);
  }
  static SPALLM_VEC_FN __m512bh load_x(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  // acc[i] += w[2i] x[2i] + w[2i+1] x[2i+1]: bf16 products are exact in fp32.
  static SPALLM_VEC_FN __m512 fmadd(__m512bh w, __m512bh x, __m512 acc) { return _mm512_dpbf16_ps(acc, w, x); }
};

}  // namespace

const VectorKernels* avx512bf16_kernels() {
  static const VectorKernels k = [] {
    VectorKernels v;
    v.name = "avx512bf16";
    v.width = Avx512Bf16::kWidth;
    v.gemv_bf16 = [](const CodeRows& w, const uint16_t* x, int64_t M, int64_t r0, int64_t r1, float* y) {
      dispatch_bits(w.bits, [&](auto b) { gemv_rows<Avx512Bf16, decltype(b)::value>(w, x, M, r0, r1, y); });
    };
    return v;
  }();
  return native_bf16_available() ? &k : nullptr;
}

#else  // no AVX512-BF16 kernels in this build

const VectorKernels* avx512bf16_kernels() { return nullptr; }

#endif

}  // namespace spallm::cpu
