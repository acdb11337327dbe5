// AVX-512 instantiation of the vector kernels (csrc/cpu/lut_vec.h): sixteen codes per step, and
// every (row, group) table, up to 16 fp32 entries, in one zmm register, so a lookup is one vpermps
// (AVX2 needs two and a blend for 4-bit tables). Only AVX-512F instructions are used. As in
// lut_avx2.cpp, each function carries its target attribute and the file is not compiled with
// -mavx512f, so nothing here leaks into code that older CPUs run.
#include "cpu/lut_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPALLM_AVX512_KERNELS 1
#include <immintrin.h>
#endif

namespace spallm::cpu {

#ifdef SPALLM_AVX512_KERNELS

namespace {

#define SPALLM_VEC_FN __attribute__((target("avx512f,avx2,fma")))
#include "cpu/lut_vec.h"

#include "cpu/lut_avx512.h"

}  // namespace

const VectorKernels* avx512_kernels() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("fma");
  static const VectorKernels k = vector_kernels<Avx512>("avx512");
  return ok ? &k : nullptr;
}

#else  // no vector kernels in this build

const VectorKernels* avx512_kernels() { return nullptr; }

#endif

}  // namespace spallm::cpu
