// The one list of spallm op schemas, and the Python module `spallm_ext._C` that carries them.
// Kernels register per backend elsewhere: csrc/cpu/lut_ops_cpu.cpp (CPU), csrc/cuda/ops.cpp (CUDA),
// csrc/lowrank.cpp (lut_linear_lowrank on both, until a fused CUDA kernel takes over).
// Fake (meta) and autograd registrations live in python/spallm_ext/ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>

#include "cpu/lut_simd.h"
#include "cuda/thresholds.h"
#include "kernel_select.h"

TORCH_LIBRARY(spallm, m) {
  // y = x W^T (+ bias), W[r, c] = lut[r, c / (K/G), code[r, c]]; x: [..., K] -> y: [..., N].
  // With adapter_index (one int per token), lut is a stack [A, N, G, 2^b] of adapters sharing the
  // codes and token m uses lut[adapter_index[m]].
  m.def("lut_linear(Tensor x, Tensor codes, Tensor lut, Tensor? bias=None, Tensor? adapter_index=None) -> Tensor");
  // dx = dy W; dy: [..., N] -> dx: [..., K]. adapter_index as in lut_linear.
  m.def("lut_linear_dx(Tensor dy, Tensor codes, Tensor lut, Tensor? adapter_index=None) -> Tensor");
  // dlut[r, g, k] = sum over columns c of group g with code k of (dy^T x)[r, c], fp32 (fp64 for
  // fp64 inputs). groups_per_row and num_entries fix the LUT shape, which the codes alone don't.
  // With adapter_index, dlut is [num_adapters, N, G, 2^b] and each token's part goes to its adapter.
  // deterministic=True forbids float atomics (bit-identical results run to run); kernels that are
  // deterministic anyway ignore it. ops.py sets it from torch.are_deterministic_algorithms_enabled().
  m.def("lut_grad(Tensor dy, Tensor x, Tensor codes, int groups_per_row, int num_entries, "
        "Tensor? adapter_index=None, int num_adapters=0, bool deterministic=False) -> Tensor");
  // Dense W [N, K] in the LUT's dtype (export, merge, debugging).
  m.def("lut_decode(Tensor codes, Tensor lut) -> Tensor");
  // y = x W^T + (x l1) l2 (+ bias): the sketch plus a low-rank branch (SVDQuant / EoRA / LoRA).
  // l1 [K, rank], l2 [rank, N], one dtype for both (fp32 master copy, bf16 or fp16; fp64 on CPU),
  // independent of x's; bias in x's dtype. fp32 accumulation, one rounding to x's dtype.
  // Backend-independent version and conventions: csrc/lowrank.{h,cpp}.
  m.def("lut_linear_lowrank(Tensor x, Tensor codes, Tensor lut, Tensor l1, Tensor l2, Tensor? bias=None) -> Tensor");
}

#ifndef SPALLM_WITH_CUDA
// CPU-only build: there is no kernel to choose (csrc/kernel_select.h).
namespace spallm {
bool set_cuda_kernel(const std::string& name) {
  return name == "auto" || name == "simple" || name == "mma" || name == "decode_gemm" || name == "mma_regs" ||
         name == "mma_regs_direct";
}
std::string cuda_kernel() { return "auto"; }
std::string last_cuda_plan() { return "none (no CUDA in this build)"; }
bool set_lowrank_t(const std::string& mode) { return mode == "auto" || mode == "gemm"; }
std::string lowrank_t() { return "auto"; }
std::vector<ThresholdRow> cuda_thresholds() {
  std::vector<ThresholdRow> rows;
  for (const cuda::ThresholdSpec& s : cuda::kThresholdSpecs) rows.emplace_back(s.name, s.builtin, s.builtin, s.lo, s.hi);
  return rows;
}
std::string set_cuda_threshold(const std::string&, int64_t) { return "no CUDA in this build"; }
}  // namespace spallm
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "spallm_ext native library: registers the torch.ops.spallm operators";
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = std::string(SPALLM_TORCH_VERSION);
    d["compiler"] = std::string(SPALLM_CXX_COMPILER);
#ifdef SPALLM_WITH_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef SPALLM_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = std::string(SPALLM_CUDA_ARCHS);
    d["cuda_compiler"] = std::string(SPALLM_CUDA_COMPILER);
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::string();
    d["cuda_compiler"] = std::string();
#endif
    // The widest vector kernels this CPU runs (csrc/cpu/lut_simd.h): "avx512", "avx2+fma" or "none".
    d["cpu_simd"] = std::string(spallm::cpu::avx512_kernels() != nullptr ? "avx512"
                                : spallm::cpu::avx2_kernels() != nullptr  ? "avx2+fma"
                                                                          : "none");
    // Whether the CPU multiplies bf16 natively (AVX512-BF16): "auto" then runs bf16 models' larger
    // batches as bf16 tiles (kernels.set_cpu_kernel).
    d["cpu_bf16"] = spallm::cpu::native_bf16_available();
    return d;
  });
  m.def("set_cuda_kernel", &spallm::set_cuda_kernel,
        "Force the CUDA forward path: 'auto', 'simple', 'mma', 'mma_regs', 'mma_regs_direct' or 'decode_gemm'; "
        "False if unknown");
  m.def("cuda_kernel", &spallm::cuda_kernel, "The forced CUDA path ('auto' when none)");
  m.def("last_cuda_plan", &spallm::last_cuda_plan, "What the last CUDA lut_linear / lut_linear_dx ran");
  m.def("set_lowrank_t", &spallm::set_lowrank_t,
        "How fused lut_linear_lowrank computes x l1: 'auto' (on chip when K is split) or 'gemm'; False if unknown");
  m.def("lowrank_t", &spallm::lowrank_t, "The lut_linear_lowrank t mode ('auto' or 'gemm')");
  m.def("set_cpu_kernel", &spallm::set_cpu_kernel,
        "Force the CPU path: 'auto', 'portable', 'avx2', 'avx512' or 'bf16'; False if unknown or not on this CPU");
  m.def("cpu_kernel", &spallm::cpu_kernel, "The forced CPU path ('auto' when none)");
  m.def("cpu_kernels", &spallm::cpu_kernels, "The CPU paths this machine can run");
  m.def("last_cpu_plan", &spallm::last_cpu_plan, "What the last CPU lut_linear / lut_linear_dx ran");
  m.def("cuda_thresholds", &spallm::cuda_thresholds,
        "The CUDA dispatch thresholds: (name, value, built-in value, lowest, highest)");
  m.def("set_cuda_threshold", &spallm::set_cuda_threshold,
        "Set a CUDA dispatch threshold (-1: built-in value); '' or why not");
  m.def("cpu_thresholds", &spallm::cpu_thresholds,
        "The CPU dispatch thresholds: (name, value, built-in value, lowest, highest)");
  m.def("set_cpu_threshold", &spallm::set_cpu_threshold,
        "Set a CPU dispatch threshold (-1: built-in value); '' or why not");
}
