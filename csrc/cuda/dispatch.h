// Which kernel runs a CUDA lut_linear / lut_linear_dx / lut_decode call: the one place where that
// choice is made (the rules are in dispatch.cpp). Plain C++, no torch; csrc/cuda/ops.cpp asks for
// a plan and carries it out.
//
// Paths:
//   simple       lut_simple.cu: exact for every dtype and shape, CUDA cores, slow at large M.
//   mma          lut_mma.cu: the fused gather-GEMM on tensor cores (bf16 / fp16 activations,
//                sm_80+). Codes tiles are decoded through the LUT in shared memory, never to HBM.
//   mma_regs     lut_mma.cu's small-M variant (M <= 32): each lane decodes its own mma fragments
//                into registers, so the W tile never makes a round trip through shared memory.
//   mma_regs_direct  the same with each lane's codes loaded from global memory straight into
//                registers (no shared-memory code ring); 16-token tiles, M <= 16.
//   decode_gemm  lut_decode_fast.cu decodes W once into a workspace in the activation dtype, then
//                cuBLAS multiplies (the "official SketchTune" strategy, done with a fast decoder).
//                Compute-bound calls (large M) amortize the decode; fp32 gets cuBLAS's fp32 GEMM.
#pragma once
#include <cstdint>

#include "cuda/kernels.h"

namespace spallm::cuda {

enum class Path : int { Auto = 0, Simple = 1, Mma = 2, DecodeGemm = 3, MmaRegs = 4, MmaRegsDirect = 5 };

// The forward tensor-core paths all run lut_linear_mma (MmaConfig tells them apart).
inline bool is_mma(Path p) { return p == Path::Mma || p == Path::MmaRegs || p == Path::MmaRegsDirect; }

const char* path_name(Path p);
// "auto", "simple", "mma", "decode_gemm", "mma_regs", "mma_regs_direct"; false for any other name.
bool path_from_name(const char* name, Path* out);

struct DeviceInfo {
  int sm_count = 1;
  int major = 0;  // compute capability
  int minor = 0;
  int64_t smem_per_block = 0;  // opt-in dynamic shared memory per block; 0: not known, not checked
};

// Everything about a call that the choice depends on besides the problem's sizes.
struct CallInfo {
  DType act = DType::F32;
  DType lut = DType::F32;
  uintptr_t act_ptr = 0;    // x (forward) or dy (dx): alignment matters to the vector loads
  uintptr_t codes_ptr = 0;
  uintptr_t out_ptr = 0;
};

struct Plan {
  Path path = Path::Simple;
  int block_m = 0;  // mma: tokens per block tile (16, 32, 64 or 128; mma_regs(_direct): 16 or 32)
  int splits = 1;   // mma: K split across blocks; > 1 needs an fp32 workspace [splits, M, N]
  // Set by ops.cpp: lut_linear_lowrank on mma, "t=on-chip" or "t=gemm"; a multi-adapter batch
  // served by one launch, "adapters=one-launch".
  const char* branch = "";
  const char* why = "";  // one line: why this path (tests and debugging read it)
};

// Whether each fast kernel can run this problem at all (shape, dtype, alignment, arch); on false,
// `why` says what rules it out.
bool mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why);
// mma_supports plus the register variants' own needs (M <= 32, 16-byte aligned codes); both
// mma_regs and (for M <= 16) mma_regs_direct run wherever this holds.
bool mma_regs_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why);
bool fast_decode_supports(const LutProblem& p, uintptr_t codes_ptr, uintptr_t out_ptr, const char** why);

bool dx_mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why);
bool grad_mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why);

Plan plan_lut_linear(const LutProblem& p, const CallInfo& c, const DeviceInfo& d);
// lut_linear over a stack of `adapters` LUT sets in one launch (tokens grouped by adapter).
Plan plan_lut_linear_adapters(const LutProblem& p, int64_t adapters, const CallInfo& c, const DeviceInfo& d);
// The launch configuration of an mma / mma_regs plan.
MmaConfig mma_config(const Plan& plan);
// lut_grad: Mma (lut_grad_mma.cu) or Simple. c.act_ptr is dy; c.out_ptr carries x's address.
Plan plan_lut_grad(const LutProblem& p, const CallInfo& c, const DeviceInfo& d);
Plan plan_lut_linear_dx(const LutProblem& p, const CallInfo& c, const DeviceInfo& d);

// lut_linear_lowrank on an mma plan: whether t = x l1 comes from extra block columns of the LUT GEMM
// (kernels.h LowRank) rather than a skinny GEMM before it. They need K split (t's parts are summed
// in the split-K reduction, which is where t l2 is added anyway) and token tiles of at most 64.
bool lowrank_t_on_chip(const Plan& plan);
// Tests and benchmarks: true makes every lut_linear_lowrank use the skinny GEMM.
void set_lowrank_t_gemm(bool on);
bool lowrank_t_gemm();

// Process-wide override for tests and benchmarks: every call takes `p` where that path supports
// the problem (else the automatic choice, recorded in the plan's `why`). Path::Auto restores the
// heuristics.
void set_forced_path(Path p);
Path forced_path();

}  // namespace spallm::cuda
