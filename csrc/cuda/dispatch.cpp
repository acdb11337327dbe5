// The dispatch rules of the CUDA backend (see dispatch.h for the paths).
//
// The token thresholds (thresholds.h) have built-in values from a roofline argument; on a given GPU
// `spallm-ext tune --device cuda` times every path and sets them from the crossovers it measures
// (spallm_ext/tuning.py), and bench/bench_forward.py measures the same paths for the record.
//   * M <= regs_max_tokens: mma_regs, whose decode costs one shared-memory lookup per weight
//     (the tile variant adds a store and an ldmatrix read: ~1/15 clock per weight and SM against
//     the ~1/26 at which 4-bit codes stream in from HBM), so the small-M calls stay memory-bound.
//     Up to direct_max_tokens its codes skip shared memory too (mma_regs_direct): at M = 1 that is
//     42 -> 34 bank wavefronts per 1024 weights, a shared-memory ceiling of ~104 % of HBM's 4-bit
//     code rate instead of ~84 % (bench/smem_traffic.py); the 32-token tile has no registers left
//     for a code ring, so 17..32 tokens keep the shared-memory one.
//   * M <= mma_max_tokens (dx: dx_mma_max_tokens), bf16/fp16, aligned shapes: the fused mma kernel.
//     Up to M ~ 64-128 the call is bound by reading the codes (4-bit: a quarter of bf16's bytes),
//     which only a fused kernel exploits; decode_gemm would write and re-read a bf16 W (4.5x the
//     codes' traffic).
//   * Larger M is compute-bound: decode_gemm costs one decode (~8-12% of a 14336 x 4096 GEMM at
//     M = 4096) on top of cuBLAS, which mma.sync kernels on Hopper do not beat.
//   * fp32 activations, or shapes the mma kernel rejects: decode_gemm once M >= decode_min_tokens
//     (the decode is amortized), else the simple kernel.
#include "cuda/dispatch.h"
#include "cuda/thresholds.h"

#include <atomic>
#include <cstring>

