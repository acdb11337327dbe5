// Kernels that break CUDA's rules on purpose, one rule each, so that tests/test_cuda_emulated.py can
// check that the emulator exposes what a GPU would only show intermittently. Built with the
// kernels of csrc/cuda/ (same rewrites, same headers).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma.cuh"

namespace {

// Thread 0 stores a value that the other 63 threads read with no __syncthreads in between.
__global__ void missing_barrier_kernel(float* out) {
  extern __shared__ __align__(16) float shared_value[];
  if (threadIdx.x == 0) shared_value[0] = 1.f;
  out[threadIdx.x] = shared_value[0];
}

// Every thread copies 16 bytes with cp.async and reads them back without waiting for the copy.
__global__ void missing_wait_kernel(const float* in, float* out) {
  extern __shared__ __align__(16) float staged[];
  spallm::cuda::cp_async<16>(staged + 4 * threadIdx.x, in + 4 * threadIdx.x, true);
  spallm::cuda::cp_async_commit();
  out[threadIdx.x] = staged[4 * threadIdx.x];
}

}  // namespace

// which = 0: missing barrier, 1: missing cp.async wait; 64 threads, out[64], in[256].
cudaError_t simt_selftest(int which, const float* in, float* out) {
  if (which == 0) {
    missing_barrier_kernel<<<1, 64, 16, nullptr>>>(out);
  } else {
    missing_wait_kernel<<<1, 64, 64 * 16, nullptr>>>(in, out);
  }
  return cudaGetLastError();
}
