// Exact CPU kernels of the spallm ops (also the fallback users run without a GPU).
//
// All four ops share one idea: W is never built whole. Rows of W are decoded a tile at a time
// (about 1M values, 4 MB in fp32, so a tile stays in L2/L3) into the accumulation type, and the
// tile goes through BLAS (at::mm, already multi-threaded); the decode itself runs over rows with
// at::parallel_for (OpenMP). Memory beyond inputs and outputs is O(tile):
//   lut_linear:    y[:, tile]  = x  @ W_tile^T
//   lut_linear_dx: dx         += dy[:, tile] @ W_tile
//   lut_grad:      dW_tile     = dy[:, tile]^T @ x, then each row of dW_tile is reduced into its
//                  (group, code) buckets in column order: deterministic.
// Accumulation is fp32, or fp64 when the activations are fp64 (gradcheck).
//
// On x86-64 CPUs with AVX2 + FMA or AVX-512 (checked at run time) fp32 work takes the vector
// kernels of cpu/lut_simd.h: the decode above runs 8 (AVX2) or 16 (AVX-512) codes per short
// instruction sequence, and up to gemv_max_tokens tokens skip the tile and BLAS altogether: W is
// decoded in registers straight into FMAs with the tokens (a GEMV-style pass, memory traffic =
// the codes). kernels.set_cpu_kernel forces each path for tests and benchmarks.
//
// bf16 activations (bf16 models, and any model under CPU autocast) from bf16_min_tokens tokens on
// take bf16 tiles where the CPU multiplies bf16 natively: the vector decode writes W in bf16
// (exact for a bf16 LUT, an fp32 / fp16 LUT rounded once, as on the CUDA tensor cores) and torch's
// bf16 matmul (oneDNN; fp32 accumulation and one rounding) runs at about four times the fp32 rate
// on an AVX512-BF16 CPU (bench/bench_cpu.py). The backward ops do the same with bf16 dy (and x):
//   lut_linear_dx: dx[:, slab] = dy @ W[:, slab] over column slabs of W decoded to bf16, so every
//                  dx element is one GEMM's fp32 sum over all N rows, rounded once;
//   lut_grad:      dW tiles from the bf16 GEMM (each element rounded once to bf16, as nn.Linear's
//                  weight gradient is under autocast), reduced into the buckets in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "checks.h"
#include "codes.h"
#include "cpu/lut_simd.h"
#include "kernel_select.h"
#include "multi_adapter.h"

