// AVX2 + FMA kernels of lut_simd.h. Every function that uses a vector instruction carries the
// target attribute itself (nothing in this file is compiled with -mavx2), so the rest of the
// library, and any inline function it shares with this file, stays runnable on any x86-64.
#include "cpu/lut_simd.h"

#include <cstring>
#include <type_traits>

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

#define SPALLM_AVX2 __attribute__((target("avx2,fma"))) inline

// The eight codes of columns 8q .. 8q + 7 of a packed row, one per 32-bit lane. They sit in the
// BITS bytes from byte BITS * q on, read here as one little-endian integer (byte i at bits 8i..),
// so lane j needs only its own right shift and a mask (csrc/codes.h has the layouts):
//   4 bits: column j in byte j/2, high nibble first      -> shift 8 (j/2) + 4 (1 - j%2)
//   2 bits: column j in byte j/4, most significant first -> shift 8 (j/4) + 2 (3 - j%4)
//   3 bits: bit p of column j is bit 7-j of byte p: shifting by 7 - j brings the three bits to
//           positions 0, 8 and 16, which two more shifts fold into 0, 1 and 2.
template <int BITS>
SPALLM_AVX2 __m256i codes8(const uint8_t* chunk) {
  // Three bytes are assembled by hand: a 3-byte memcpy can stay a library call per chunk.
  uint32_t word;
  if constexpr (BITS == 3) {
    word = uint32_t(chunk[0]) | uint32_t(chunk[1]) << 8 | uint32_t(chunk[2]) << 16;
  } else if constexpr (BITS == 2) {
    uint16_t half;
    std::memcpy(&half, chunk, 2);
    word = half;
  } else {
    std::memcpy(&word, chunk, 4);
  }
  const __m256i v = _mm256_set1_epi32(static_cast<int>(word));
  if constexpr (BITS == 4) {
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)),
                            _mm256_set1_epi32(0xF));
  } else if constexpr (BITS == 2) {
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(6, 4, 2, 0, 14, 12, 10, 8)),
                            _mm256_set1_epi32(0x3));
  } else {
    static_assert(BITS == 3, "bits must be 2, 3 or 4");
    const __m256i t = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)),
                                       _mm256_set1_epi32(0x10101));
    const __m256i folded = _mm256_or_si256(t, _mm256_or_si256(_mm256_srli_epi32(t, 7), _mm256_srli_epi32(t, 14)));
    return _mm256_and_si256(folded, _mm256_set1_epi32(0x7));
  }
}

// One (row, group) table in registers: entries 0..7 in `lo`, 8..15 in `hi` (4-bit only).
template <int BITS>
struct Table {
  __m256 lo, hi;
};

template <int BITS>
SPALLM_AVX2 Table<BITS> load_table(const float* t) {
  Table<BITS> r;
  if constexpr (BITS == 2) {
    // Four entries: the upper lanes are never indexed.
    r.lo = _mm256_castps128_ps256(_mm_loadu_ps(t));
  } else {
    r.lo = _mm256_loadu_ps(t);
  }
  r.hi = BITS == 4 ? _mm256_loadu_ps(t + 8) : r.lo;
  return r;
}

// Weights of eight codes. vpermps reads the low three bits of each index; for 16 entries both
// halves are looked up and bit 3, shifted into the sign bit, picks one.
template <int BITS>
SPALLM_AVX2 __m256 lookup8(const Table<BITS>& t, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
  if constexpr (BITS == 4) {
    const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    return lo;
  }
}

SPALLM_AVX2 float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// Eight decoded weights to memory: fp32 as they are, or the high halves of the fp32 words as bf16
// (exact for values that came from bf16; vpackusdw packs within 128-bit lanes, so a cross-lane
// permute restores column order).
SPALLM_AVX2 void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }

