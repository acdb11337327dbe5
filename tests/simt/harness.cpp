// Runs the entry points of csrc/cuda/kernels.h on the SIMT emulator (simt.h), one case file at a
// time: `simt_kernels CASE...` reads each CASE and writes CASE.out. tests/simt_cases.py writes the
// cases and reads the results; tests/test_cuda_emulated.py compares them with the reference.
//
// A case file is text lines with raw tensor bytes in between:
//   simt-case
//   s <name> <word>           a string (the op)
//   i <name> <int64>          an integer
//   t <name> <nbytes>\n<raw bytes>\n
//   end
// The output file has the same form: the op's outputs as tensors, `i status <cudaError_t>` and
// `i launches <kernel launches>`.
//
// Every input tensor is copied into a malloc'd buffer of exactly its size and every output buffer
// starts as 0xFF bytes (NaN), so AddressSanitizer sees any access past a tensor and an element the
// kernel never writes stays NaN.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/dispatch.h"
#include "cuda/thresholds.h"
#include "cuda/kernels.h"

#if SIMT_FAST_SWITCH
// simt_switch(save_sp, load_sp): push the callee-saved registers and the SSE / x87 control words,
// store rsp in *save_sp, continue on the stack at load_sp (laid out the same way, or by
// simt::start_fiber for a new fiber).
asm(R"(
  .text
  .globl simt_switch
  .type simt_switch, @function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch, .-simt_switch
)");
#endif

cudaError_t simt_selftest(int which, const float* in, float* out);  // selftest.cu

namespace {

using spallm::cuda::DType;

struct Buffer {
  uint8_t* data = nullptr;
  size_t bytes = 0;
};

struct Case {
  std::map<std::string, std::string> strings;
  std::map<std::string, int64_t> ints;
  std::map<std::string, Buffer> tensors;

  int64_t get(const std::string& k, int64_t fallback) const {
    const auto it = ints.find(k);
    return it == ints.end() ? fallback : it->second;
  }
  int64_t need(const std::string& k) const {
    const auto it = ints.find(k);
    if (it == ints.end()) {
      std::fprintf(stderr, "case: missing integer %s\n", k.c_str());
      std::exit(2);
    }
    return it->second;
  }
  const uint8_t* in(const std::string& k) const {
    const auto it = tensors.find(k);
    return it == tensors.end() ? nullptr : it->second.data;
  }
};

Buffer alloc(size_t bytes, int fill) {
  Buffer b;
  b.bytes = bytes;
  b.data = static_cast<uint8_t*>(std::malloc(bytes > 0 ? bytes : 1));
  std::memset(b.data, fill, bytes);
  return b;
}

Case read_case(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) {
    std::perror(path);
    std::exit(2);
  }
  Case c;
  char kind[16], name[128], word[128];
  if (std::fscanf(f, "%15s", kind) != 1 || std::strcmp(kind, "simt-case") != 0) {
    std::fprintf(stderr, "%s: not a case file\n", path);
    std::exit(2);
  }
  while (std::fscanf(f, "%15s", kind) == 1 && std::strcmp(kind, "end") != 0) {
    if (std::fscanf(f, "%127s %127s", name, word) != 2) break;
    if (kind[0] == 's') {
      c.strings[name] = word;
    } else if (kind[0] == 'i') {
      c.ints[name] = std::strtoll(word, nullptr, 10);
    } else {
      const size_t n = std::strtoull(word, nullptr, 10);
      std::fgetc(f);  // the newline before the bytes
      Buffer b = alloc(n, 0);
      if (std::fread(b.data, 1, n, f) != n) {
        std::fprintf(stderr, "%s: short tensor %s\n", path, name);
        std::exit(2);
      }
      c.tensors[name] = b;
    }
  }
  std::fclose(f);
  return c;
}

void write_out(const std::string& path, const std::map<std::string, Buffer>& outs, int status) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fprintf(f, "simt-case\ni status %d\ni launches %lld\ni smem.divergent %lld\n", status, simt::launches,
               simt::smem_divergent);
  for (const auto& [site, st] : simt::smem_stats) {
    std::fprintf(f, "i smem.%s.requests %lld\ni smem.%s.wavefronts %lld\ni smem.%s.ideal %lld\n", site.c_str(),
                 st.requests, site.c_str(), st.wavefronts, site.c_str(), st.ideal);
  }
  for (const auto& [name, b] : outs) {
    std::fprintf(f, "t %s %zu\n", name.c_str(), b.bytes);
    std::fwrite(b.data, 1, b.bytes, f);
    std::fprintf(f, "\n");
  }
  std::fprintf(f, "end\n");
  std::fclose(f);
}

