// The backend-independent spallm.lut_linear_lowrank (schema and conventions: lowrank.h).
//
// It is three dispatcher calls: the backend's own lut_linear kernel for x W^T (+ bias), then
// t = x l1 and y += t l2 as GEMMs. That is exact and runs wherever lut_linear runs, but costs
// three launches and reads x twice; Nunchaku measured such an unfused rank-32 branch at +57 %
// latency. On CUDA the mma kernel adds t l2 before its one rounding instead, with t = x l1 computed
// by extra blocks of the same launch (small M) or a skinny GEMM before it, so y is written once;
// csrc/cuda/ops.cpp registers that and falls back to this.
#include "lowrank.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace spallm {

namespace {

bool is_float(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || (allow_double && t == at::kDouble);
}

// spallm::lut_linear through the dispatcher, so each backend runs its own (tested) kernel. We are
// below autograd here (the autograd formula of lut_linear_lowrank lives in ops.py), so this does
// not record a graph.
at::Tensor call_lut_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                           const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spallm::lut_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(x, codes, lut, bias, std::nullopt);
}

}  // namespace

LutShape check_lut_linear_lowrank(const char* op, const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& lut, const at::Tensor& l1, const at::Tensor& l2,
                                  const std::optional<at::Tensor>& bias) {
  const LutShape s = check_codes_lut(op, codes, lut);
  // fp64 is a CPU-only dtype (gradcheck); the CUDA kernels reject it, and so does this op there.
  const bool allow_double = x.device().is_cpu();
  check_activation(op, "x", x, s.K, allow_double);
  check_same_device(op, "x", x, "codes", codes);
  const char* float_names = allow_double ? "float64, float32, bfloat16 or float16" : "float32, bfloat16 or float16";
  SPALLM_CHECK_TYPE(is_float(l1.scalar_type(), allow_double), op, ": argument 'l1' must be ", float_names,
                    ", got ", l1.scalar_type());
  SPALLM_CHECK_TYPE(l2.scalar_type() == l1.scalar_type(), op, ": arguments 'l1' and 'l2' must share one dtype, got ",
                    l1.scalar_type(), " and ", l2.scalar_type());
  SPALLM_CHECK_VALUE(l1.dim() == 2 && l1.size(0) == s.K, op, ": argument 'l1' must be 2-D [in_features=", s.K,
                     ", rank], got shape ", l1.sizes());
  SPALLM_CHECK_VALUE(l2.dim() == 2 && l2.size(1) == s.N, op, ": argument 'l2' must be 2-D [rank, out_features=",
                     s.N, "], got shape ", l2.sizes());
  SPALLM_CHECK_VALUE(l1.size(1) == l2.size(0), op, ": arguments 'l1' and 'l2' disagree on the rank: 'l1' is ",
                     l1.sizes(), " and 'l2' is ", l2.sizes(), " (l1 [in_features, rank], l2 [rank, out_features])");
  SPALLM_CHECK_VALUE(l1.size(1) >= 1, op, ": arguments 'l1' and 'l2' have rank 0; a layer without a "
                     "low-rank branch is spallm.lut_linear");
  check_same_device(op, "l1", l1, "x", x);
  check_same_device(op, "l2", l2, "x", x);
  if (bias.has_value()) check_bias(op, *bias, x, s.N);
  return s;
}

at::Tensor lut_linear_lowrank_composite(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                                        const at::Tensor& l1, const at::Tensor& l2,
                                        const std::optional<at::Tensor>& bias) {
  const LutShape s = check_lut_linear_lowrank("spallm.lut_linear_lowrank", x, codes, lut, l1, l2, bias);
  // The op's dtypes are its contract: under torch.autocast the GEMMs below (and the CPU
  // lut_linear's) would otherwise run in the autocast dtype and drop the fp32 accumulation.
  const NoAutocast no_autocast;
  // Everything in the accumulation dtype and one rounding at the end, as the fused kernel does
  // (its accumulators hold both branches). On CPU lut_linear converts x to fp32 anyway, so
  // passing it converted costs nothing there.
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = as_tokens(x).to(acc);
  std::optional<at::Tensor> ba;
  if (bias.has_value()) ba = bias->to(acc);
  at::Tensor y = call_lut_linear(xa, codes, lut, ba);  // [M, N], acc
  const at::Tensor t = at::mm(xa, l1.to(acc));         // [M, rank]: matmul takes any strides
  y.addmm_(t, l2.to(acc));
  return with_token_dims(y.to(x.scalar_type()), x.sizes(), s.N);
}

TORCH_LIBRARY_IMPL(spallm, CPU, m) {
  m.impl("lut_linear_lowrank", &lut_linear_lowrank_composite);
}

// The CUDA registration is csrc/cuda/ops.cpp's lut_linear_lowrank_cuda: the branch fused into the
// mma kernel, this composite for the calls that kernel does not take.

}  // namespace spallm
