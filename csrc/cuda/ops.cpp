// The CUDA backend of the spallm ops: the same argument checks, output shapes and dtypes as the CPU
// backend (csrc/checks.h), except that fp64 is a TypeError here. Inputs are made contiguous and
// handed as raw pointers to the kernels of kernels.h, launched on the current stream of the
// tensors' device. Leading dims of x / dy flatten into tokens; outputs keep them.
//
// Which kernel runs is dispatch.cpp's decision (a Plan); this file only carries it out: the
// decode_gemm path's cuBLAS GEMM and the workspaces come from ATen (caching allocator, current
// stream, so CUDA graphs capture them like any other op).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "kernel_select.h"
#include "lowrank.h"
#include "multi_adapter.h"
#include "cuda/dispatch.h"
#include "cuda/kernels.h"
#include "cuda/thresholds.h"

namespace spallm {

namespace {

thread_local cuda::Plan t_last_plan;  // what the last CUDA call on this thread ran (for tests)

cuda::DeviceInfo device_info(const at::Device& device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  cuda::DeviceInfo d;
  d.sm_count = prop->multiProcessorCount;
  d.major = prop->major;
  d.minor = prop->minor;
  d.smem_per_block = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  return d;
}

uintptr_t address(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()); }

// Activations as the kernels read them: [tokens, features], contiguous, and 16-byte aligned. A
// contiguous view at an odd offset into a larger buffer (x = buf[3:].view(M, K)) is already
// contiguous, so .contiguous() keeps its pointer, and the tensor-core kernels' 16-byte cp.async
// loads would rule them out (simple kernel or decode + GEMM instead); one copy keeps them.
at::Tensor kernel_tokens(const at::Tensor& t) {
  at::Tensor c = as_tokens(t).contiguous();
  return address(c) % 16 == 0 ? c : c.clone(at::MemoryFormat::Contiguous);
}

// What dispatch.cpp needs to know about a call besides its sizes. act_ptr 0: the activation is a
// fresh (aligned) copy made later.
cuda::CallInfo call_info(cuda::DType act, cuda::DType lut, uintptr_t act_ptr, const at::Tensor& codes) {
  cuda::CallInfo call;
  call.act = act;
  call.lut = lut;
  call.act_ptr = act_ptr;
  call.codes_ptr = address(codes);
  return call;
}

// The decode half of decode_gemm: W [N, K] in `options`' dtype (the activations').
at::Tensor decode_weight(const cuda::LutProblem& p, const at::Tensor& codes, const at::Tensor& lut,
                         cuda::DType lut_type, cuda::DType out_type, const at::TensorOptions& options,
                         cudaStream_t stream) {
  at::Tensor w = at::empty({p.N, p.K}, options);
  C10_CUDA_CHECK(cuda::lut_decode_fast(p, codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(), lut_type,
                                       w.mutable_data_ptr(), out_type, stream));
  return w;
}

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
  const NoAutocast no_autocast;
  constexpr const char* op = "spallm.lut_linear";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  check_activation(op, "x", x, s.K, /*allow_double=*/false);
  check_same_device(op, "x", x, "codes", codes);
  if (bias.has_value()) check_bias(op, *bias, x, s.N);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = kernel_tokens(x);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cuda::LutProblem p = problem(s, xc.size(0));
  const cuda::DType act = cuda_dtype(op, "x", x), lut_type = cuda_dtype(op, "lut", lut);
  const cuda::CallInfo call = call_info(act, lut_type, address(xc), codes);
  const cuda::Plan plan = cuda::plan_lut_linear(p, call, device_info(x.device()));
  t_last_plan = plan;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor y;
  if (plan.path == cuda::Path::DecodeGemm) {
    // W in the activation dtype, then cuBLAS: same rounding of W as a bf16/fp16 nn.Linear, and
    // fp32 follows torch's own fp32 matmul settings (TF32 only if the user allowed it).
    const at::Tensor w = decode_weight(p, codes, lut, lut_type, act, x.options(), stream);
    y = bc.defined() ? at::addmm(bc, xc, w.t()) : at::mm(xc, w.t());
  } else {
    y = at::empty({xc.size(0), s.N}, x.options());
    const void* bias_ptr = bc.defined() ? bc.const_data_ptr() : nullptr;
    if (cuda::is_mma(plan.path)) {
      at::Tensor ws;
      if (plan.splits > 1) ws = at::empty({plan.splits * p.M * p.N}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(cuda::lut_linear_mma(p, xc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                          lut.const_data_ptr(), lut_type, bias_ptr, y.mutable_data_ptr(),
                                          cuda::mma_config(plan),
                                          ws.defined() ? ws.mutable_data_ptr<float>() : nullptr, cuda::LowRank{},
                                          cuda::Segments{}, stream));
    } else {
      C10_CUDA_CHECK(cuda::lut_linear(p, xc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                      lut.const_data_ptr(), lut_type, bias_ptr, y.mutable_data_ptr(), stream));
    }
  }
  return with_token_dims(y, x.sizes(), s.N);
}

at::Tensor lut_linear_dx_cuda(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& lut) {
  const NoAutocast no_autocast;
  constexpr const char* op = "spallm.lut_linear_dx";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/false);
  check_same_device(op, "dy", dy, "codes", codes);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor dyc = kernel_tokens(dy);
  const cuda::LutProblem p = problem(s, dyc.size(0));
  const cuda::DType act = cuda_dtype(op, "dy", dy), lut_type = cuda_dtype(op, "lut", lut);
  const cuda::CallInfo call = call_info(act, lut_type, address(dyc), codes);
  const cuda::Plan plan = cuda::plan_lut_linear_dx(p, call, device_info(dy.device()));
  t_last_plan = plan;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dx;
  if (plan.path == cuda::Path::DecodeGemm) {
    const at::Tensor w = decode_weight(p, codes, lut, lut_type, act, dy.options(), stream);
    dx = at::mm(dyc, w);
  } else if (plan.path == cuda::Path::Mma) {
    dx = at::empty({dyc.size(0), s.K}, dy.options());
    at::Tensor ws;
    if (plan.splits > 1) ws = at::empty({plan.splits * p.M * p.K}, dy.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::lut_linear_dx_mma(p, dyc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                           lut.const_data_ptr(), lut_type, dx.mutable_data_ptr(), plan.block_m,
                                           plan.splits, ws.defined() ? ws.mutable_data_ptr<float>() : nullptr,
                                           stream));
  } else {
    dx = at::empty({dyc.size(0), s.K}, dy.options());
    C10_CUDA_CHECK(cuda::lut_linear_dx(p, dyc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                       lut.const_data_ptr(), lut_type, dx.mutable_data_ptr(), stream));
  }
  return with_token_dims(dx, dy.sizes(), s.K);
}

