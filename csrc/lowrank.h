// spallm.lut_linear_lowrank: a sketched weight plus a low-rank branch (SVDQuant / EoRA / LoRA style),
//   y = x W^T + (x l1) l2 (+ bias),   W[r, c] = lut[r, c / (K/G), code[r, c]]
// x [..., K]; codes/lut as in lut_linear; l1 [K, rank]; l2 [rank, N]; bias [N] in x's dtype.
//
// l1 and l2 share one dtype, chosen independently of x like the LUT's: fp32 (the master copy that
// trains, the default of LowRankSketchedLinear), bf16 or fp16; fp64 only on CPU (gradcheck).
// Accumulation is fp32 (fp64 for fp64 x) and the result is rounded to x's dtype once, at the end.
// Smoothing scales (SVDQuant's outlier migration) are folded into l1 and the sketched residual at
// conversion time (python/spallm_ext/lowrank.py), so no kernel ever sees them.
//
// csrc/lowrank.cpp holds the backend-independent version (lut_linear through the dispatcher, then
// two GEMMs), registered for CPU. The CUDA registration (csrc/cuda/ops.cpp) fuses the branch into
// the mma kernel's epilogue, validates with check_lut_linear_lowrank below so both backends raise
// the same errors, and falls back to lut_linear_lowrank_composite for calls it does not cover.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace spallm {

// Validates every argument (TypeError for dtypes, ValueError for shapes and rank, RuntimeError for
// devices, each naming the argument) and returns the sketch's shape; the rank is l1.size(1).
LutShape check_lut_linear_lowrank(const char* op, const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& lut, const at::Tensor& l1, const at::Tensor& l2,
                                  const std::optional<at::Tensor>& bias);

// The unfused computation: spallm::lut_linear (whatever kernel the backend registers), then
// y += (x l1) l2 with at::mm, all in the accumulation dtype. Works on any backend.
at::Tensor lut_linear_lowrank_composite(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                                        const at::Tensor& l1, const at::Tensor& l2,
                                        const std::optional<at::Tensor>& bias);

}  // namespace spallm