size_t dtype_bytes(int64_t t) { return t == static_cast<int64_t>(DType::F32) ? 4 : 2; }

float to_f(const uint8_t* base, int64_t i, DType t) {
  if (t == DType::F32) {
    float v;
    std::memcpy(&v, base + 4 * i, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, base + 2 * i, 2);
  if (t == DType::BF16) return __bfloat162float(__nv_bfloat16{h});
  return __half2float(__half{h});
}

void store_f(uint8_t* base, int64_t i, DType t, float v) {
  if (t == DType::F32) {
    std::memcpy(base + 4 * i, &v, 4);
  } else {
    const uint16_t h = t == DType::BF16 ? __float2bfloat16_rn(v).x : __float2half_rn(v).x;
    std::memcpy(base + 2 * i, &h, 2);
  }
}

// out[m, n] = sum_k a[m, k] b[n, k] (+ bias[n]) in fp32, rounded once: what ops.cpp's decode_gemm
// path gets from cuBLAS after the decode kernel (only the decode is the emulator's).
void host_gemm_nt(int64_t M, int64_t N, int64_t K, const uint8_t* a, const uint8_t* b, const uint8_t* bias, DType t,
                  uint8_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float s = bias != nullptr ? to_f(bias, n, t) : 0.f;
      for (int64_t k = 0; k < K; ++k) s += to_f(a, m * K + k, t) * to_f(b, n * K + k, t);
      store_f(out, m * N + n, t, s);
    }
  }
}

void record_plan(std::map<std::string, Buffer>& outs, const spallm::cuda::Plan& plan) {
  const std::string text = std::string(spallm::cuda::path_name(plan.path)) + " " + std::to_string(plan.block_m) + " " +
                           std::to_string(plan.splits);
  Buffer b = alloc(text.size(), 0);
  std::memcpy(b.data, text.data(), text.size());
  outs["plan"] = b;
}