namespace spallm::cuda {
namespace {

constexpr int64_t kRegsTileMaxTokens = 32;    // mma_regs: its largest token tile
constexpr int64_t kDirectTileMaxTokens = 16;  // mma_regs_direct: its one token tile
constexpr int64_t kTileN = 128;            // rows of W per mma block (lut_mma.cu's kBlockN)
constexpr int64_t kTileK = 64;             // columns per mma K-step (lut_mma.cu's kBlockK)
constexpr int kMaxSplits = 32;
constexpr int64_t kFastDecodeMaxLutFloats = 12 * 1024;  // one row's LUT in 48 KB of shared memory

std::atomic<int> g_forced{static_cast<int>(Path::Auto)};
// -1: the built-in value of thresholds.h.
std::atomic<int64_t> g_threshold[kThresholdCount] = {{-1}, {-1}, {-1}, {-1}, {-1}};
std::atomic<bool> g_lowrank_t_gemm{false};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is16bit(DType t) { return t == DType::BF16 || t == DType::F16; }

int block_m_for(int64_t M) { return M <= 16 ? 16 : M <= 32 ? 32 : M <= 64 ? 64 : 128; }

bool fits(int64_t smem_bytes, const DeviceInfo& d) {
  return smem_bytes > 0 && (d.smem_per_block == 0 || smem_bytes <= d.smem_per_block);
}

// The token tile for M, halved until a block's shared memory fits the device (4-bit 128-token
// tiles need ~110 KB: fine on sm_80 / sm_90, over the 99 KB of sm_86 / sm_89); 0 if none does.
int fitting_block_m(int64_t M, const DeviceInfo& d, int (*smem)(int bits, int block_m), int bits) {
  for (int bm = block_m_for(M); bm >= 16; bm /= 2) {
    if (fits(smem(bits, bm), d)) return bm;
  }
  return 0;
}

int fwd_smem(int bits, int block_m) { return lut_mma_smem_bytes(bits, block_m, false); }

// Small problems leave SMs idle: split the reduction until about two blocks per SM are in flight,
// keeping at least two steps per split so each block still pipelines its loads.
int splits_for(int64_t tiles, int64_t steps, const DeviceInfo& d) {
  const int64_t target = 2 * static_cast<int64_t>(d.sm_count);
  if (tiles >= target) return 1;
  int64_t s = ceil_div(target, tiles);
  if (s > steps / 2) s = steps / 2;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

Plan mma_plan(const LutProblem& p, const DeviceInfo& d, const char* why) {
  Plan plan;
  plan.path = Path::Mma;
  plan.block_m = fitting_block_m(p.M, d, &fwd_smem, p.bits);
  plan.splits = splits_for(ceil_div(p.N, kTileN) * ceil_div(p.M, plan.block_m), p.K / kTileK, d);
  plan.why = why;
  return plan;
}

Plan mma_regs_plan(const LutProblem& p, const DeviceInfo& d, const char* why, Path path = Path::MmaRegs) {
  Plan plan = mma_plan(p, d, why);
  plan.path = path;
  plan.block_m = p.M <= 16 ? 16 : 32;
  plan.splits = splits_for(ceil_div(p.N, kTileN) * ceil_div(p.M, plan.block_m), p.K / kTileK, d);
  return plan;
}

// dx tiles: 128 columns of W x block_m tokens, the split runs over W's rows in steps of 64.
Plan dx_mma_plan(const LutProblem& p, const DeviceInfo& d, const char* why) {
  Plan plan;
  plan.path = Path::Mma;
  plan.block_m = fitting_block_m(p.M, d, &lut_dx_mma_smem_bytes, p.bits);
  plan.splits = splits_for(ceil_div(p.K, kTileN) * ceil_div(p.M, plan.block_m), ceil_div(p.N, kTileK), d);
  plan.why = why;
  return plan;
}

Plan simple_plan(const char* why) {
  Plan plan;
  plan.path = Path::Simple;
  plan.why = why;
  return plan;
}

Plan decode_plan(const char* why) {
  Plan plan;
  plan.path = Path::DecodeGemm;
  plan.why = why;
  return plan;
}

}  // namespace

const char* path_name(Path p) {
  switch (p) {
    case Path::Auto: return "auto";
    case Path::Simple: return "simple";
    case Path::Mma: return "mma";
    case Path::DecodeGemm: return "decode_gemm";
    case Path::MmaRegs: return "mma_regs";
    case Path::MmaRegsDirect: return "mma_regs_direct";
  }
  return "?";
}

bool path_from_name(const char* name, Path* out) {
  for (Path p : {Path::Auto, Path::Simple, Path::Mma, Path::DecodeGemm, Path::MmaRegs, Path::MmaRegsDirect}) {
    if (std::strcmp(name, path_name(p)) == 0) {
      *out = p;
      return true;
    }
  }
  return false;
}

void set_forced_path(Path p) { g_forced.store(static_cast<int>(p)); }

int64_t threshold(Threshold t) {
  const int64_t v = g_threshold[t].load();
  return v >= 0 ? v : kThresholdSpecs[t].builtin;
}

bool set_threshold(const char* name, int64_t value, const char** why) {
  for (int t = 0; t < kThresholdCount; ++t) {
    const ThresholdSpec& spec = kThresholdSpecs[t];
    if (std::strcmp(name, spec.name) != 0) continue;
    if (value != -1 && (value < spec.lo || value > spec.hi)) {
      if (why != nullptr) *why = "value out of range";
      return false;
    }
    g_threshold[t].store(value);
    return true;
  }
  if (why != nullptr) *why = "unknown threshold";
  return false;
}
Path forced_path() { return static_cast<Path>(g_forced.load()); }

bool mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why) {
  const char* no = nullptr;
  if (d.major < 8) no = "mma needs sm_80 or newer";
  else if (!is16bit(c.act)) no = "mma needs bf16 or fp16 activations";
  else if (p.M < 1 || p.N < 1) no = "mma needs M >= 1 and N >= 1";
  else if (p.K % kTileK != 0) no = "mma needs in_features % 64 == 0";
  else if ((p.K / p.G) % kTileK != 0) no = "mma needs a group size (in_features / groups) % 64 == 0";
  else if (c.act_ptr % 16 != 0) no = "mma needs 16-byte aligned activations";
  else if (c.codes_ptr % 4 != 0 || p.row_bytes % 4 != 0) no = "mma needs 4-byte aligned code rows";
  else if (fitting_block_m(p.M, d, &fwd_smem, p.bits) == 0) no = "mma: no tile fits the device's shared memory";
  else if (ceil_div(p.M, fitting_block_m(p.M, d, &fwd_smem, p.bits)) > 65535) no = "mma grid: too many token tiles";
  if (why != nullptr && no != nullptr) *why = no;
  return no == nullptr;
}

bool mma_regs_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why) {
  if (!mma_supports(p, c, d, why)) return false;
  const char* no = nullptr;
  if (p.M > kRegsTileMaxTokens) no = "mma_regs needs M <= 32";
  else if (c.codes_ptr % 16 != 0) no = "mma_regs needs 16-byte aligned codes";
  // (lut_mma_smem_bytes gives the code ring's variant, the larger: mma_regs_direct fits wherever it does.)
  else if (!fits(lut_mma_smem_bytes(p.bits, p.M <= 16 ? 16 : 32, true), d)) no = "mma_regs: shared memory";
  if (why != nullptr && no != nullptr) *why = no;
  return no == nullptr;
}