at::Tensor lut_grad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,
                         int64_t groups_per_row, int64_t num_entries, bool deterministic_arg) {
  constexpr const char* op = "spallm.lut_grad";
  // torch.use_deterministic_algorithms(True) holds for direct op calls too, not only for callers
  // that pass the flag through (spallm_ext.ops does).
  const bool deterministic = deterministic_arg || at::globalContext().deterministicAlgorithms();
  const LutShape s = check_codes_groups(op, codes, groups_per_row, num_entries);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/false);
  check_activation(op, "x", x, s.K, /*allow_double=*/false);
  check_same_device(op, "dy", dy, "codes", codes);
  check_same_device(op, "x", x, "codes", codes);
  SPALLM_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), op, ": arguments 'dy' and 'x' must have one dtype, got ",
                    dy.scalar_type(), " and ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = kernel_tokens(dy);
  const at::Tensor xc = kernel_tokens(x);
  SPALLM_CHECK_VALUE(dyc.size(0) == xc.size(0), op, ": arguments 'dy' and 'x' must have the same number of "
                     "tokens, got ", dyc.size(0), " and ", xc.size(0));
  const cuda::LutProblem p = problem(s, xc.size(0));
  const cuda::DType act = cuda_dtype(op, "x", x);
  cuda::CallInfo call;
  call.act = act;
  call.act_ptr = address(dyc);
  call.out_ptr = address(xc);
  call.codes_ptr = address(codes);
  const cuda::Plan plan = cuda::plan_lut_grad(p, call, device_info(x.device()));
  t_last_plan = plan;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (plan.path == cuda::Path::Mma) {
    // Atomic mode accumulates into zeros; deterministic mode writes every element from a
    // [column tile, N, 2^b] workspace of per-tile sums.
    at::Tensor dlut = deterministic ? at::empty({s.N, s.G, s.E}, x.options().dtype(at::kFloat))
                                    : at::zeros({s.N, s.G, s.E}, x.options().dtype(at::kFloat));
    at::Tensor ws;
    if (deterministic) ws = at::empty({s.K / 64 * s.N * s.E}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::lut_grad_mma(p, dyc.const_data_ptr(), xc.const_data_ptr(), act,
                                      codes.const_data_ptr<uint8_t>(), dlut.mutable_data_ptr<float>(),
                                      ws.defined() ? ws.mutable_data_ptr<float>() : nullptr, stream));
    return dlut;
  }
  // Every element is written by the simple kernel, zeros included; it is always deterministic.
  at::Tensor dlut = at::empty({s.N, s.G, s.E}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::lut_grad(p, dyc.const_data_ptr(), xc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                dlut.mutable_data_ptr<float>(), deterministic, stream));
  return dlut;
}

