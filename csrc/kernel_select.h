// Which CUDA (and CPU) kernel the ops use: an override for tests and benchmarks, and a record of the last
// call's choice. Defined by the CUDA backend (csrc/cuda/ops.cpp); CPU-only builds define the same
// functions as no-ops in csrc/registration.cpp. The rules themselves live in csrc/cuda/dispatch.cpp.
#pragma once
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace spallm {

// "auto" (the default), "simple", "mma", "mma_regs", "mma_regs_direct" or "decode_gemm"; false for an unknown
// name. A forced path applies where it supports the problem; elsewhere the automatic choice runs.
bool set_cuda_kernel(const std::string& name);
std::string cuda_kernel();
// "<path> [block_m=.. splits=..] [t=on-chip|t=gemm] (<reason>)" of the last lut_linear /
// lut_linear_dx / lut_linear_lowrank on this thread.
std::string last_cuda_plan();
// How the fused lut_linear_lowrank gets t = x l1: "auto" (on chip, in extra blocks of the LUT GEMM,
// whenever the call splits K with token tiles of at most 64; else a skinny GEMM first) or "gemm"
// (always the skinny GEMM: the comparison the benchmark makes). False for an unknown name.
bool set_lowrank_t(const std::string& mode);
std::string lowrank_t();

// The CPU path (csrc/cpu/lut_ops_cpu.cpp): "auto" (the widest vector kernels the CPU has, AVX-512
// or AVX2 + FMA, else the portable ones; bf16 tiles for bf16 activations, forward and backward,
// where the CPU multiplies bf16 natively), "portable" (scalar decode + BLAS), "avx2" (the AVX2
// kernels even on an AVX-512 CPU, fp32 work only), "avx512" (the AVX-512 kernels where the group
// size allows, fp32 work only) or "bf16" (as "auto", with the bf16 tiles on any AVX2 CPU). False
// for an unknown name or a path this CPU lacks. cpu_kernels() lists what this CPU can run.
bool set_cpu_kernel(const std::string& name);
std::string cpu_kernel();
std::vector<std::string> cpu_kernels();
// "avx512_gemv", "avx512_tiles", "avx2_gemv", "avx2_tiles", "bf16_tiles" or "portable_tiles":
// what the last CPU lut_linear / lut_linear_dx / lut_grad on this thread ran ("none" before the first).
std::string last_cpu_plan();

// The token counts at which the automatic choice changes path, as (name, current value, built-in
// value, lowest, highest setting): the CUDA rules' (csrc/cuda/thresholds.h; a CPU-only build lists
// the built-in values and sets nothing) and the CPU rules' (csrc/cpu/lut_ops_cpu.cpp; their built-in
// values are those of the widest vector kernels this CPU has). set_*_threshold: value -1 restores
// the built-in value; "" on success, else why not ("unknown threshold", "value out of range", ...).
// Tuning files (spallm_ext/tuning.py) are sets of these.
using ThresholdRow = std::tuple<std::string, int64_t, int64_t, int64_t, int64_t>;
std::vector<ThresholdRow> cuda_thresholds();
std::string set_cuda_threshold(const std::string& name, int64_t value);
std::vector<ThresholdRow> cpu_thresholds();
std::string set_cpu_threshold(const std::string& name, int64_t value);

}  // namespace spallm