MmaConfig mma_config(const Plan& plan) {
  MmaConfig c;
  c.block_m = plan.block_m;
  c.splits = plan.splits;
  c.regs = plan.path == Path::MmaRegs || plan.path == Path::MmaRegsDirect;
  c.codes_direct = plan.path == Path::MmaRegsDirect;
  return c;
}

bool fast_decode_supports(const LutProblem& p, uintptr_t codes_ptr, uintptr_t out_ptr, const char** why) {
  const char* no = nullptr;
  if (p.K % 8 != 0 || (p.K / p.G) % 8 != 0) no = "fast decode needs in_features and group size % 8 == 0";
  else if (codes_ptr % 4 != 0 || p.row_bytes % 4 != 0) no = "fast decode needs 4-byte aligned code rows";
  else if (out_ptr % 16 != 0) no = "fast decode needs a 16-byte aligned output";
  else if ((p.G << p.bits) > kFastDecodeMaxLutFloats) no = "fast decode: a row's LUT exceeds 48 KB";
  if (why != nullptr && no != nullptr) *why = no;
  return no == nullptr;
}

bool dx_mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why) {
  const char* no = nullptr;
  if (d.major < 8) no = "dx mma needs sm_80 or newer";
  else if (!is16bit(c.act)) no = "dx mma needs bf16 or fp16 activations";
  else if (p.M < 1 || p.N < 1 || p.N % 8 != 0) no = "dx mma needs M >= 1 and out_features % 8 == 0";
  else if (p.K % kTileK != 0) no = "dx mma needs in_features % 64 == 0";
  else if ((p.K / p.G) % kTileK != 0) no = "dx mma needs a group size % 64 == 0";
  else if (c.act_ptr % 16 != 0) no = "dx mma needs a 16-byte aligned dy";
  else if (c.codes_ptr % 4 != 0 || p.row_bytes % 4 != 0) no = "dx mma needs 4-byte aligned code rows";
  else if (fitting_block_m(p.M, d, &lut_dx_mma_smem_bytes, p.bits) == 0) no = "dx mma: no tile fits the device's shared memory";
  else if (ceil_div(p.M, fitting_block_m(p.M, d, &lut_dx_mma_smem_bytes, p.bits)) > 65535) no = "dx mma grid: too many token tiles";
  if (why != nullptr && no != nullptr) *why = no;
  return no == nullptr;
}

bool grad_mma_supports(const LutProblem& p, const CallInfo& c, const DeviceInfo& d, const char** why) {
  const char* no = nullptr;
  if (d.major < 8) no = "grad mma needs sm_80 or newer";
  else if (!is16bit(c.act)) no = "grad mma needs bf16 or fp16 activations";
  else if (p.N < 1 || p.N % 8 != 0) no = "grad mma needs out_features % 8 == 0";
  else if (p.K % kTileK != 0 || (p.K / p.G) % kTileK != 0) no = "grad mma needs in_features and group size % 64 == 0";
  else if (c.act_ptr % 16 != 0 || c.out_ptr % 16 != 0) no = "grad mma needs 16-byte aligned dy and x";
  else if (c.codes_ptr % 4 != 0 || p.row_bytes % 4 != 0) no = "grad mma needs 4-byte aligned code rows";
  else if (ceil_div(p.N, kTileN) > 65535) no = "grad mma grid: too many row tiles";
  else if (!fits(lut_grad_mma_smem_bytes(p.bits), d)) no = "grad mma: no room in the device's shared memory";
  if (why != nullptr && no != nullptr) *why = no;
  return no == nullptr;
}

Plan plan_lut_grad(const LutProblem& p, const CallInfo& c, const DeviceInfo& d) {
  const char* no = "";
  const bool ok = grad_mma_supports(p, c, d, &no);
  if (forced_path() == Path::Simple) return simple_plan("forced: simple");
  if (!ok) return simple_plan(no);
  Plan plan;
  plan.path = Path::Mma;
  plan.why = "dW tiles on tensor cores, bucket sums on chip";
  return plan;
}

