// Stand-in for cuda_fp16.h in the SIMT emulator build: storage types and round-to-nearest-even
// conversions (through the compiler's _Float16, IEEE binary16).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half lo, hi;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
