// Host-callable entry points of the spallm CUDA kernels. Plain C++: no torch, so the .cu files that
// implement these compile with nvcc alone (CI does that for sm_80 and sm_90a), and csrc/cuda/ops.cpp,
// the torch-facing side, only converts tensors into these structs.
//
// All sizes are int64 and every kernel indexes with 64-bit offsets, so tensors with more than 2^31
// elements are handled. Each entry point launches on `stream`, returns the launch's cudaError_t and
// never synchronizes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace spallm::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// One sketched weight W [N, K] times M tokens. codes: [N, row_bytes] in the canonical packed layout
// (csrc/codes.h); lut: [N, G, 2^bits] of dtype lut_type.
struct LutProblem {
  int64_t M = 0;          // tokens (all leading dims of x flattened)
  int64_t N = 0;          // out_features
  int64_t K = 0;          // in_features
  int64_t G = 0;          // groups per row
  int64_t row_bytes = 0;  // bytes per packed row of codes
  int bits = 4;           // 2, 3 or 4
};

// y[M, N] = x[M, K] W^T (+ bias[N]); x, bias, y share act_type; fp32 accumulation.
cudaError_t lut_linear(const LutProblem& p, const void* x, DType act_type, const uint8_t* codes,
                       const void* lut, DType lut_type, const void* bias, void* y, cudaStream_t stream);

// dx[M, K] = dy[M, N] W; dy and dx share act_type; fp32 accumulation.
cudaError_t lut_linear_dx(const LutProblem& p, const void* dy, DType act_type, const uint8_t* codes,
                          const void* lut, DType lut_type, void* dx, cudaStream_t stream);

// dlut[N, G, 2^bits] (fp32, fully written) = bucket sums of dy^T x. With deterministic = true no
// float atomics are used, so results are bit-identical run to run.
cudaError_t lut_grad(const LutProblem& p, const void* dy, const void* x, DType act_type,
                     const uint8_t* codes, float* dlut, bool deterministic, cudaStream_t stream);

// w[N, K] = decoded weight, in the LUT's own dtype.
cudaError_t lut_decode(const LutProblem& p, const uint8_t* codes, const void* lut, DType lut_type,
                       void* w, cudaStream_t stream);

// ---- Fast paths (dispatch.h decides when each runs; callers check its *_supports first) ----

// w[N, K] = the decoded weight in out_type: rounded to nearest even, so out_type == lut_type copies
// the LUT values bit for bit (lut_decode_fast.cu). Needs fast_decode_supports().
cudaError_t lut_decode_fast(const LutProblem& p, const uint8_t* codes, const void* lut, DType lut_type,
                            void* w, DType out_type, cudaStream_t stream);

// The largest token tile whose kernels carry t blocks (on-chip mode needs block_m <= this). The
// 128-token tile kernel has no registers to spare for them (its main loop would spill), and a call
// that splits K at 128-token tiles has M >= 65, where a skinny GEMM for t is cheap next to the
// main GEMM anyway.
constexpr int kLowRankMaxBlockM = 64;

// An optional low-rank branch y += (x l1) l2 (l2 [rank, N] fp32 row-major), added to
// lut_linear_mma's fp32 accumulators before the single rounding. t = x l1 comes one of two ways:
//   * precomputed: `t` [M, rank] fp32 row-major, computed by the caller (any split count);
//   * on chip (`l1` set, splits >= 2): ceil(rank / 64) extra block columns of the same launch take
//     the rows of l1^T as their weights, see exactly the x tiles the code blocks see, and write t's
//     per-split partials to `t_partials` [splits, M, rank]; the split-K reduction adds them in split
//     order and applies t l2 with the bias. x is read once and no launch is added.
struct LowRank {
  const float* t = nullptr;  // precomputed x l1; nullptr with l1 == nullptr: no branch
  const void* l1 = nullptr;  // on-chip mode: l1 [K, rank], any strides, dtype l1_type
  DType l1_type = DType::F32;
  int64_t l1_stride_k = 0;
  int64_t l1_stride_r = 0;
  float* t_partials = nullptr;  // on-chip mode: splits * M * rank floats
  const float* l2 = nullptr;
  int64_t rank = 0;
};

// Multi-adapter batches on the mma path: x's rows are grouped by adapter, rows
// [offsets[a], offsets[a+1]) use the LUT at element offset a * lut_stride of a stack [A, N, G, 2^b],
// and y comes out in the same grouped order. offsets (A + 1 int64, on the device) == nullptr: one LUT.
struct Segments {
  const int64_t* offsets = nullptr;
  int64_t count = 1;
  int64_t lut_stride = 0;
};

// How lut_linear_mma runs: tokens per block tile, K split across blocks, and the decode (dispatch.cpp
// fills it from a Plan). regs = false: W tiles decoded into shared memory, block_m in
// {16, 32, 64, 128}; regs = true: every lane decodes its own mma fragments into registers,
// block_m in {16, 32}, codes 16-byte aligned; with codes_direct (regs and block_m 16 only) those
// lanes load their codes from global memory straight into registers instead of through a
// shared-memory ring.
struct MmaConfig {
  int block_m = 16;
  int splits = 1;
  bool regs = false;
  bool codes_direct = false;
};

// y = x W^T (+ bias) on tensor cores with W decoded on chip, never in HBM (lut_mma.cu).
// act_type is BF16 or F16 and W is rounded to it, as a bf16/fp16 nn.Linear's weight would be;
// fp32 accumulation. With config.splits > 1 `workspace` holds splits * M * N floats (partial sums,
// added in split order: deterministic). Needs mma_supports() (and mma_regs_supports() for regs).
cudaError_t lut_linear_mma(const LutProblem& p, const void* x, DType act_type, const uint8_t* codes,
                           const void* lut, DType lut_type, const void* bias, void* y, const MmaConfig& config,
                           float* workspace, const LowRank& lowrank, const Segments& segments, cudaStream_t stream);

// Dynamic shared memory of one block of each tensor-core kernel, so that dispatch can keep within
// the device's per-block limit (99 KB on sm_86 / sm_89 / sm_120, 227 KB on sm_90).
int lut_mma_smem_bytes(int bits, int block_m, bool regs);
int lut_dx_mma_smem_bytes(int bits, int block_m);
int lut_grad_mma_smem_bytes(int bits);

// dx = dy W on tensor cores, W decoded tile by tile in shared memory (lut_dx_mma.cu). act_type BF16
// or F16; block_m and splits as in lut_linear_mma (the split runs over W's rows; workspace holds
// splits * M * K floats). Needs dx_mma_supports().
cudaError_t lut_linear_dx_mma(const LutProblem& p, const void* dy, DType act_type, const uint8_t* codes,
                              const void* lut, DType lut_type, void* dx, int block_m, int splits, float* workspace,
                              cudaStream_t stream);

// dlut[N, G, 2^bits] (fp32) on tensor cores, dW reduced into the buckets on chip (lut_grad_mma.cu).
// act_type BF16 or F16. workspace == nullptr: one float atomicAdd per bucket per 64-column tile into
// dlut, which the caller zero-fills first. Deterministic mode: workspace holds
// (K / 64) * N * 2^bits floats and dlut is fully written. Needs grad_mma_supports().
cudaError_t lut_grad_mma(const LutProblem& p, const void* dy, const void* x, DType act_type, const uint8_t* codes,
                         float* dlut, float* workspace, cudaStream_t stream);

}  // namespace spallm::cuda