SPALLM_AVX2 void store8(uint16_t* out, __m256 v) {
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

template <int BITS, typename out_t>
__attribute__((target("avx2,fma"))) void decode_rows(const CodeRows& w, int64_t r0, int64_t r1, out_t* out) {
  const int64_t chunks = w.group_size / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* crow = w.codes + r * w.row_bytes;
    out_t* orow = out + (r - r0) * w.K;
    for (int64_t g = 0; g < w.G; ++g) {
      const Table<BITS> t = load_table<BITS>(w.lut + (r * w.G + g) * w.E);
      const int64_t q0 = g * chunks;
      for (int64_t q = q0; q < q0 + chunks; ++q) {
        store8(orow + 8 * q, lookup8<BITS>(t, codes8<BITS>(crow + BITS * q)));
      }
    }
  }
}

// TB tokens against one row. An FMA waits ~4 cycles for the previous one on its accumulator, so
// each token gets U accumulators taking the chunks in turn (TB * U >= 4 chains in flight); the
// chunks of a group that do not fill a turn go to accumulator 0. Sums are combined in a fixed
// order (u = 0, 1, ..., then across lanes).
template <int BITS, int TB, int U>
__attribute__((target("avx2,fma"))) void gemv_row(const CodeRows& w, const float* x, int64_t r, float* y_col,
                                                   int64_t y_stride) {
  const int64_t chunks = w.group_size / 8;
  const uint8_t* crow = w.codes + r * w.row_bytes;
  __m256 acc[TB][U];
  for (int t = 0; t < TB; ++t) {
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < w.G; ++g) {
    const Table<BITS> table = load_table<BITS>(w.lut + (r * w.G + g) * w.E);
    const int64_t q0 = g * chunks, q_end = q0 + chunks;
    int64_t q = q0;
    for (; q + U <= q_end; q += U) {
      for (int u = 0; u < U; ++u) {
        const __m256 wv = lookup8<BITS>(table, codes8<BITS>(crow + BITS * (q + u)));
        for (int t = 0; t < TB; ++t) acc[t][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * w.K + 8 * (q + u)), acc[t][u]);
      }
    }
    for (; q < q_end; ++q) {
      const __m256 wv = lookup8<BITS>(table, codes8<BITS>(crow + BITS * q));
      for (int t = 0; t < TB; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * w.K + 8 * q), acc[t][0]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    __m256 s = acc[t][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[t][u]);
    y_col[t * y_stride] = hsum(s);
  }
}

template <int BITS>
void gemv_rows(const CodeRows& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y) {
  // Four tokens share a decode (4 accumulators + 2 table registers + temporaries fit the 16 ymm
  // registers); the remaining 1-3 tokens run as a narrower block.
  for (int64_t r = r0; r < r1; ++r) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) gemv_row<BITS, 4, 1>(w, x + m * w.K, r, y + m * w.N + r, w.N);
    switch (M - m) {
      case 3: gemv_row<BITS, 3, 2>(w, x + m * w.K, r, y + m * w.N + r, w.N); break;
      case 2: gemv_row<BITS, 2, 2>(w, x + m * w.K, r, y + m * w.N + r, w.N); break;
      case 1: gemv_row<BITS, 1, 4>(w, x + m * w.K, r, y + m * w.N + r, w.N); break;
      default: break;
    }
  }
}

template <typename F>
void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace

void decode_rows_avx2(const CodeRows& w, int64_t r0, int64_t r1, float* out) {
  dispatch_bits(w.bits, [&](auto b) { decode_rows<decltype(b)::value>(w, r0, r1, out); });
}

void decode_rows_avx2_bf16(const CodeRows& w, int64_t r0, int64_t r1, uint16_t* out) {
  dispatch_bits(w.bits, [&](auto b) { decode_rows<decltype(b)::value>(w, r0, r1, out); });
}

void gemv_rows_avx2(const CodeRows& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y) {
  dispatch_bits(w.bits, [&](auto b) { gemv_rows<decltype(b)::value>(w, x, M, r0, r1, y); });
}

#else  // no AVX2 kernels in this build: callers check avx2_available() first.

bool avx2_available() { return false; }
bool native_bf16_available() { return false; }
void decode_rows_avx2(const CodeRows&, int64_t, int64_t, float*) {}
void decode_rows_avx2_bf16(const CodeRows&, int64_t, int64_t, uint16_t*) {}
void gemv_rows_avx2(const CodeRows&, const float*, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace spallm::cpu