namespace spallm {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 20;

// The CPU dispatch rules, measured on 4096 x 4096 and 11008 x 4096 (3- and 4-bit, G = 4) with the
// 2-core AVX-512 + AVX512-BF16 machine of bench/results/cpu_lut_linear.json:
// * Up to gemv_max_tokens tokens the fused vector pass beats decode + BLAS. With AVX2 the
//   crossover is about 24 tokens. The AVX-512 pass (sixteen weights per lookup, two rows per x
//   load, token blocks inside 32-row chunks so a row group's x sweep stays in L2) keeps
//   about 0.11 ms per token on 4096 x 4096 4-bit from 8 tokens on and beats decode + BLAS at
//   every size measured: 7.1 vs 13.7 ms at 64 tokens, 14.9 vs 24.4 at 128, 128 vs 184 at 1024,
//   592 vs 735 at 4096 (3-bit: 41.6 vs 46.2 at 256), so it serves everything up to 4096.
// * From bf16_min_tokens tokens a bf16 model takes the bf16 tiles instead (where they apply):
//   decoding all of W once per call then costs less than the register pass's fp32 FMAs. The
//   crossover is 6 to 8 tokens against the AVX2 pass, 12 to 16 against the AVX-512 one.
// These are the built-in rules; spallm_ext.kernels.set_dispatch_thresholds("cpu", ...) and tuning
// files (`spallm-ext tune --device cpu`, which measures the crossovers on the machine at hand)
// override them for whichever vector kernels run.
enum CpuThreshold : int { kGemvMax = 0, kBf16Min, kBf16GemvMin, kBf16GemvMax, kCpuThresholdCount };
constexpr const char* kCpuThresholdNames[kCpuThresholdCount] = {"gemv_max_tokens", "bf16_min_tokens",
                                                                "bf16_gemv_min_tokens", "bf16_gemv_max_tokens"};
constexpr int64_t kCpuThresholdLow[kCpuThresholdCount] = {0, 1, 1, 0};
constexpr int64_t kAnyTokens = int64_t(1) << 40;
std::atomic<int64_t> g_cpu_threshold[kCpuThresholdCount] = {{-1}, {-1}, {-1}, {-1}};  // -1: the rule

int64_t cpu_threshold(CpuThreshold t, int64_t builtin) {
  const int64_t v = g_cpu_threshold[t].load();
  return v >= 0 ? v : builtin;
}

// The built-in rules, by the vector width of the kernels that run (16: AVX-512, 8: AVX2).
int64_t builtin_gemv_max_tokens(int width) { return width >= 16 ? 4096 : 16; }
int64_t builtin_bf16_min_tokens(int width) { return width >= 16 ? 16 : 8; }

int64_t gemv_max_tokens(const cpu::VectorKernels& vec) {
  return cpu_threshold(kGemvMax, builtin_gemv_max_tokens(vec.width));
}
int64_t bf16_min_tokens(const cpu::VectorKernels& vec) {
  return cpu_threshold(kBf16Min, builtin_bf16_min_tokens(vec.width));
}

// Up to this many tokens a bf16 model on an AVX512-BF16 CPU takes the fused pass on bf16 dot
// products (avx512bf16_gemv) instead of the fp32 pass or the bf16 tiles: on 4096 x 4096 (4-bit,
// G = 4) 0.48 ms at 8 tokens (fp32 pass 0.89, dense bf16 matmul 1.10), 1.6 ms at 24 (bf16 tiles
// 2.3-2.7), 2.1 at 32 (tiles 2.5-2.9), even at 40 (3.4 vs 3.3), behind from 48 (3.8 vs 3.6).
constexpr int64_t kBf16GemvMaxTokens = 32;
// ... and from this many (a tuning knob; single tokens measured even or faster on the dot products
// once an fp32 LUT no longer took a separate rounding pass, bench/results/tune_cpu*.json).
constexpr int64_t kBf16GemvMinTokens = 1;

enum class CpuPath { kAuto, kPortable, kAvx2, kAvx512, kBf16, kAvx512Bf16 };
std::atomic<CpuPath> g_cpu_path{CpuPath::kAuto};
thread_local std::string g_last_cpu_plan = "none";

// The vector kernels a sketch with this group size takes on the current path: the widest this CPU
// has that fits the group size (AVX-512 needs groups of 16 columns, AVX2 of 8), only AVX2 when
// "avx2" is forced, none on "portable".
const cpu::VectorKernels* vector_kernels(const LutShape& s) {
  const CpuPath p = g_cpu_path.load();
  if (p == CpuPath::kPortable) return nullptr;
  // "avx512bf16" runs the AVX-512 kernels for everything but its bf16 dot-product pass.
  const cpu::VectorKernels* wide = p == CpuPath::kAvx2 ? nullptr : cpu::avx512_kernels();
  if (wide != nullptr && wide->supports(s.group_size)) return wide;
  const cpu::VectorKernels* narrow = cpu::avx2_kernels();
  return narrow != nullptr && narrow->supports(s.group_size) ? narrow : nullptr;
}

// What this call's fp32 work runs on (nullptr: the portable kernels).
const cpu::VectorKernels* vector_kernels(const LutShape& s, at::ScalarType acc) {
  return acc == at::kFloat ? vector_kernels(s) : nullptr;
}

std::string plan_name(const cpu::VectorKernels* vec, const char* what) {
  return std::string(vec != nullptr ? vec->name : "portable") + what;
}

// The bf16 dot-product pass for a bf16 model's forward at kBf16GemvMinTokens..kBf16GemvMaxTokens tokens, on
// "auto" and "avx512bf16" (which otherwise runs the AVX-512 kernels); nullptr where it does not apply
// (no AVX512-BF16, group size not a multiple of 32, other dtypes or paths).
const cpu::VectorKernels* bf16_gemv_kernels(const LutShape& s, at::ScalarType act, int64_t M) {
  const CpuPath p = g_cpu_path.load();
  if (act != at::kBFloat16 || M < cpu_threshold(kBf16GemvMin, kBf16GemvMinTokens) ||
      M > cpu_threshold(kBf16GemvMax, kBf16GemvMaxTokens) ||
      (p != CpuPath::kAuto && p != CpuPath::kAvx512Bf16)) {
    return nullptr;
  }
  const cpu::VectorKernels* k = cpu::avx512bf16_kernels();
  return k != nullptr && k->supports(s.group_size) ? k : nullptr;
}

// f(begin, end) over ranges of W's rows, about 64K weights x tokens per task, so small layers stay
// on one thread: how the fused passes split their work.
template <typename F>
void for_row_ranges(const LutShape& s, int64_t M, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(s.K * M, 1));
  at::parallel_for(0, s.N, grain, f);
}

