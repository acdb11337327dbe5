// The token counts at which the CUDA dispatch (dispatch.cpp) changes path: their names as
// spallm_ext.kernels and tuning files spell them, the built-in values and what a setting may be.
// Plain C++: the CPU-only build lists them too (it has nothing to apply them to).
//
// The built-in values come from a roofline argument (dispatch.cpp); `spallm-ext tune --device cuda`
// measures the crossovers on the GPU at hand and sets these (spallm_ext/tuning.py). The upper
// limits of the first two are the kernels' own: mma_regs_direct has one 16-token tile and mma_regs
// 32 tokens at most, so a larger setting could not be carried out.
#pragma once
#include <cstdint>

namespace spallm::cuda {

enum Threshold : int { kDirectMaxTokens = 0, kRegsMaxTokens, kMmaMaxTokens, kDxMmaMaxTokens, kDecodeMinTokens,
                       kThresholdCount };

struct ThresholdSpec {
  const char* name;
  int64_t builtin;
  int64_t lo;  // inclusive range of a setting
  int64_t hi;
};

constexpr int64_t kAnyTokens = int64_t(1) << 40;

constexpr ThresholdSpec kThresholdSpecs[kThresholdCount] = {
    // lut_linear: mma_regs_direct up to this many tokens (0: never).
    {"direct_max_tokens", 16, 0, 16},
    // lut_linear: mma_regs up to this many tokens, past direct_max_tokens (0: never).
    {"regs_max_tokens", 32, 0, 32},
    // lut_linear: a tensor-core LUT kernel up to this many tokens, decode_gemm beyond.
    {"mma_max_tokens", 512, 0, kAnyTokens},
    // lut_linear_dx: the same crossover for the backward's dx = dy W.
    {"dx_mma_max_tokens", 512, 0, kAnyTokens},
    // Where no tensor-core kernel runs (fp32, odd shapes, pre-sm_80): decode_gemm from this many
    // tokens, the simple kernels below.
    {"decode_min_tokens", 32, 1, kAnyTokens},
};

// The current value (the built-in one unless set).
int64_t threshold(Threshold t);
// Set by name; value -1 restores the built-in one. False (and `why`) for an unknown name or a value
// out of range.
bool set_threshold(const char* name, int64_t value, const char** why);

}  // namespace spallm::cuda