at::Tensor lut_decode_cuda(const at::Tensor& codes, const at::Tensor& lut) {
  constexpr const char* op = "spallm.lut_decode";
  const LutShape s = check_codes_lut_cuda(op, codes, lut);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor w = at::empty({s.N, s.K}, lut.options());
  const cuda::LutProblem p = problem(s, 0);
  const cuda::DType lut_type = cuda_dtype(op, "lut", lut);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The fast decoder copies LUT values bit for bit too (out dtype == LUT dtype), so the choice never
  // changes the result; the simple kernel takes the shapes it rejects.
  if (cuda::forced_path() != cuda::Path::Simple && cuda::fast_decode_supports(p, address(codes), address(w), nullptr)) {
    C10_CUDA_CHECK(cuda::lut_decode_fast(p, codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(), lut_type,
                                         w.mutable_data_ptr(), lut_type, stream));
  } else {
    C10_CUDA_CHECK(cuda::lut_decode(p, codes.const_data_ptr<uint8_t>(), lut.const_data_ptr(), lut_type,
                                    w.mutable_data_ptr(), stream));
  }
  return w;
}

// y = x W^T + (x l1) l2 (+ bias). On the mma path the branch is fused: t = x l1 comes from extra
// blocks of the LUT kernel that read the same x tiles (when K is split: cuda::lowrank_t_on_chip) or
// from one skinny fp32 GEMM first, and t l2 joins the accumulators before the single rounding (no
// pass over y). On decode_gemm (large M, 16-bit x) both products are cuBLAS GEMMs into one output, the
// second accumulating into the first (so y is rounded twice, as an unfused bf16 layer's would be).
// Other calls take the backend-independent composite of csrc/lowrank.cpp.
at::Tensor lut_linear_lowrank_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                                   const at::Tensor& l1, const at::Tensor& l2, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "spallm.lut_linear_lowrank";
  const LutShape s = check_lut_linear_lowrank(op, x, codes, lut, l1, l2, bias);
  cuda_dtype(op, "lut", lut);
  const c10::cuda::CUDAGuard guard(x.device());
  // The op's dtypes are its contract: autocast must not recast the GEMMs below.
  const NoAutocast no_autocast;
  const at::Tensor xc = kernel_tokens(x);
  const cuda::LutProblem p = problem(s, xc.size(0));
  const cuda::DType act = cuda_dtype(op, "x", x), lut_type = cuda_dtype(op, "lut", lut);
  const cuda::CallInfo call = call_info(act, lut_type, address(xc), codes);
  const cuda::Plan plan = cuda::plan_lut_linear(p, call, device_info(x.device()));
  const bool half = act != cuda::DType::F32;
  if (p.M == 0 || !(cuda::is_mma(plan.path) || (plan.path == cuda::Path::DecodeGemm && half))) {
    return lut_linear_lowrank_composite(x, codes, lut, l1, l2, bias);
  }
  t_last_plan = plan;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y;
  if (cuda::is_mma(plan.path)) {
    const at::Tensor l2f = l2.to(at::kFloat).contiguous();
    cuda::LowRank lr;
    lr.l2 = l2f.const_data_ptr<float>();
    lr.rank = l2f.size(0);
    const bool on_chip = cuda::lowrank_t_on_chip(plan);
    t_last_plan.branch = on_chip ? "t=on-chip" : "t=gemm";
    // Workspace: the y partials [splits, M, N], then (on chip) t's partials [splits, M, rank].
    const int64_t y_parts = plan.splits > 1 ? plan.splits * p.M * p.N : 0;
    const int64_t t_parts = on_chip ? plan.splits * p.M * lr.rank : 0;
    at::Tensor ws, t;
    if (y_parts + t_parts > 0) ws = at::empty({y_parts + t_parts}, x.options().dtype(at::kFloat));
    if (on_chip) {
      lr.l1 = l1.const_data_ptr();
      lr.l1_type = cuda_dtype(op, "l1", l1);
      lr.l1_stride_k = l1.stride(0);
      lr.l1_stride_r = l1.stride(1);
      lr.t_partials = ws.mutable_data_ptr<float>() + y_parts;
    } else {
      t = at::mm(xc.to(at::kFloat), l1.to(at::kFloat));  // [M, rank]
      lr.t = t.const_data_ptr<float>();
    }
    y = at::empty({p.M, s.N}, x.options());
    C10_CUDA_CHECK(cuda::lut_linear_mma(p, xc.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                        lut.const_data_ptr(), lut_type, bc.defined() ? bc.const_data_ptr() : nullptr,
                                        y.mutable_data_ptr(), cuda::mma_config(plan),
                                        y_parts > 0 ? ws.mutable_data_ptr<float>() : nullptr, lr, cuda::Segments{},
                                        stream));
  } else {
    const at::Tensor w = decode_weight(p, codes, lut, lut_type, act, x.options(), stream);
    y = bc.defined() ? at::addmm(bc, xc, w.t()) : at::mm(xc, w.t());
    y.addmm_(at::mm(xc, l1.to(x.scalar_type())), l2.to(x.scalar_type()));
  }
  return with_token_dims(y, x.sizes(), s.N);
}

