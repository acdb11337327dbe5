// Tensor-core and async-copy building blocks for sm_80 and newer: cp.async, ldmatrix, the
// m16n8k16 mma with fp32 accumulators, and the swizzled shared-memory tile they read.
//
// Fragment layouts of mma.sync.m16n8k16 (row.col), for lane = 4 * g + t:
//   A (16 x 16, row-major)   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                            a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, given as B^T) b[0] = B^T[g][2t, 2t+1]    b[1] = B^T[g][2t+8, 2t+9]
//   C (16 x 8, fp32)         c[0..1] = C[g][2t, 2t+1]   c[2..3] = C[g+8][2t, 2t+1]
// Two 16-bit values share a register, the lower column in the low half. ldmatrix hands every lane
// exactly these pairs when it is pointed at row-major 8 x 8 tiles, so tiles are stored row-major
// with 16 contiguous bytes per (row, 8 columns) and no register shuffles are needed.
//
// Built for tests/simt (SPALLM_SIMT_EMULATOR: the kernels run on the CPU), each instruction below
// becomes the emulator's model of it instead of inline PTX.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace spallm::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asynchronous global -> shared copy of BYTES (4, 8 or 16). With valid == false nothing is read and
// the destination is zero-filled, which is how tiles hang over the edge of a matrix; `src` must
// still be a mapped address then (callers pass the tensor's base).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  const int src_bytes = valid ? BYTES : 0;
#if defined(SPALLM_SIMT_EMULATOR)
  simt::cp_async(dst, src, BYTES, src_bytes);
#else
  if constexpr (BYTES == 16) {
    // .cg: bypass L1, these tiles are read once per block.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "n"(BYTES), "r"(src_bytes));
  }
#endif
}

// A global load of data read exactly once (streamed codes): through the read-only path with
// L1::no_allocate, so a stream of codes does not push the LUT values and x out of L1. `T` is
// uint32_t or uint2 (4 or 8 bytes, naturally aligned).
template <typename T>
__device__ __forceinline__ T ldg_stream(const T* p) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte streaming loads");
#if defined(SPALLM_SIMT_EMULATOR)
  return *p;
#else
  if constexpr (sizeof(T) == 4) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return reinterpret_cast<const T&>(v);
  } else {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return reinterpret_cast<const T&>(v);
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// Transposing variant: the 8 x 8 tiles are stored column-major (rows of memory are the fragment's
// columns), as when the operand's contraction index is the slow one in memory.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// d += a * b on the tensor cores, fp32 accumulate; T is the 16-bit input type.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::mma_16816(d, a, b, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::mma_16816(d, a, b, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// A shared-memory load / store that the SIMT emulator accounts for: tests/simt counts, per warp
// access, the bank wavefronts it needs against the conflict-free minimum, so the decode's claims of
// conflict-free lookups and stores are checked without a GPU. On the GPU: the plain access.
template <typename T>
__device__ __forceinline__ T smem_load(const T* p, const char* site) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::smem_access(site, p, sizeof(T));
#endif
  (void)site;
  return *p;
}

// smem_load for a load only some lanes make: the others take T{} and cost no bank access.
template <typename T>
__device__ __forceinline__ T smem_load_if(bool pred, const T* p, const char* site) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::smem_access(site, p, pred ? static_cast<int>(sizeof(T)) : 0);
#endif
  (void)site;
  return pred ? *p : T{};
}

template <typename T>
__device__ __forceinline__ void smem_store(T* p, const T& v, const char* site) {
#if defined(SPALLM_SIMT_EMULATOR)
  simt::smem_access(site, p, sizeof(T));
#endif
  (void)site;
  *p = v;
}

// A shared-memory tile of 16-bit values, UNITS x 16 bytes per row (8 values per unit), with unit u
// of row r stored at position u ^ (r % 8). Eight consecutive rows then spread one unit index over
// all 32 banks, so per-row 16-byte stores (one row per lane) and ldmatrix's 8-row reads (plain or
// transposed) are conflict-free for any row length that is a multiple of 128 bytes.
template <int UNITS>
struct SwizzledTile {
  static_assert(UNITS % 8 == 0, "rows of a multiple of 128 bytes");
  static constexpr int kRowBytes = UNITS * 16;
  static constexpr int kUnits = UNITS;
  uint8_t* base;

  __device__ __forceinline__ void* unit(int row, int u) const {
    return base + row * kRowBytes + ((u ^ (row & 7)) << 4);
  }
  // Address for ldmatrix: the 16 bytes holding columns col..col+7 of `row` (col a multiple of 8).
  __device__ __forceinline__ const void* at(int row, int col) const { return unit(row, col >> 3); }
};

using SwizzledTile64 = SwizzledTile<8>;    // 64 values per row
using SwizzledTile128 = SwizzledTile<16>;  // 128 values per row

}  // namespace spallm::cuda
