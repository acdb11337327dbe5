// Argument validation shared by the CPU and CUDA host code of every spallm op. Each check names
// the op and the argument, and raises the Python exception type users expect:
//   SPALLM_CHECK_TYPE  -> TypeError    (wrong dtype)
//   SPALLM_CHECK_VALUE -> ValueError   (wrong shape, size, range, layout)
//   SPALLM_CHECK       -> RuntimeError (wrong device, CUDA errors)
#pragma once
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace spallm {

namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}
}  // namespace detail

// Error messages are concatenated here rather than through c10::str's ostream: on the GPU machine
// (gcc 13.3 against torch 2.11) `ostream << int64_t` instantiated in this library segfaulted while
// formatting, so every message that held a number crashed instead of raising. std::to_string
// needs no stream or locale.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace spallm

#define SPALLM_THROW_IF_NOT(cond, err_type, ...)                                              \
  if (C10_UNLIKELY(!(cond))) {                                                                \
    throw ::c10::err_type({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},              \
                          ::spallm::message(__VA_ARGS__));                                    \
  }
#define SPALLM_CHECK_VALUE(cond, ...) SPALLM_THROW_IF_NOT(cond, ValueError, __VA_ARGS__)
#define SPALLM_CHECK_TYPE(cond, ...) SPALLM_THROW_IF_NOT(cond, TypeError, __VA_ARGS__)
#define SPALLM_CHECK(cond, ...) SPALLM_THROW_IF_NOT(cond, Error, __VA_ARGS__)

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

// Inside an op's kernel the op's dtypes are its contract (fp32 accumulation, one rounding):
// torch.autocast must not recast the ATen GEMMs a kernel runs. `const NoAutocast no_autocast;`
// at the top of a kernel function.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A fresh contiguous [tokens, last] result given the leading dims of `like`. _unsafe_view shares
// the storage without marking the output as a view of a temporary, so callers (FSDP2, in-place
// ops, torch.compile) see a plain tensor, as from nn.Linear.
inline at::Tensor with_token_dims(const at::Tensor& out2d, at::IntArrayRef like, int64_t last) {
  return at::_unsafe_view(out2d, sizes_with_last(like, last));
}

}  // namespace spallm