SPALLM_DEFINE_ADAPTER_ENTRY_POINTS(cuda, lut_linear_cuda, lut_linear_dx_cuda, lut_grad_cuda)

// lut_linear with a LUT stack and adapter_index: when the mma path takes the batch, every adapter is
// served by one launch (tokens sorted by adapter, one block column per adapter segment) instead of
// one call per adapter, each of which would read all the codes again. Everything else, including
// every error, goes through the backend-independent routing of csrc/multi_adapter.cpp.
at::Tensor cuda_lut_linear_entry(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& adapter_index) {
  const NoAutocast no_autocast;
  if (!adapter_index.has_value() || lut.dim() != 4 || lut.size(0) < 1 || !lut.is_contiguous() || x.dim() < 1 ||
      !x.is_cuda()) {
    return cuda_lut_linear(x, codes, lut, bias, adapter_index);
  }
  constexpr const char* op = "spallm.lut_linear";
  const LutShape s = check_codes_lut_cuda(op, codes, lut.select(0, 0));
  check_activation(op, "x", x, s.K, /*allow_double=*/false);
  check_same_device(op, "x", x, "codes", codes);
  if (bias.has_value()) check_bias(op, *bias, x, s.N);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = as_tokens(x);
  const cuda::LutProblem p = problem(s, x2.size(0));
  const cuda::DType act = cuda_dtype(op, "x", x), lut_type = cuda_dtype(op, "lut", lut);
  const cuda::CallInfo call = call_info(act, lut_type, 0, codes);
  const int64_t adapters = lut.size(0);
  const cuda::Plan plan = cuda::plan_lut_linear_adapters(p, adapters, call, device_info(x.device()));
  if (!cuda::is_mma(plan.path) || p.M == 0 || (p.M + plan.block_m - 1) / plan.block_m + adapters > 65535) {
    return cuda_lut_linear(x, codes, lut, bias, adapter_index);
  }
  const AdapterOrder ao = sort_by_adapter(op, *adapter_index, p.M, adapters, codes);
  t_last_plan = plan;
  t_last_plan.branch = "adapters=one-launch";  // tells this launch from the per-adapter fallback
  const at::Tensor xs = x2.index_select(0, ao.order);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor ys = at::empty({p.M, s.N}, x.options());
  at::Tensor ws;
  if (plan.splits > 1) ws = at::empty({plan.splits * p.M * p.N}, x.options().dtype(at::kFloat));
  cuda::Segments seg;
  seg.offsets = ao.offsets.const_data_ptr<int64_t>();
  seg.count = adapters;
  seg.lut_stride = s.N * s.G * s.E;
  C10_CUDA_CHECK(cuda::lut_linear_mma(p, xs.const_data_ptr(), act, codes.const_data_ptr<uint8_t>(),
                                      lut.const_data_ptr(), lut_type, bc.defined() ? bc.const_data_ptr() : nullptr,
                                      ys.mutable_data_ptr(), cuda::mma_config(plan),
                                      ws.defined() ? ws.mutable_data_ptr<float>() : nullptr, cuda::LowRank{}, seg,
                                      at::cuda::getCurrentCUDAStream()));
  at::Tensor y = at::empty_like(ys);
  y.index_copy_(0, ao.order, ys);
  return with_token_dims(y, x.sizes(), s.N);
}

}  // namespace