// The dispatch of csrc/cuda/dispatch.cpp for a described device, then the kernels it picked: the
// same steps as ops.cpp, without torch (decode_gemm's GEMM on the host).
int run_auto(const Case& c, const spallm::cuda::LutProblem& p, DType act, DType lut_type, const std::string& op,
             std::map<std::string, Buffer>& outs) {
  namespace sc = spallm::cuda;
  sc::DeviceInfo d;
  d.sm_count = static_cast<int>(c.need("sm_count"));
  d.major = static_cast<int>(c.need("major"));
  d.minor = static_cast<int>(c.get("minor", 0));
  d.smem_per_block = c.get("smem_per_block", 0);
  const uint8_t* codes = c.in("codes");
  const void* lut = c.in("lut");
  const size_t ab = act == DType::F32 ? 4 : 2;
  sc::CallInfo call;
  call.act = act;
  call.lut = lut_type;
  call.codes_ptr = reinterpret_cast<uintptr_t>(codes);
  if (op == "grad_auto") {
    call.act_ptr = reinterpret_cast<uintptr_t>(c.in("dy"));
    call.out_ptr = reinterpret_cast<uintptr_t>(c.in("x"));
    const sc::Plan plan = sc::plan_lut_grad(p, call, d);
    record_plan(outs, plan);
    Buffer dlut = alloc((size_t(p.N) * p.G << p.bits) * 4, plan.path == sc::Path::Mma ? 0 : 0xFF);
    outs["dlut"] = dlut;
    float* out = reinterpret_cast<float*>(dlut.data);
    if (plan.path != sc::Path::Mma) return sc::lut_grad(p, c.in("dy"), c.in("x"), act, codes, out, true, nullptr);
    return sc::lut_grad_mma(p, c.in("dy"), c.in("x"), act, codes, out, nullptr, nullptr);
  }
  const bool dx = op == "dx_auto";
  const uint8_t* in = c.in(dx ? "dy" : "x");
  call.act_ptr = reinterpret_cast<uintptr_t>(in);
  const int64_t adapters = c.get("adapters", 1);
  // A case may set dispatch thresholds (thresholds.h names) for its plan; the rest keep the
  // built-in values (-1), as does the next case.
  for (const sc::ThresholdSpec& spec : sc::kThresholdSpecs) {
    if (!sc::set_threshold(spec.name, c.get(spec.name, -1), nullptr)) {
      std::fprintf(stderr, "case: threshold %s out of range\n", spec.name);
      std::exit(2);
    }
  }
  const sc::Plan plan = dx ? sc::plan_lut_linear_dx(p, call, d)
                           : adapters > 1 ? sc::plan_lut_linear_adapters(p, adapters, call, d)
                                          : sc::plan_lut_linear(p, call, d);
  for (const sc::ThresholdSpec& spec : sc::kThresholdSpecs) sc::set_threshold(spec.name, -1, nullptr);
  record_plan(outs, plan);
  const int64_t out_cols = dx ? p.K : p.N;
  Buffer y = alloc(p.M * out_cols * ab, 0xFF);
  outs[dx ? "dx" : "y"] = y;
  // A LUT stack off the mma path goes to csrc/multi_adapter.cpp (one call per adapter): only the plan.
  if (adapters > 1 && !sc::is_mma(plan.path)) return 0;
  if (plan.path == sc::Path::Simple) {
    return dx ? sc::lut_linear_dx(p, in, act, codes, lut, lut_type, y.data, nullptr)
              : sc::lut_linear(p, in, act, codes, lut, lut_type, c.in("bias"), y.data, nullptr);
  }
  if (plan.path == sc::Path::DecodeGemm) {
    Buffer w = alloc(p.N * p.K * ab, 0xFF);
    int status = sc::lut_decode_fast(p, codes, lut, lut_type, w.data, act, nullptr);
    if (status == 0) {
      if (dx) {
        // dx[m, k] = sum_n dy[m, n] W[n, k]: the GEMM on W^T
        Buffer wt = alloc(p.N * p.K * ab, 0xFF);
        for (int64_t n = 0; n < p.N; ++n) {
          for (int64_t k = 0; k < p.K; ++k) std::memcpy(wt.data + (k * p.N + n) * ab, w.data + (n * p.K + k) * ab, ab);
        }
        host_gemm_nt(p.M, p.K, p.N, in, wt.data, nullptr, act, y.data);
        std::free(wt.data);
      } else {
        host_gemm_nt(p.M, p.N, p.K, in, w.data, c.in("bias"), act, y.data);
      }
    }
    std::free(w.data);
    return status;
  }
  const int splits = plan.splits;
  Buffer ws;
  if (splits > 1) ws = alloc(size_t(splits) * p.M * out_cols * 4, 0xFF);
  int status;
  if (dx) {
    status = sc::lut_linear_dx_mma(p, in, act, codes, lut, lut_type, y.data, plan.block_m, splits,
                                   reinterpret_cast<float*>(ws.data), nullptr);
  } else {
    sc::Segments seg;
    seg.offsets = reinterpret_cast<const int64_t*>(c.in("offsets"));
    seg.count = adapters;
    seg.lut_stride = c.get("lut_stride", 0);
    status = sc::lut_linear_mma(p, in, act, codes, lut, lut_type, c.in("bias"), y.data, sc::mma_config(plan),
                                reinterpret_cast<float*>(ws.data), sc::LowRank{}, seg, nullptr);
  }
  std::free(ws.data);
  return status;
}

