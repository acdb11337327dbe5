// Argument validation shared by the CPU and CUDA host code of every spallm op. Each check names
// the op and the argument, and raises the Python exception type users expect:
//   TORCH_CHECK_TYPE  -> TypeError   (wrong dtype)
//   SPALLM_CHECK_VALUE -> ValueError (wrong shape, size, range, layout)
//   TORCH_CHECK       -> RuntimeError (wrong device)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <vector>

namespace spallm {

// The ValueError our checks throw. torch translates any c10::ValueError into Python's ValueError;
// this subclass exists so the thrown object's vtable and typeinfo live in our library (its key
// function is defined in checks.cpp). With gcc 13 builds against torch 2.11, objects built on the
// vtable that libc10 exports for c10::ValueError crashed the process while propagating, where
// c10::TypeError (whose vtable libc10 does not export) did not.
class ValueError : public c10::ValueError {
 public:
  using c10::ValueError::ValueError;
  ~ValueError() override;
};

}  // namespace spallm

// TORCH_CHECK_VALUE, throwing spallm::ValueError.
#define SPALLM_CHECK_VALUE(cond, ...)                                                    \
  if (C10_UNLIKELY(!(cond))) {                                                           \
    throw ::spallm::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},    \
                               ::c10::str(__VA_ARGS__));                                 \
  }

namespace spallm {

// Everything a kernel needs to know about one sketched weight, read off (codes, lut).
struct LutShape {
  int64_t N = 0;          // out_features (rows of W)
  int64_t K = 0;          // in_features (columns of W)
  int64_t G = 0;          // groups per row
  int64_t E = 0;          // LUT entries per (row, group) = 2^bits
  int64_t group_size = 0; // K / G
  int64_t row_bytes = 0;  // bytes per packed code row
  int bits = 0;
};

// 4 -> 2, 8 -> 3, 16 -> 4; anything else is a ValueError naming `arg`.
int bits_from_entries(int64_t entries, const char* op, const char* arg);

// codes: uint8 [N, row_bytes], contiguous. lut: float [N, G, 2^b], contiguous. Returns the shape.
// `lut` may be undefined when only the code shape matters (lut_grad), then G and E come from
// groups/entries.
LutShape check_codes_lut(const char* op, const at::Tensor& codes, const at::Tensor& lut);
LutShape check_codes_groups(const char* op, const at::Tensor& codes, int64_t groups, int64_t entries);

// A floating input: dtype in {fp32, bf16, fp16} (+ fp64 when allow_double), last dim == features.
void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                      bool allow_double);

// Same device as `ref`; RuntimeError naming both otherwise.
void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref);

// Number of tokens of a [..., features] tensor.
inline int64_t tokens_of(const at::Tensor& t) {
  return t.dim() == 0 ? 0 : t.numel() / std::max<int64_t>(t.size(-1), 1);
}

// [..., features] as a 2-D [tokens, features] view (or copy). Unlike reshape({-1, features}) this
// also works when features == 0.
inline at::Tensor as_tokens(const at::Tensor& t) {
  const at::IntArrayRef sizes = t.sizes();
  int64_t tokens = 1;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) tokens *= sizes[i];
  return t.reshape({tokens, sizes.back()});
}

// Optional bias of lut_linear: x's dtype, shape [out_features], x's device.
void check_bias(const char* op, const at::Tensor& bias, const at::Tensor& x, int64_t out_features);

// The sizes of a [..., features] tensor with the last one replaced: the output shape of an op
// that maps features -> last over every token.
inline std::vector<int64_t> sizes_with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

}  // namespace spallm
