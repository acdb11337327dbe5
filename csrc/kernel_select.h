// Which CUDA kernel the ops use: an override for tests and benchmarks, and a record of the last
// call's choice. Defined by the CUDA backend (csrc/cuda/ops.cpp); CPU-only builds define the same
// functions as no-ops in csrc/registration.cpp. The rules themselves live in csrc/cuda/dispatch.cpp.
#pragma once
#include <string>

namespace spallm {

// "auto" (the default), "simple", "mma", "mma_regs" or "decode_gemm"; false for an unknown name. A forced path
// applies where it supports the problem; elsewhere the automatic choice runs.
bool set_cuda_kernel(const std::string& name);
std::string cuda_kernel();
// "<path> [block_m=.. splits=..] (<reason>)" of the last lut_linear / lut_linear_dx on this thread.
std::string last_cuda_plan();

}  // namespace spallm