int run(const Case& c, std::map<std::string, Buffer>& outs) {
  spallm::cuda::LutProblem p;
  p.M = c.get("M", 0);
  p.N = c.get("N", 0);
  p.K = c.get("K", 0);
  p.G = c.get("G", 1);
  p.row_bytes = c.get("row_bytes", 0);
  p.bits = static_cast<int>(c.get("bits", 4));
  const DType act = static_cast<DType>(c.get("act", 0));
  const DType lut_type = static_cast<DType>(c.get("lut_type", 0));
  const uint8_t* codes = c.in("codes");
  const void* lut = c.in("lut");
  const std::string op = c.strings.at("op");
  cudaStream_t stream = nullptr;
  if (op == "selftest") {
    Buffer out = alloc(64 * 4, 0xFF);
    outs["out"] = out;
    return simt_selftest(static_cast<int>(c.need("which")), reinterpret_cast<const float*>(c.in("in")),
                         reinterpret_cast<float*>(out.data));
  }
  const size_t act_bytes = dtype_bytes(c.get("act", 0));

  if (op == "linear_auto" || op == "dx_auto" || op == "grad_auto") return run_auto(c, p, act, lut_type, op, outs);
  if (op == "linear_mma" || op == "linear") {
    Buffer y = alloc(p.M * p.N * act_bytes, 0xFF);
    outs["y"] = y;
    if (op == "linear") {
      return spallm::cuda::lut_linear(p, c.in("x"), act, codes, lut, lut_type, c.in("bias"), y.data, stream);
    }
    spallm::cuda::MmaConfig config;
    config.block_m = static_cast<int>(c.need("block_m"));
    config.splits = static_cast<int>(c.need("splits"));
    // regs: 0 the tile decode, 1 the register decode with its shared-memory code ring, 2 with codes
    // loaded straight into registers.
    config.regs = c.need("regs") != 0;
    config.codes_direct = c.need("regs") == 2;
    Buffer ws;
    if (config.splits > 1) ws = alloc(config.splits * p.M * p.N * 4, 0xFF);
    spallm::cuda::LowRank lr;
    lr.rank = c.get("rank", 0);
    lr.t = reinterpret_cast<const float*>(c.in("t"));
    lr.l1 = c.in("l1");
    lr.l1_type = static_cast<DType>(c.get("l1_type", 0));
    lr.l1_stride_k = c.get("l1_stride_k", 0);
    lr.l1_stride_r = c.get("l1_stride_r", 0);
    lr.l2 = reinterpret_cast<const float*>(c.in("l2"));
    Buffer tp;
    if (lr.l1 != nullptr) {
      tp = alloc(config.splits * p.M * lr.rank * 4, 0xFF);
      lr.t_partials = reinterpret_cast<float*>(tp.data);
    }
    spallm::cuda::Segments seg;
    seg.offsets = reinterpret_cast<const int64_t*>(c.in("offsets"));
    seg.count = c.get("adapters", 1);
    seg.lut_stride = c.get("lut_stride", 0);
    const int status = spallm::cuda::lut_linear_mma(p, c.in("x"), act, codes, lut, lut_type, c.in("bias"), y.data,
                                                    config, reinterpret_cast<float*>(ws.data), lr, seg, stream);
    std::free(ws.data);
    std::free(tp.data);
    return status;
  }
  if (op == "dx_mma" || op == "dx") {
    Buffer dx = alloc(p.M * p.K * act_bytes, 0xFF);
    outs["dx"] = dx;
    if (op == "dx") return spallm::cuda::lut_linear_dx(p, c.in("dy"), act, codes, lut, lut_type, dx.data, stream);
    const int splits = static_cast<int>(c.need("splits"));
    Buffer ws;
    if (splits > 1) ws = alloc(splits * p.M * p.K * 4, 0xFF);
    const int status = spallm::cuda::lut_linear_dx_mma(p, c.in("dy"), act, codes, lut, lut_type, dx.data,
                                                       static_cast<int>(c.need("block_m")), splits,
                                                       reinterpret_cast<float*>(ws.data), stream);
    std::free(ws.data);
    return status;
  }
  if (op == "grad_mma" || op == "grad") {
    const bool deterministic = c.get("deterministic", 1) != 0;
    const size_t entries = size_t(p.N) * p.G << p.bits;
    // The atomic mode adds into dlut, which the caller zero-fills; the others must write it all.
    Buffer dlut = alloc(entries * 4, op == "grad_mma" && !deterministic ? 0 : 0xFF);
    outs["dlut"] = dlut;
    float* out = reinterpret_cast<float*>(dlut.data);
    if (op == "grad") return spallm::cuda::lut_grad(p, c.in("dy"), c.in("x"), act, codes, out, true, stream);
    Buffer ws;
    if (deterministic) ws = alloc(size_t(p.K / 64) * p.N * (size_t(1) << p.bits) * 4, 0xFF);
    const int status = spallm::cuda::lut_grad_mma(p, c.in("dy"), c.in("x"), act, codes, out,
                                                  reinterpret_cast<float*>(ws.data), stream);
    std::free(ws.data);
    return status;
  }
  if (op == "decode_fast" || op == "decode") {
    const int64_t out_type = c.get("out_type", c.get("lut_type", 0));
    Buffer w = alloc(p.N * p.K * dtype_bytes(out_type), 0xFF);
    outs["w"] = w;
    if (op == "decode") return spallm::cuda::lut_decode(p, codes, lut, lut_type, w.data, stream);
    return spallm::cuda::lut_decode_fast(p, codes, lut, lut_type, w.data, static_cast<DType>(out_type), stream);
  }
  std::fprintf(stderr, "case: unknown op %s\n", op.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const Case c = read_case(argv[i]);
    simt::options.order = static_cast<simt::Order>(c.get("order", 0));
    simt::options.late_copies = c.get("late_copies", 1) != 0;
    simt::options.warp_serial = c.get("warp_serial", 0) != 0;
    simt::options.seed = static_cast<unsigned>(c.get("seed", 1));
    simt::launches = 0;
    simt::smem_stats.clear();
    simt::smem_divergent = 0;
    std::map<std::string, Buffer> outs;
    const int status = run(c, outs);
    write_out(std::string(argv[i]) + ".out", outs, status);
    for (auto& [name, b] : outs) std::free(b.data);
    for (auto& [name, b] : c.tensors) std::free(b.data);
  }
  return 0;
}