// "avx512bf16" needs the dot-product kernels and the AVX-512 ones it runs beside them.
bool avx512bf16_path_available() { return cpu::avx512bf16_kernels() != nullptr && cpu::avx512_kernels() != nullptr; }

// "bf16" can be forced on any AVX2 CPU (oneDNN, or ATen without it, then converts), so its results
// are testable everywhere; "auto" takes it only where it is fast: native bf16 dot products and a
// torch whose bf16 matmul goes to oneDNN.
bool bf16_path_available() { return cpu::avx2_available(); }

bool use_bf16_tiles() {
  const CpuPath p = g_cpu_path.load();
  if (p == CpuPath::kBf16) return bf16_path_available();
  return p == CpuPath::kAuto && cpu::native_bf16_available() && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn();
}

// The vector kernels' view of rows of a sketch (`codes` and `lut32`, fp32, may be row slices:
// rows then count from the slice's first); `lut32` must stay alive while it is used.
cpu::CodeRows code_rows(const LutShape& s, const at::Tensor& codes, const at::Tensor& lut32) {
  cpu::CodeRows w;
  w.codes = codes.data_ptr<uint8_t>();
  w.lut = lut32.data_ptr<float>();
  w.N = codes.size(0);
  w.K = s.K;
  w.G = s.G;
  w.E = s.E;
  w.group_size = s.group_size;
  w.row_bytes = s.row_bytes;
  w.bits = s.bits;
  return w;
}

// Whether an op whose activations have dtype `act` (x; dy for lut_linear_dx; dy and x for
// lut_grad) and M tokens takes the bf16 tiles: bf16 activations, vector kernels for the sketch, and
// enough tokens. W then goes to the GEMM in bf16: exact for a bf16 LUT, rounded once (to nearest
// even) for an fp32 or fp16 one, as the CUDA tensor-core kernels and nn.Linear under autocast do.
bool bf16_tiles_apply(const LutShape& s, at::ScalarType act, int64_t M) {
  if (act != at::kBFloat16 || !use_bf16_tiles()) return false;
  const cpu::VectorKernels* vec = vector_kernels(s);
  return vec != nullptr && M >= bf16_min_tokens(*vec);
}

// Rows of a LUT as the vector decode reads them: fp32, first rounded to bf16 when the decode
// writes bf16 (its bf16 store keeps the high half of each fp32 word, exact only for bf16 values).
at::Tensor lut_for_decode(const at::Tensor& lut_rows, bool to_bf16) {
  const at::Tensor l = to_bf16 && lut_rows.scalar_type() != at::kBFloat16 ? lut_rows.to(at::kBFloat16) : lut_rows;
  return l.to(at::kFloat).contiguous();
}

