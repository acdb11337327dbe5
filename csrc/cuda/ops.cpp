// The CUDA backend of the spallm ops: the same argument checks, output shapes and dtypes as the CPU
// backend (csrc/checks.h), except that fp64 is a TypeError here. Inputs are made contiguous and
// handed as raw pointers to the kernels of kernels.h, launched on the current stream of the
// tensors' device. Leading dims of x / dy flatten into tokens; outputs keep them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "multi_adapter.h"
#include "cuda/kernels.h"

namespace spallm {
namespace {

cuda::DType cuda_dtype(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default:
      SPALLM_CHECK_TYPE(false, op, ": argument '", arg, "' must be float32, bfloat16 or float16 on CUDA, "
                        "got ", t.scalar_type());
  }
  return cuda::DType::F32;
}

// check_codes_lut accepts an fp64 LUT (the CPU backend runs it); the kernels don't.
LutShape check_codes_lut_cuda(const char* op, const at::Tensor& codes, const at::Tensor& lut) {
  const LutShape s = check_codes_lut(op, codes, lut);
  cuda_dtype(op, "lut", lut);
  return s;
}

cuda::LutProblem problem(const LutShape& s, int64_t tokens) {
  cuda::LutProblem p;
  p.M = tokens;
  p.N = s.N;
  p.K = s.K;
  p.G = s.G;
  p.row_bytes = s.row_bytes;
  p.bits = s.bits;
  return p;
}

at::Tensor lut_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "spallm.lut_linear";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  check_activation(op, "x", x, s.K, /*allow_double=*/false);
  check_same_device(op, "x", x, "codes", codes);
  if (bias.has_value()) check_bias(op, *bias, x, s.N);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = as_tokens(x).contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({xc.size(0), s.N}, x.options());
  C10_CUDA_CHECK(cuda::lut_linear(problem(s, xc.size(0)), xc.const_data_ptr(), cuda_dtype(op, "x", x),
                                  codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(),
                                  cuda_dtype(op, "lut", lut), bc.defined() ? bc.const_data_ptr() : nullptr,
                                  y.mutable_data_ptr(), at::cuda::getCurrentCUDAStream()));
  return y.reshape(sizes_with_last(x.sizes(), s.N));
}

at::Tensor lut_linear_dx_cuda(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& lut) {
  constexpr const char* op = "spallm.lut_linear_dx";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/false);
  check_same_device(op, "dy", dy, "codes", codes);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor dyc = as_tokens(dy).contiguous();
  at::Tensor dx = at::empty({dyc.size(0), s.K}, dy.options());
  C10_CUDA_CHECK(cuda::lut_linear_dx(problem(s, dyc.size(0)), dyc.const_data_ptr(), cuda_dtype(op, "dy", dy),
                                     codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(),
                                     cuda_dtype(op, "lut", lut), dx.mutable_data_ptr(),
                                     at::cuda::getCurrentCUDAStream()));
  return dx.reshape(sizes_with_last(dy.sizes(), s.K));
}

at::Tensor lut_grad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,
                         int64_t groups_per_row, int64_t num_entries, bool deterministic) {
  constexpr const char* op = "spallm.lut_grad";
  const LutShape s = check_codes_groups(op, codes, groups_per_row, num_entries);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/false);
  check_activation(op, "x", x, s.K, /*allow_double=*/false);
  check_same_device(op, "dy", dy, "codes", codes);
  check_same_device(op, "x", x, "codes", codes);
  SPALLM_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), op, ": arguments 'dy' and 'x' must have one dtype, got ",
                    dy.scalar_type(), " and ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = as_tokens(dy).contiguous();
  const at::Tensor xc = as_tokens(x).contiguous();
  SPALLM_CHECK_VALUE(dyc.size(0) == xc.size(0), op, ": arguments 'dy' and 'x' must have the same number of "
                     "tokens, got ", dyc.size(0), " and ", xc.size(0));
  // Every element is written by the kernel, zeros included.
  at::Tensor dlut = at::empty({s.N, s.G, s.E}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::lut_grad(problem(s, xc.size(0)), dyc.const_data_ptr(), xc.const_data_ptr(),
                                cuda_dtype(op, "x", x), codes.const_data_ptr<uint8_t>(),
                                dlut.mutable_data_ptr<float>(), deterministic,
                                at::cuda::getCurrentCUDAStream()));
  return dlut;
}

at::Tensor lut_decode_cuda(const at::Tensor& codes, const at::Tensor& lut) {
  constexpr const char* op = "spallm.lut_decode";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor w = at::empty({s.N, s.K}, lut.options());
  C10_CUDA_CHECK(cuda::lut_decode(problem(s, 0), codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(),
                                  cuda_dtype(op, "lut", lut), w.mutable_data_ptr(),
                                  at::cuda::getCurrentCUDAStream()));
  return w;
}

SPALLM_DEFINE_ADAPTER_ENTRY_POINTS(cuda, lut_linear_cuda, lut_linear_dx_cuda, lut_grad_cuda)

}  // namespace

TORCH_LIBRARY_IMPL(spallm, CUDA, m) {
  m.impl("lut_linear", &cuda_lut_linear);
  m.impl("lut_linear_dx", &cuda_lut_linear_dx);
  m.impl("lut_grad", &cuda_lut_grad);
  m.impl("lut_decode", &lut_decode_cuda);
}

}  // namespace spallm
