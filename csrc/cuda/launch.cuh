// Host-side launch helpers shared by the kernel files.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace spallm::cuda {

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared-memory bytes of a kernel whose layout is LAYOUT<BITS, block_m> (a struct with kBytes), for
// a run-time block_m in {16, 32, 64, 128}; -1 for any other.
template <template <int, int> class LAYOUT, int BITS>
int smem_bytes_for(int block_m) {
  switch (block_m) {
    case 16: return LAYOUT<BITS, 16>::kBytes;
    case 32: return LAYOUT<BITS, 32>::kBytes;
    case 64: return LAYOUT<BITS, 64>::kBytes;
    case 128: return LAYOUT<BITS, 128>::kBytes;
    default: return -1;
  }
}

// Kernels using more than 48 KB of dynamic shared memory must opt in, once per device. The flag
// word is per kernel instantiation (KernelTag); devices 0..63 are remembered, others ask each time.
template <typename KernelTag, typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<uint64_t> done{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit);
  return err;
}

}  // namespace spallm::cuda