// kernel_select.h: the Python-facing override of the dispatch and what the last call ran.
bool set_cuda_kernel(const std::string& name) {
  cuda::Path p;
  if (!cuda::path_from_name(name.c_str(), &p)) return false;
  cuda::set_forced_path(p);
  return true;
}

std::string cuda_kernel() { return cuda::path_name(cuda::forced_path()); }

bool set_lowrank_t(const std::string& mode) {
  if (mode != "auto" && mode != "gemm") return false;
  cuda::set_lowrank_t_gemm(mode == "gemm");
  return true;
}

std::string lowrank_t() { return cuda::lowrank_t_gemm() ? "gemm" : "auto"; }

std::vector<ThresholdRow> cuda_thresholds() {
  std::vector<ThresholdRow> rows;
  for (int t = 0; t < cuda::kThresholdCount; ++t) {
    const cuda::ThresholdSpec& s = cuda::kThresholdSpecs[t];
    rows.emplace_back(s.name, cuda::threshold(static_cast<cuda::Threshold>(t)), s.builtin, s.lo, s.hi);
  }
  return rows;
}

std::string set_cuda_threshold(const std::string& name, int64_t value) {
  const char* why = "";
  return cuda::set_threshold(name.c_str(), value, &why) ? std::string() : std::string(why);
}

std::string last_cuda_plan() {
  const cuda::Plan& p = t_last_plan;
  std::string s = cuda::path_name(p.path);
  if (cuda::is_mma(p.path)) {
    s += " block_m=" + std::to_string(p.block_m) + " splits=" + std::to_string(p.splits);
  }
  if (p.branch[0] != '\0') s += std::string(" ") + p.branch;
  return s + " (" + p.why + ")";
}

TORCH_LIBRARY_IMPL(spallm, CUDA, m) {
  m.impl("lut_linear", &cuda_lut_linear_entry);
  m.impl("lut_linear_dx", &cuda_lut_linear_dx);
  m.impl("lut_grad", &cuda_lut_grad);
  m.impl("lut_decode", &lut_decode_cuda);
  m.impl("lut_linear_lowrank", &lut_linear_lowrank_cuda);
}

}  // namespace spallm