int64_t tile_rows(const LutShape& s) {
  return std::max<int64_t>(1, std::min<int64_t>(s.N, kTileElems / std::max<int64_t>(s.K, 1)));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// f(c, code of column c) for columns c0 <= c < c1 of one packed row, in column order. Whole
// 8-column chunks (BITS bytes each, csrc/codes.h) go with the column inside the chunk a constant,
// so every code is a fixed shift and mask of one byte with no per-column index arithmetic; a start
// or end off the chunk grid takes the per-column form.
template <int BITS, typename F>
inline void for_each_code(const uint8_t* crow, int64_t c0, int64_t c1, F&& f) {
  int64_t c = c0;
  if (c0 % 8 == 0) {
    for (; c + 8 <= c1; c += 8) {
      const uint8_t* chunk = crow + c / 8 * BITS;
      for (int j = 0; j < 8; ++j) f(c + j, code_at<BITS>(chunk, j));
    }
  }
  for (; c < c1; ++c) f(c, code_at<BITS>(crow, c));
}

// out[r - r0, c] = lut[r, c / group_size, code[r, c]] for rows r0 .. r0 + rows.
template <int BITS, typename lut_t, typename out_t>
void decode_rows(const LutShape& s, const uint8_t* codes, const lut_t* lut, int64_t r0, int64_t rows,
                 out_t* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* crow = codes + (r0 + i) * s.row_bytes;
      const lut_t* lrow = lut + (r0 + i) * s.G * s.E;
      out_t* orow = out + i * s.K;
      for (int64_t g = 0; g < s.G; ++g) {
        const lut_t* table = lrow + g * s.E;
        for_each_code<BITS>(crow, g * s.group_size, (g + 1) * s.group_size,
                            [&](int64_t c, int code) { orow[c] = static_cast<out_t>(table[code]); });
      }
    }
  });
}

// Rows r0 .. r0 + rows of W as a fresh [rows, K] tensor of dtype `out_type`.
at::Tensor decode_tile(const LutShape& s, const at::Tensor& codes, const at::Tensor& lut, int64_t r0,
                       int64_t rows, at::ScalarType out_type) {
  at::Tensor out = at::empty({rows, s.K}, lut.options().dtype(out_type));
  // The vector decode writes fp32 or bf16.
  const bool to_bf16 = out_type == at::kBFloat16;
  const cpu::VectorKernels* vec = vector_kernels(s);
  if ((out_type == at::kFloat || to_bf16) && vec != nullptr) {
    // Only this tile's LUT rows are converted (a no-op for an fp32 LUT and fp32 output).
    const at::Tensor lut32 = lut_for_decode(lut.narrow(0, r0, rows), to_bf16);
    const cpu::CodeRows w = code_rows(s, codes.narrow(0, r0, rows), lut32);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      if (to_bf16) {
        auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
        vec->decode_bf16(w, begin, end, 0, s.K, o + begin * s.K);
      } else {
        vec->decode(w, begin, end, 0, s.K, out.data_ptr<float>() + begin * s.K);
      }
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lut.scalar_type(), "spallm_decode_lut", [&] {
    using lut_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "spallm_decode_out", [&] {
      SPALLM_DISPATCH_BITS(s.bits, [&] {
        decode_rows<BITS>(s, codes.data_ptr<uint8_t>(), lut.data_ptr<lut_t>(), r0, rows,
                          out.data_ptr<scalar_t>());
      });
    });
  });
  return out;
}

// y[:, tile] = xt W_tile^T (+ bias[tile]) over the row tiles of W, each tile decoded into xt's dtype
// (fp32/fp64, or bf16 for the bf16 tiles). addmm adds the bias to the accumulator before the
// product's one rounding.
void tiled_linear(const LutShape& s, const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& xt,
                  const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t step = tile_rows(s);
  for (int64_t r0 = 0; r0 < s.N; r0 += step) {
    const int64_t rows = std::min(step, s.N - r0);
    const at::Tensor w = decode_tile(s, codes, lut, r0, rows, xt.scalar_type());
    y.narrow(1, r0, rows).copy_(bias.has_value() ? at::addmm(bias->narrow(0, r0, rows), xt, w.t())
                                                  : at::mm(xt, w.t()));
  }
}

