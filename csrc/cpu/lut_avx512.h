// The AVX-512 instruction set of the CPU vector kernels (the V of csrc/cpu/lut_vec.h), shared by
// lut_avx512.cpp (AVX-512F) and lut_avx512bf16.cpp (its bf16 dot-product variant). Like lut_vec.h
// it is included inside each file's anonymous namespace after SPALLM_VEC_FN, so every function
// carries that file's target attribute; it includes nothing itself (<immintrin.h> comes first).
#pragma once

struct Avx512 {
  static constexpr int kWidth = 16;
  // Eight tokens share a decode and two rows every x load: 16 accumulators, 2 tables and
  // temporaries in the 32 zmm registers.
  static constexpr int kBlock = 8;
  static constexpr int kRows = 2;
  using Reg = __m512;
  template <int BITS>
  using Table = __m512;

  // Entries past 2^BITS are zero and never indexed (codes are below 2^BITS).
  template <int BITS>
  static SPALLM_VEC_FN __m512 table(const float* t) {
    if constexpr (BITS == 2) {
      return _mm512_zextps128_ps512(_mm_loadu_ps(t));
    } else if constexpr (BITS == 3) {
      return _mm512_zextps256_ps512(_mm256_loadu_ps(t));
    } else {
      return _mm512_loadu_ps(t);
    }
  }

  // Sixteen codes are two 8-code chunks: lanes 0-7 hold the first chunk's word, lanes 8-15 the
  // second's (a broadcast and a masked broadcast), then every lane shifts its own code down with
  // the shifts of lut_avx2.cpp (the same for both halves).
  // For 3 bits the six bytes come as two overlapping 4-byte loads (bytes 0-3 and 2-5, never past
  // the chunk): the first word's byte 3 is harmless, the 3-bit shifts below move it no lower than
  // bit 17, which the mask clears.
  template <int BITS>
  static SPALLM_VEC_FN __m512i codes(const uint8_t* chunk) {
    uint32_t first, second;
    if constexpr (BITS == 3) {
      std::memcpy(&first, chunk, 4);
      std::memcpy(&second, chunk + 2, 4);
      second >>= 8;
    } else {
      first = chunk_word<BITS>(chunk);
      second = chunk_word<BITS>(chunk + BITS);
    }
    const __m512i v = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(first)), __mmask16(0xFF00),
                                             static_cast<int>(second));
    if constexpr (BITS == 4) {
      return _mm512_and_si512(
          _mm512_srlv_epi32(v, _mm512_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24, 4, 0, 12, 8, 20, 16, 28, 24)),
          _mm512_set1_epi32(0xF));
    } else if constexpr (BITS == 2) {
      return _mm512_and_si512(
          _mm512_srlv_epi32(v, _mm512_setr_epi32(6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8)),
          _mm512_set1_epi32(0x3));
    } else {
      const __m512i t = _mm512_and_si512(
          _mm512_srlv_epi32(v, _mm512_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0)),
          _mm512_set1_epi32(0x10101));
      const __m512i folded = _mm512_or_si512(t, _mm512_or_si512(_mm512_srli_epi32(t, 7), _mm512_srli_epi32(t, 14)));
      return _mm512_and_si512(folded, _mm512_set1_epi32(0x7));
    }
  }

  template <int BITS>
  static SPALLM_VEC_FN __m512 lookup(__m512 t, __m512i idx) { return _mm512_permutexvar_ps(idx, t); }

  // The fused pass (lut_vec.h GemvBlock): fp32 tokens, one step's weights straight from a lookup.
  using XElem = float;
  using WReg = __m512;
  template <int BITS>
  static SPALLM_VEC_FN __m512 weights(__m512 t, const uint8_t* chunk) { return lookup<BITS>(t, codes<BITS>(chunk)); }
  static SPALLM_VEC_FN __m512 load_x(const float* p) { return _mm512_loadu_ps(p); }

  static SPALLM_VEC_FN __m512 zero() { return _mm512_setzero_ps(); }
  static SPALLM_VEC_FN __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static SPALLM_VEC_FN __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static SPALLM_VEC_FN __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static SPALLM_VEC_FN float hsum(__m512 v) {
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static SPALLM_VEC_FN void store(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
  // The high halves of the fp32 words as bf16: vpmovdw keeps the low 16 bits of each lane.
  static SPALLM_VEC_FN void store(uint16_t* out, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
  }
};

