// Stand-in for cuda_fp16.h in the SIMT emulator build: storage types and IEEE binary16 conversions
// (round to nearest even, subnormals, inf and NaN), written out rather than through the compiler's
// _Float16 so that any C++17 compiler builds the emulator. Checked bit for bit against _Float16 on
// every half value and on every float from 2^-25 to past 65520.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
inline float simt_half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | ((112 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t simt_float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00;
  if (ax >= 0x477FF000u) return sign | 0x7C00;
  if (ax < 0x38800000u) return sign | static_cast<uint16_t>(std::nearbyint(std::fabs(f) * 16777216.0f));
  uint32_t h = (ax >> 13) - (112u << 10);
  const uint32_t rest = ax & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

struct __half {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half lo, hi;
};

inline float __half2float(__half h) { return simt_half_to_float(h.x); }
inline __half __float2half_rn(float f) { return {simt_float_to_half(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
