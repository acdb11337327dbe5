// Multi-adapter batches: many LUT sets (adapters) that share one set of codes, each token
// choosing its own through adapter_index. lut is then a stack [A, N, G, 2^b].
//
// This is the backend-independent version: tokens are grouped by adapter (one sort) and each
// group runs the backend's single-adapter op with lut[a], so CPU and CUDA share one mechanism and
// every kernel it calls is the tested single-LUT one. It costs a host sync (the index range check
// and the group sizes) and one launch per adapter present; a fused kernel that reads each token's
// LUT in one launch is the fast path's business, and plugs in behind the same schema.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace spallm {

using LinearFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                                const std::optional<at::Tensor>& bias);
using LinearDxFn = at::Tensor (*)(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& lut);
using LutGradFn = at::Tensor (*)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,
                                 int64_t groups_per_row, int64_t num_entries, bool deterministic);

at::Tensor lut_linear_adapters(LinearFn one, const at::Tensor& x, const at::Tensor& codes,
                               const at::Tensor& lut, const std::optional<at::Tensor>& bias,
                               const at::Tensor& adapter_index);
at::Tensor lut_linear_dx_adapters(LinearDxFn one, const at::Tensor& dy, const at::Tensor& codes,
                                  const at::Tensor& lut, const at::Tensor& adapter_index);
// dlut [A, N, G, 2^b]: each token's gradient lands in its own adapter's LUT; adapters no token
// uses get zeros.
at::Tensor lut_grad_adapters(LutGradFn one, const at::Tensor& dy, const at::Tensor& x,
                             const at::Tensor& codes, int64_t groups_per_row, int64_t num_entries,
                             const at::Tensor& adapter_index, int64_t num_adapters, bool deterministic);

// Tokens in stable adapter order, for kernels that serve all adapters in one launch: x_sorted =
// x[order], adapter a's tokens are rows [offsets[a], offsets[a + 1]) of x_sorted. order [M] and
// offsets [A + 1] are int64 on adapter_index's device. Validates adapter_index as the functions
// above do (the range check is the one host sync).
struct AdapterOrder {
  at::Tensor order;
  at::Tensor offsets;
};
AdapterOrder sort_by_adapter(const char* op, const at::Tensor& adapter_index, int64_t tokens, int64_t num_adapters,
                             const at::Tensor& ref);

// Defines prefix_lut_linear, prefix_lut_linear_dx and prefix_lut_grad: the functions a backend
// registers. They take the optional adapter arguments and route to the functions above when
// adapter_index is given, else straight to the backend's single-adapter ops.
#define SPALLM_DEFINE_ADAPTER_ENTRY_POINTS(prefix, linear_one, dx_one, grad_one)                         \
  at::Tensor prefix##_lut_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,     \
                                 const std::optional<at::Tensor>& bias,                                   \
                                 const std::optional<at::Tensor>& adapter_index) {                        \
    return adapter_index ? ::spallm::lut_linear_adapters(&linear_one, x, codes, lut, bias, *adapter_index) \
                         : linear_one(x, codes, lut, bias);                                              \
  }                                                                                                      \
  at::Tensor prefix##_lut_linear_dx(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& lut, \
                                    const std::optional<at::Tensor>& adapter_index) {                     \
    return adapter_index ? ::spallm::lut_linear_dx_adapters(&dx_one, dy, codes, lut, *adapter_index)      \
                         : dx_one(dy, codes, lut);                                                        \
  }                                                                                                      \
  at::Tensor prefix##_lut_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,        \
                               int64_t groups, int64_t entries,                                          \
                               const std::optional<at::Tensor>& adapter_index, int64_t num_adapters,      \
                               bool deterministic) {                                                     \
    return adapter_index                                                                                 \
               ? ::spallm::lut_grad_adapters(&grad_one, dy, x, codes, groups, entries, *adapter_index,   \
                                             num_adapters, deterministic)                                \
               : grad_one(dy, x, codes, groups, entries, deterministic);                                 \
  }

}  // namespace spallm
