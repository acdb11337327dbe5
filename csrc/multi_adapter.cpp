#include "multi_adapter.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "checks.h"

namespace spallm {
namespace {

// adapter_index as int64 [M] after the checks every multi-adapter entry point shares: integer,
// one entry per token, on the codes' device, in [0, A) (the one host sync).
at::Tensor checked_index(const char* op, const at::Tensor& adapter_index, int64_t tokens, int64_t num_adapters,
                         const at::Tensor& ref) {
  SPALLM_CHECK_TYPE(adapter_index.scalar_type() == at::kLong || adapter_index.scalar_type() == at::kInt, op,
                    ": argument 'adapter_index' must be int64 or int32, got ", adapter_index.scalar_type());
  check_same_device(op, "adapter_index", adapter_index, "codes", ref);
  SPALLM_CHECK_VALUE(adapter_index.numel() == tokens, op, ": argument 'adapter_index' must hold one entry per "
                     "token (", tokens, "), got ", adapter_index.numel());
  SPALLM_CHECK_VALUE(num_adapters >= 1, op, ": the LUT stack must hold at least one adapter");
  const at::Tensor idx = adapter_index.reshape({-1}).to(at::kLong);
  if (tokens == 0) return idx;
  const auto [lo, hi] = at::aminmax(idx);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  SPALLM_CHECK_VALUE(lo_v >= 0 && hi_v < num_adapters, op, ": argument 'adapter_index' must lie in [0, ",
                     num_adapters, "), found ", lo_v < 0 ? lo_v : hi_v);
  return idx;
}

// (adapter, token rows) for every adapter that at least one token uses, rows as int64 indices on
// the tokens' device.
std::vector<std::pair<int64_t, at::Tensor>> group_tokens(const char* op, const at::Tensor& adapter_index,
                                                         int64_t tokens, int64_t num_adapters,
                                                         const at::Tensor& ref) {
  const at::Tensor idx = checked_index(op, adapter_index, tokens, num_adapters, ref);
  std::vector<std::pair<int64_t, at::Tensor>> groups;
  if (tokens == 0) return groups;
  const at::Tensor order = std::get<1>(idx.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(idx, {}, num_adapters).cpu();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    if (c[a] > 0) groups.emplace_back(a, order.narrow(0, offset, c[a]));
    offset += c[a];
  }
  return groups;
}

void check_stack(const char* op, const at::Tensor& lut) {
  SPALLM_CHECK_VALUE(lut.dim() == 4, op, ": with 'adapter_index', argument 'lut' must be a 4-D stack "
                     "[num_adapters, out_features, groups_per_row, 2^bits], got shape ", lut.sizes());
  SPALLM_CHECK_VALUE(lut.size(0) >= 1, op, ": argument 'lut' holds no adapter");
  SPALLM_CHECK_VALUE(lut.is_contiguous(), op, ": argument 'lut' must be contiguous");
}

}  // namespace

AdapterOrder sort_by_adapter(const char* op, const at::Tensor& adapter_index, int64_t tokens, int64_t num_adapters,
                             const at::Tensor& ref) {
  const at::Tensor idx = checked_index(op, adapter_index, tokens, num_adapters, ref);
  AdapterOrder out;
  auto [sorted, order] = idx.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  out.order = order;
  // offsets[a] = first sorted position holding an index >= a (offsets[A] = M): segment a is
  // [offsets[a], offsets[a + 1]). searchsorted runs where the tokens are, with no host sync
  // (bincount would sync to size its output).
  out.offsets = at::searchsorted(sorted, at::arange(num_adapters + 1, idx.options()));
  return out;
}

at::Tensor lut_linear_adapters(LinearFn one, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                               const std::optional<at::Tensor>& bias, const at::Tensor& adapter_index) {
  constexpr const char* op = "spallm.lut_linear";
  check_stack(op, lut);
  SPALLM_CHECK_VALUE(x.dim() >= 1, op, ": argument 'x' must have at least one dimension");
  const at::Tensor x2 = as_tokens(x);
  const auto groups = group_tokens(op, adapter_index, x2.size(0), lut.size(0), codes);
  if (groups.empty()) return one(x, codes, lut.select(0, 0), bias);  // no tokens: shapes and checks only
  at::Tensor y;
  for (const auto& [a, rows] : groups) {
    const at::Tensor ya = one(x2.index_select(0, rows), codes, lut.select(0, a), bias);
    if (!y.defined()) y = at::empty({x2.size(0), ya.size(1)}, ya.options());
    y.index_copy_(0, rows, ya);
  }
  return with_token_dims(y, x.sizes(), y.size(1));
}

at::Tensor lut_linear_dx_adapters(LinearDxFn one, const at::Tensor& dy, const at::Tensor& codes,
                                  const at::Tensor& lut, const at::Tensor& adapter_index) {
  constexpr const char* op = "spallm.lut_linear_dx";
  check_stack(op, lut);
  SPALLM_CHECK_VALUE(dy.dim() >= 1, op, ": argument 'dy' must have at least one dimension");
  const at::Tensor dy2 = as_tokens(dy);
  const auto groups = group_tokens(op, adapter_index, dy2.size(0), lut.size(0), codes);
  if (groups.empty()) return one(dy, codes, lut.select(0, 0));
  at::Tensor dx;
  for (const auto& [a, rows] : groups) {
    const at::Tensor da = one(dy2.index_select(0, rows), codes, lut.select(0, a));
    if (!dx.defined()) dx = at::empty({dy2.size(0), da.size(1)}, da.options());
    dx.index_copy_(0, rows, da);
  }
  return with_token_dims(dx, dy.sizes(), dx.size(1));
}

at::Tensor lut_grad_adapters(LutGradFn one, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,
                             int64_t groups_per_row, int64_t num_entries, const at::Tensor& adapter_index,
                             int64_t num_adapters, bool deterministic) {
  constexpr const char* op = "spallm.lut_grad";
  SPALLM_CHECK_VALUE(num_adapters >= 1, op, ": with 'adapter_index', argument 'num_adapters' must be >= 1, got ",
                     num_adapters);
  SPALLM_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1, op, ": arguments 'dy' and 'x' must have at least one dimension");
  const at::Tensor dy2 = as_tokens(dy), x2 = as_tokens(x);
  SPALLM_CHECK_VALUE(dy2.size(0) == x2.size(0), op, ": arguments 'dy' and 'x' must have the same number of "
                     "tokens, got ", dy2.size(0), " and ", x2.size(0));
  const auto groups = group_tokens(op, adapter_index, x2.size(0), num_adapters, codes);
  // The single-adapter op validates shapes and gives the dtype; its M = 0 result is all zeros.
  const at::Tensor zero =
      one(dy2.narrow(0, 0, 0), x2.narrow(0, 0, 0), codes, groups_per_row, num_entries, deterministic);
  at::Tensor dlut = at::zeros({num_adapters, zero.size(0), zero.size(1), zero.size(2)}, zero.options());
  for (const auto& [a, rows] : groups) {
    dlut.select(0, a).copy_(one(dy2.index_select(0, rows), x2.index_select(0, rows), codes, groups_per_row,
                                num_entries, deterministic));
  }
  return dlut;
}

}  // namespace spallm