at::Tensor lut_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                          const std::optional<at::Tensor>& bias) {
  const NoAutocast no_autocast;
  constexpr const char* op = "spallm.lut_linear";
  const LutShape s = check_codes_lut(op, codes, lut);
  check_activation(op, "x", x, s.K, /*allow_double=*/true);
  check_same_device(op, "x", x, "codes", codes);
  if (bias.has_value()) check_bias(op, *bias, x, s.N);
  if (const cpu::VectorKernels* dot = bf16_gemv_kernels(s, x.scalar_type(), as_tokens(x).size(0))) {
    // W rounded to bf16 once (exact for a bf16 LUT), products exact, fp32 sums, one rounding of y.
    g_last_cpu_plan = plan_name(dot, "_gemv");
    const at::Tensor xb = as_tokens(x).contiguous();
    const int64_t M = xb.size(0);
    at::Tensor y = at::empty({M, s.N}, x.options().dtype(at::kFloat));
    // No separate rounding pass over an fp32 LUT: the kernel's vcvtne2ps2bf16 rounds each looked-up
    // value to nearest even, as lut.to(bf16) would (a pass that cost one token's call ~15 % on a
    // 4096 x 4096 G = 4 layer).
    const at::Tensor lut32 = lut.to(at::kFloat).contiguous();
    const cpu::CodeRows w = code_rows(s, codes, lut32);
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    float* yp = y.data_ptr<float>();
    for_row_ranges(s, M, [&](int64_t begin, int64_t end) { dot->gemv_bf16(w, xp, M, begin, end, yp); });
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    return with_token_dims(y.to(at::kBFloat16), x.sizes(), s.N);
  }
  if (bf16_tiles_apply(s, x.scalar_type(), as_tokens(x).size(0))) {
    g_last_cpu_plan = "bf16_tiles";
    const at::Tensor xb = as_tokens(x).contiguous();
    at::Tensor y = at::empty({xb.size(0), s.N}, x.options());
    tiled_linear(s, codes, lut, xb, bias, y);
    return with_token_dims(y, x.sizes(), s.N);
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor xa = as_tokens(x).to(acc).contiguous();
  const int64_t M = xa.size(0);
  at::Tensor y = at::empty({M, s.N}, x.options().dtype(acc));
  const cpu::VectorKernels* vec = vector_kernels(s, acc);
  if (vec != nullptr && M > 0 && M <= gemv_max_tokens(*vec)) {
    g_last_cpu_plan = plan_name(vec, "_gemv");
    const at::Tensor lut32 = lut.to(at::kFloat).contiguous();
    const cpu::CodeRows w = code_rows(s, codes, lut32);
    const float* xp = xa.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_row_ranges(s, M, [&](int64_t begin, int64_t end) { vec->gemv(w, xp, M, begin, end, yp); });
    if (bias.has_value()) y.add_(bias->to(acc));
  } else if (M > 0) {
    g_last_cpu_plan = plan_name(vec, "_tiles");
    tiled_linear(s, codes, lut, xa, bias.has_value() ? std::optional<at::Tensor>(bias->to(acc)) : std::nullopt, y);
  }
  return with_token_dims(y.to(x.scalar_type()), x.sizes(), s.N);
}

// dx = dy W for bf16 dy [M, N], over column slabs of W: each slab W[:, c0:c1] (all N rows, about
// kTileElems weights) is decoded to bf16 and dx[:, c0:c1] = dy W[:, c0:c1] is one bf16 GEMM, so
// every dx element comes from one fp32 accumulation over all N rows and one rounding (row tiles
// would round partial sums once per tile or need an fp32 product a bf16 GEMM does not give).
at::Tensor bf16_dx(const LutShape& s, const at::Tensor& dyb, const at::Tensor& codes, const at::Tensor& lut) {
  const cpu::VectorKernels* vec = vector_kernels(s);
  const int64_t width = vec->width;
  const int64_t step = std::max<int64_t>(width, kTileElems / std::max<int64_t>(s.N, 1) / width * width);
  const at::Tensor lut32 = lut_for_decode(lut, /*to_bf16=*/true);
  const cpu::CodeRows w = code_rows(s, codes, lut32);
  at::Tensor dx = at::empty({dyb.size(0), s.K}, dyb.options());
  for (int64_t c0 = 0; c0 < s.K; c0 += step) {
    const int64_t c1 = std::min(s.K, c0 + step);
    at::Tensor slab = at::empty({s.N, c1 - c0}, dyb.options());
    auto* o = reinterpret_cast<uint16_t*>(slab.data_ptr<at::BFloat16>());
    at::parallel_for(0, s.N, 16, [&](int64_t begin, int64_t end) {
      vec->decode_bf16(w, begin, end, c0, c1, o + begin * (c1 - c0));
    });
    dx.narrow(1, c0, c1 - c0).copy_(at::mm(dyb, slab));
  }
  return dx;
}

at::Tensor lut_linear_dx_cpu(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& lut) {
  const NoAutocast no_autocast;
  constexpr const char* op = "spallm.lut_linear_dx";
  const LutShape s = check_codes_lut(op, codes, lut);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/true);
  check_same_device(op, "dy", dy, "codes", codes);
  if (bf16_tiles_apply(s, dy.scalar_type(), as_tokens(dy).size(0))) {
    g_last_cpu_plan = "bf16_tiles";
    return with_token_dims(bf16_dx(s, as_tokens(dy).contiguous(), codes, lut), dy.sizes(), s.K);
  }
  const at::ScalarType acc = acc_type(dy.scalar_type());
  const at::Tensor dya = as_tokens(dy).to(acc).contiguous();
  const int64_t M = dya.size(0);
  at::Tensor dx = at::zeros({M, s.K}, dy.options().dtype(acc));
  if (M > 0) {
    g_last_cpu_plan = plan_name(vector_kernels(s, acc), "_tiles");
    const int64_t step = tile_rows(s);
    for (int64_t r0 = 0; r0 < s.N; r0 += step) {
      const int64_t rows = std::min(step, s.N - r0);
      dx.addmm_(dya.narrow(1, r0, rows), decode_tile(s, codes, lut, r0, rows, acc));
    }
  }
  return with_token_dims(dx.to(dy.scalar_type()), dy.sizes(), s.K);
}

