// The canonical packed layout of SpaLLM codes, shared by host and device code. No torch here.
//
// A sketched weight W (N x K, N = out_features, K = in_features) keeps one b-bit code per weight.
// Codes are stored row-major, one row of W after another, each row packed into row_bytes bytes:
//
//   b = 4: two codes per byte, the HIGH nibble holds the even column. Byte-for-byte the official
//          SketchTune layout ([N, G, K/(2G)] uint8 is the same memory as [N, K/2]).
//   b = 2: four codes per byte, most significant pair first (column 4i at bits 7..6).
//   b = 3: bit planes over chunks of 8 columns: 3 bytes per chunk, byte p holds bit p of the eight
//          codes, column 8i+j at bit 7-j. A whole chunk decodes from three byte loads with shifts,
//          which is what a kernel wants, and 3 bits per weight are really 3 bits.
//
// Every layout is MSB-first: the lower column index sits in the higher bits. A row of K codes
// therefore needs K to be a multiple of the packing unit (2, 4 or 8 columns), see pack_unit().
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPALLM_HD __host__ __device__ __forceinline__
#else
#define SPALLM_HD inline
#endif

namespace spallm {

// Columns per packing unit: the in_features of a b-bit sketch must be a multiple of this.
SPALLM_HD constexpr int pack_unit(int bits) { return bits == 3 ? 8 : 8 / bits; }

// Bytes per packed row of in_features codes (in_features a multiple of pack_unit(bits)).
SPALLM_HD constexpr int64_t packed_row_bytes(int64_t in_features, int bits) {
  return bits == 3 ? in_features / 8 * 3 : in_features * bits / 8;
}

// Inverse of packed_row_bytes.
SPALLM_HD constexpr int64_t unpacked_row_len(int64_t row_bytes, int bits) {
  return bits == 3 ? row_bytes / 3 * 8 : row_bytes * 8 / bits;
}

// Code of column c of a packed row whose bytes come from `byte(i)`. The bit layout lives here
// once; code_at reads bytes from memory, and the CUDA kernels read them from code words already
// in registers (RegisterBytes below), where constant column indices fold into shifts and masks.
template <int BITS, typename Bytes>
SPALLM_HD int code_from(const Bytes& byte, int64_t c) {
  if constexpr (BITS == 4) {
    return (byte(c >> 1) >> ((~c & 1) << 2)) & 0xF;
  } else if constexpr (BITS == 2) {
    return (byte(c >> 2) >> ((3 - (c & 3)) << 1)) & 0x3;
  } else {
    static_assert(BITS == 3, "bits must be 2, 3 or 4");
    const int64_t chunk = (c >> 3) * 3;
    const int s = 7 - static_cast<int>(c & 7);
    return ((byte(chunk) >> s) & 1) | (((byte(chunk + 1) >> s) & 1) << 1) | (((byte(chunk + 2) >> s) & 1) << 2);
  }
}

struct MemoryBytes {
  const uint8_t* p;
  SPALLM_HD uint32_t operator()(int64_t i) const { return p[i]; }
};

// Bytes of little-endian 32-bit words (byte i is bits 8*(i%4).. of word i/4), as loaded by a
// kernel's vector loads of a packed row.
struct RegisterBytes {
  const uint32_t* w;
  SPALLM_HD uint32_t operator()(int64_t i) const { return (w[i >> 2] >> ((i & 3) << 3)) & 0xFF; }
};

// Code of column c in one packed row. BITS is a template argument so the hot loops of the
// kernels compile to straight shifts and masks.
template <int BITS>
SPALLM_HD int code_at(const uint8_t* row, int64_t c) {
  return code_from<BITS>(MemoryBytes{row}, c);
}

}  // namespace spallm

// Call F.template operator()<B>() with B the compile-time twin of a runtime bit width.
#define SPALLM_DISPATCH_BITS(bits, ...)                    \
  [&] {                                                    \
    switch (bits) {                                        \
      case 2: { constexpr int BITS = 2; return __VA_ARGS__(); } \
      case 3: { constexpr int BITS = 3; return __VA_ARGS__(); } \
      default: { constexpr int BITS = 4; return __VA_ARGS__(); } \
    }                                                      \
  }()