namespace {

// The rules shared by lut_linear and lut_linear_dx (the GEMMs over W or W^T): a forced path where
// it supports the call, else mma_regs(_direct) for small M (forward only: regs_ok is false for dx),
// mma up to `mma_max` tokens, decode_gemm beyond it or where mma cannot run once M is large enough,
// the simple kernels otherwise. mma_plan_fn gives the mma tiling.
Plan plan_gemm(const LutProblem& p, const DeviceInfo& d, bool regs_ok, bool mma_ok, const char* mma_no, bool dec_ok,
               const char* dec_no, int64_t mma_max,
               Plan (*mma_plan_fn)(const LutProblem&, const DeviceInfo&, const char*)) {
  switch (forced_path()) {
    case Path::Simple: return simple_plan("forced: simple");
    case Path::Mma:
      if (mma_ok) return mma_plan_fn(p, d, "forced: mma");
      break;
    case Path::MmaRegs:
      if (regs_ok) return mma_regs_plan(p, d, "forced: mma_regs");
      break;
    case Path::MmaRegsDirect:
      if (regs_ok && p.M <= kDirectTileMaxTokens) {
        return mma_regs_plan(p, d, "forced: mma_regs_direct", Path::MmaRegsDirect);
      }
      break;
    case Path::DecodeGemm:
      if (dec_ok) return decode_plan("forced: decode_gemm");
      break;
    case Path::Auto: break;
  }
  if (p.M > mma_max && dec_ok) return decode_plan("large M: decode once, cuBLAS GEMM");
  if (regs_ok && p.M <= threshold(kDirectMaxTokens)) {
    return mma_regs_plan(p, d, "small M: codes and fragments in registers, tensor cores", Path::MmaRegsDirect);
  }
  if (regs_ok && p.M <= threshold(kRegsMaxTokens)) {
    return mma_regs_plan(p, d, "small M: fragments decoded in registers, tensor cores");
  }
  if (mma_ok) return mma_plan_fn(p, d, "fused LUT gather-GEMM on tensor cores");
  if (p.M >= threshold(kDecodeMinTokens) && dec_ok) return decode_plan(mma_no);
  return simple_plan(dec_ok ? mma_no : dec_no);
}

}  // namespace

// decode_gemm's workspace is allocated fresh (aligned), so only the codes pointer matters to it.
Plan plan_lut_linear(const LutProblem& p, const CallInfo& c, const DeviceInfo& d) {
  const char* mma_no = "";
  const char* dec_no = "";
  const bool mma_ok = mma_supports(p, c, d, &mma_no);
  const bool dec_ok = fast_decode_supports(p, c.codes_ptr, 0, &dec_no);
  const bool regs_ok = mma_ok && mma_regs_supports(p, c, d, nullptr);
  return plan_gemm(p, d, regs_ok, mma_ok, mma_no, dec_ok, dec_no, threshold(kMmaMaxTokens), &mma_plan);
}

// A multi-adapter launch runs each adapter's tokens in their own blocks, so the variant and tile
// follow the average segment, ceil(M / A) tokens, and the split counts every adapter's tiles.
Plan plan_lut_linear_adapters(const LutProblem& p, int64_t adapters, const CallInfo& c, const DeviceInfo& d) {
  LutProblem segment = p;
  segment.M = ceil_div(p.M, adapters < 1 ? 1 : adapters);
  Plan plan = plan_lut_linear(segment, c, d);
  if (!is_mma(plan.path)) return plan;
  if (ceil_div(p.M, plan.block_m) + adapters > 65535) return plan_lut_linear(p, c, d);
  plan.splits = splits_for(ceil_div(p.N, kTileN) * ceil_div(segment.M, plan.block_m) * adapters, p.K / kTileK, d);
  return plan;
}

Plan plan_lut_linear_dx(const LutProblem& p, const CallInfo& c, const DeviceInfo& d) {
  const char* mma_no = "";
  const char* dec_no = "";
  const bool mma_ok = dx_mma_supports(p, c, d, &mma_no);
  const bool dec_ok = fast_decode_supports(p, c.codes_ptr, 0, &dec_no);
  return plan_gemm(p, d, /*regs_ok=*/false, mma_ok, mma_no, dec_ok, dec_no, threshold(kDxMmaMaxTokens),
                   &dx_mma_plan);
}

// The skinny GEMM costs two launches (cast of x, GEMM) and a second read of x: a few microseconds,
// which is most of a decode-size call's budget, and nothing next to a prefill GEMM. Calls that
// split K are the small ones, so "split" is the rule; a 1-split call writes y from the LUT kernel's
// epilogue, which has no other block's t to wait for.
bool lowrank_t_on_chip(const Plan& plan) {
  return is_mma(plan.path) && plan.splits > 1 && plan.block_m <= kLowRankMaxBlockM && !lowrank_t_gemm();
}

void set_lowrank_t_gemm(bool on) { g_lowrank_t_gemm.store(on); }
bool lowrank_t_gemm() { return g_lowrank_t_gemm.load(); }

}  // namespace spallm::cuda