template <int BITS, typename acc_t, typename dw_t>
void reduce_into_buckets(const LutShape& s, const uint8_t* codes, const dw_t* dw, int64_t r0,
                         int64_t rows, acc_t* dlut) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* crow = codes + (r0 + i) * s.row_bytes;
      const dw_t* drow = dw + i * s.K;
      acc_t* lrow = dlut + (r0 + i) * s.G * s.E;
      for (int64_t g = 0; g < s.G; ++g) {
        acc_t* bucket = lrow + g * s.E;
        for_each_code<BITS>(crow, g * s.group_size, (g + 1) * s.group_size,
                            [&](int64_t c, int code) { bucket[code] += static_cast<acc_t>(drow[c]); });
      }
    }
  });
}

// Always deterministic (fixed-order bucket sums), so `deterministic` changes nothing here.
at::Tensor lut_grad_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& codes,
                        int64_t groups_per_row, int64_t num_entries, bool /*deterministic*/) {
  const NoAutocast no_autocast;
  constexpr const char* op = "spallm.lut_grad";
  const LutShape s = check_codes_groups(op, codes, groups_per_row, num_entries);
  check_activation(op, "dy", dy, s.N, /*allow_double=*/true);
  check_activation(op, "x", x, s.K, /*allow_double=*/true);
  check_same_device(op, "dy", dy, "codes", codes);
  check_same_device(op, "x", x, "codes", codes);
  SPALLM_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), op, ": arguments 'dy' and 'x' must have one dtype, got ",
                    dy.scalar_type(), " and ", x.scalar_type());
  // bf16 activations on the bf16 path: dW tiles from torch's bf16 GEMM (fp32 accumulation, each
  // dW element rounded once to bf16, as nn.Linear's weight gradient is under autocast), summed
  // into the buckets in fp32.
  const bool bf16 = bf16_tiles_apply(s, x.scalar_type(), as_tokens(x).size(0));
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::ScalarType work = bf16 ? at::kBFloat16 : acc;
  const at::Tensor dya = as_tokens(dy).to(work);
  const at::Tensor xa = as_tokens(x).to(work).contiguous();
  SPALLM_CHECK_VALUE(dya.size(0) == xa.size(0), op, ": arguments 'dy' and 'x' must have the same number of "
                     "tokens, got ", dya.size(0), " and ", xa.size(0));
  at::Tensor dlut = at::zeros({s.N, s.G, s.E}, x.options().dtype(acc));
  if (xa.size(0) == 0) return dlut;
  g_last_cpu_plan = bf16 ? "bf16_tiles" : "portable_tiles";  // no decode here: the fp32 work is the portable one
  const int64_t step = tile_rows(s);
  for (int64_t r0 = 0; r0 < s.N; r0 += step) {
    const int64_t rows = std::min(step, s.N - r0);
    const at::Tensor dw = at::mm(dya.narrow(1, r0, rows).t(), xa).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "spallm_lut_grad", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, work, "spallm_lut_grad_dw", [&] {
        SPALLM_DISPATCH_BITS(s.bits, [&] {
          reduce_into_buckets<BITS>(s, codes.data_ptr<uint8_t>(), dw.data_ptr<scalar_t>(), r0, rows,
                                    dlut.data_ptr<acc_t>());
        });
      });
    });
  }
  return dlut;
}

