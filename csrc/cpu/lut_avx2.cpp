// AVX2 + FMA instantiation of the vector kernels (csrc/cpu/lut_vec.h). Every function that uses a
// vector instruction carries the target attribute itself (nothing in this file is compiled with
// -mavx2), so the rest of the library, and any inline function it shares with this file, stays
// runnable on any x86-64.
#include "cpu/lut_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPALLM_AVX2_KERNELS 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace spallm::cpu {

#ifdef SPALLM_AVX2_KERNELS

bool avx2_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool native_bf16_available() {
  // AVX512-BF16 is CPUID leaf 7, sub-leaf 1, EAX bit 5 (read directly: __builtin_cpu_supports
  // knows "avx512bf16" only from GCC 11 on); "avx512f" also confirms the OS saves the zmm state.
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return avx2_available() && __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
           (eax & (1u << 5)) != 0;
  }();
  return ok;
}

namespace {

#define SPALLM_VEC_FN __attribute__((target("avx2,fma")))
#include "cpu/lut_vec.h"

// Eight codes per step, one per 32-bit lane of a ymm register.
struct Avx2 {
  static constexpr int kWidth = 8;
  // Four tokens share a decode: 4 accumulators + 2 table registers + temporaries fit the 16 ymm.
  static constexpr int kBlock = 4;
  static constexpr int kRows = 1;
  using Reg = __m256;

  // Entries 0..7 in `lo`, 8..15 in `hi` (4-bit only).
  struct Pair {
    __m256 lo, hi;
  };
  template <int BITS>
  using Table = Pair;

  template <int BITS>
  static SPALLM_VEC_FN Pair table(const float* t) {
    Pair r;
    if constexpr (BITS == 2) {
      r.lo = _mm256_castps128_ps256(_mm_loadu_ps(t));  // four entries: the upper lanes are never indexed
    } else {
      r.lo = _mm256_loadu_ps(t);
    }
    r.hi = BITS == 4 ? _mm256_loadu_ps(t + 8) : r.lo;
    return r;
  }

  // The chunk's word in every lane; lane j shifts its own code down (csrc/codes.h has the layouts):
  //   4 bits: column j in byte j/2, high nibble first      -> shift 8 (j/2) + 4 (1 - j%2)
  //   2 bits: column j in byte j/4, most significant first -> shift 8 (j/4) + 2 (3 - j%4)
  //   3 bits: bit p of column j is bit 7-j of byte p: shifting by 7 - j brings the three bits to
  //           positions 0, 8 and 16, which two more shifts fold into 0, 1 and 2.
  template <int BITS>
  static SPALLM_VEC_FN __m256i codes(const uint8_t* chunk) {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(chunk_word<BITS>(chunk)));
    if constexpr (BITS == 4) {
      return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)),
                              _mm256_set1_epi32(0xF));
    } else if constexpr (BITS == 2) {
      return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(6, 4, 2, 0, 14, 12, 10, 8)),
                              _mm256_set1_epi32(0x3));
    } else {
      const __m256i t = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)),
                                         _mm256_set1_epi32(0x10101));
      const __m256i folded = _mm256_or_si256(t, _mm256_or_si256(_mm256_srli_epi32(t, 7), _mm256_srli_epi32(t, 14)));
      return _mm256_and_si256(folded, _mm256_set1_epi32(0x7));
    }
  }

  // vpermps reads the low three bits of each index; for 16 entries both halves are looked up and
  // bit 3, shifted into the sign bit, picks one.
  template <int BITS>
  static SPALLM_VEC_FN __m256 lookup(const Pair& t, __m256i idx) {
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
    if constexpr (BITS == 4) {
      const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return lo;
    }
  }

  // The fused pass (lut_vec.h GemvBlock): fp32 tokens, one step's weights straight from a lookup.
  using XElem = float;
  using WReg = __m256;
  template <int BITS>
  static SPALLM_VEC_FN __m256 weights(const Pair& t, const uint8_t* chunk) { return lookup<BITS>(t, codes<BITS>(chunk)); }
  static SPALLM_VEC_FN __m256 load_x(const float* p) { return _mm256_loadu_ps(p); }

  static SPALLM_VEC_FN __m256 zero() { return _mm256_setzero_ps(); }
  static SPALLM_VEC_FN __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static SPALLM_VEC_FN __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static SPALLM_VEC_FN __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static SPALLM_VEC_FN float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static SPALLM_VEC_FN void store(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
  // The high halves of the fp32 words as bf16 (vpackusdw packs within 128-bit lanes, so a
  // cross-lane permute restores column order).
  static SPALLM_VEC_FN void store(uint16_t* out, __m256 v) {
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  }
};

}  // namespace

const VectorKernels* avx2_kernels() {
  static const VectorKernels k = vector_kernels<Avx2>("avx2");
  return avx2_available() ? &k : nullptr;
}

#else  // no vector kernels in this build

bool avx2_available() { return false; }
bool native_bf16_available() { return false; }
const VectorKernels* avx2_kernels() { return nullptr; }

#endif

}  // namespace spallm::cpu
