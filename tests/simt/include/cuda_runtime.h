// Stand-in for the CUDA runtime header when csrc/cuda/ is built for the SIMT emulator (../simt.h):
// the runtime API calls the kernels' host code makes, and the device intrinsics they use.
#pragma once
#include "../simt.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaGetLastError() {
  const int e = simt::last_error;
  simt::last_error = 0;
  return static_cast<cudaError_t>(e);
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > simt::kMaxDynamicSmem) {
    return cudaErrorInvalidValue;
  }
  simt::smem_opt_in[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

inline void __syncthreads() { simt::syncthreads(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  uint32_t bits, out;
  std::memcpy(&bits, &v, 4);
  simt::ShflArgs a{mask, bits, lane_mask, &out};
  simt::collective(simt::Op::Shfl, &a);
  float r;
  std::memcpy(&r, &out, 4);
  return r;
}

// One OS thread runs every fiber, so a read-modify-write is atomic.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}

inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