at::Tensor lut_decode_cpu(const at::Tensor& codes, const at::Tensor& lut) {
  const LutShape s = check_codes_lut("spallm.lut_decode", codes, lut);
  return decode_tile(s, codes, lut, 0, s.N, lut.scalar_type());
}

SPALLM_DEFINE_ADAPTER_ENTRY_POINTS(cpu, lut_linear_cpu, lut_linear_dx_cpu, lut_grad_cpu)

}  // namespace

bool set_cpu_kernel(const std::string& name) {
  if (name == "auto") {
    g_cpu_path = CpuPath::kAuto;
  } else if (name == "portable") {
    g_cpu_path = CpuPath::kPortable;
  } else if (name == "avx2" && cpu::avx2_kernels() != nullptr) {
    g_cpu_path = CpuPath::kAvx2;
  } else if (name == "avx512" && cpu::avx512_kernels() != nullptr) {
    g_cpu_path = CpuPath::kAvx512;
  } else if (name == "bf16" && bf16_path_available()) {
    g_cpu_path = CpuPath::kBf16;
  } else if (name == "avx512bf16" && avx512bf16_path_available()) {
    g_cpu_path = CpuPath::kAvx512Bf16;
  } else {
    return false;
  }
  return true;
}

std::string cpu_kernel() {
  switch (g_cpu_path.load()) {
    case CpuPath::kPortable: return "portable";
    case CpuPath::kAvx2: return "avx2";
    case CpuPath::kAvx512: return "avx512";
    case CpuPath::kBf16: return "bf16";
    case CpuPath::kAvx512Bf16: return "avx512bf16";
    default: return "auto";
  }
}

std::vector<std::string> cpu_kernels() {
  std::vector<std::string> names{"auto", "portable"};
  if (cpu::avx2_kernels() != nullptr) names.push_back("avx2");
  if (cpu::avx512_kernels() != nullptr) names.push_back("avx512");
  if (bf16_path_available()) names.push_back("bf16");
  if (avx512bf16_path_available()) names.push_back("avx512bf16");
  return names;
}

std::string last_cpu_plan() { return g_last_cpu_plan; }

// Built-in values as the widest vector kernels of this CPU have them (none: no fused pass, 0).
std::vector<ThresholdRow> cpu_thresholds() {
  const cpu::VectorKernels* wide = cpu::avx512_kernels() != nullptr ? cpu::avx512_kernels() : cpu::avx2_kernels();
  const int width = wide != nullptr ? wide->width : 8;
  const int64_t builtin[kCpuThresholdCount] = {wide != nullptr ? builtin_gemv_max_tokens(width) : 0,
                                               builtin_bf16_min_tokens(width), kBf16GemvMinTokens,
                                               kBf16GemvMaxTokens};
  std::vector<ThresholdRow> rows;
  for (int t = 0; t < kCpuThresholdCount; ++t) {
    rows.emplace_back(kCpuThresholdNames[t], cpu_threshold(static_cast<CpuThreshold>(t), builtin[t]), builtin[t],
                      kCpuThresholdLow[t], kAnyTokens);
  }
  return rows;
}

std::string set_cpu_threshold(const std::string& name, int64_t value) {
  for (int t = 0; t < kCpuThresholdCount; ++t) {
    if (name != kCpuThresholdNames[t]) continue;
    if (value != -1 && (value < kCpuThresholdLow[t] || value > kAnyTokens)) return "value out of range";
    g_cpu_threshold[t].store(value);
    return "";
  }
  return "unknown threshold";
}

TORCH_LIBRARY_IMPL(spallm, CPU, m) {
  m.impl("lut_linear", &cpu_lut_linear);
  m.impl("lut_linear_dx", &cpu_lut_linear_dx);
  m.impl("lut_grad", &cpu_lut_grad);
  m.impl("lut_decode", &lut_decode_cpu);
}

}  // namespace spallm
