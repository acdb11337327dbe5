// A small SIMT emulator that runs the CUDA kernels of csrc/cuda/ on the CPU, for tests on machines
// without a GPU (tests/test_cuda_emulated.py). Not a simulator of timing or of the memory system: it
// executes each kernel's own C++ source, thread by thread, with CUDA's semantics where the kernels
// depend on them.
//
// Execution. A launch runs its blocks one after another. Each CUDA thread of a block is a fiber
// (ucontext) with its own stack; a fiber runs until it reaches a synchronization point and then
// hands control back to the block's scheduler:
//   * __syncthreads(): released when every live thread of the block waits there;
//   * warp collectives (mma.sync, ldmatrix, __shfl_xor_sync): released when all 32 lanes of the warp
//     wait at the same collective, which is then executed for the 32 lanes at once, from the values
//     each lane handed in (so a lane's operand registers are exactly what its own code computed).
// Any other state is a bug in the kernel and fails the launch loudly: a deadlock (some threads at a
// barrier, others can never reach it), lanes of one warp at different collectives, a collective
// with an exited lane, a shared-memory operand outside the block's shared memory or misaligned.
//
// What a kernel may not rely on, and how the emulator makes it visible:
//   * Order of threads between synchronization points: each pass runs the ready fibers in a
//     configurable order (forward, reverse, shuffled), either in lockstep (every warp moves to its
//     next collective) or warp by warp (each warp runs alone up to the next barrier, as far ahead of
//     the others as a real warp could get). A missing barrier between a write and a read by another
//     thread gives different results for different schedules.
//   * cp.async completion: copies land either at once ("early") or only when cp.async.wait_group
//     retires their group ("late"; the destination is poisoned with 0xFF bytes, NaN for fp32 / bf16 /
//     fp16, until then). Reading a stage before waiting for it shows up in late mode, refilling a stage
//     that other warps still read shows up in early mode.
//   * Uninitialised shared memory: dynamic shared memory starts as 0xFF bytes in every block.
// Memory errors in global memory are AddressSanitizer's job: the harness copies every tensor into an
// allocation of exactly its size, and the emulator is built with -fsanitize=address,undefined.
//
// Numerics. mma.m16n8k16 multiplies exactly (16-bit inputs) and adds the 16 products and the fp32
// accumulator in double before rounding to fp32 once; the hardware's internal adder differs in the
// last bits, so tests compare against references with tolerances, as they do on a GPU.
#pragma once

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "include/cuda_fp16.h"  // simt_half_to_float

// ---- the CUDA types and keywords the kernels use ------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

namespace simt {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "simt: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- run-time configuration (set by the harness before a launch) ---------------------------------

enum class Order { Forward = 0, Reverse = 1, Shuffled = 2 };
struct Options {
  Order order = Order::Forward;
  bool late_copies = true;
  // false: lockstep, every pass moves each warp to its next collective or barrier; true: each warp
  // in turn runs alone until it reaches a barrier (or exits), so one warp can get as far ahead of
  // the others as the barriers allow, which is what exposes a missing barrier between warps.
  bool warp_serial = false;
  unsigned seed = 1;
};
inline Options options;

// ---- fibers, one per CUDA thread -----------------------------------------------------------------

enum class Wait { Running, Barrier, Collective, Done };
enum class Op { None, Ldmatrix, Mma, Shfl };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;
};

// Fiber switches. x86-64: a few instructions that save the callee-saved registers on the old
// stack and restore them from the new one (simt_switch, defined in harness.cpp); glibc's
// swapcontext also saves the signal mask with a system call per switch, which made the emulator
// spend most of its time in the kernel. Other machines use swapcontext.
#if defined(__x86_64__)
#define SIMT_FAST_SWITCH 1
extern "C" void simt_switch(void** save_sp, void* load_sp);
#else
#define SIMT_FAST_SWITCH 0
#endif

// One shared-memory access of a thread that the kernel marked (mma.cuh smem_load / smem_store),
// as an offset into the block's dynamic shared memory.
struct Access {
  const char* site;
  uint32_t offset;
  int bytes;
};

struct Thread {
  std::vector<Access> log;  // marked accesses since the warp's last synchronization point
  ucontext_t ctx;
  void* sp = nullptr;  // saved stack pointer of a suspended fiber (fast switch)
  Wait wait = Wait::Running;
  Op op = Op::None;
  void* args = nullptr;           // the collective's per-lane operands, on this fiber's stack
  std::vector<Copy> open;         // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

constexpr size_t kStackBytes = 512 * 1024;

struct Block {
  const char* kernel = "";
  dim3 grid, block;
  uint3 index{0, 0, 0};
  std::vector<Thread> threads;
  int current = -1;
  ucontext_t scheduler;
  void* scheduler_sp = nullptr;
  uint8_t* smem = nullptr;
  size_t smem_bytes = 0;
  std::function<void()> body;
};

inline Block* current_block = nullptr;
inline std::vector<char*> stacks;

inline Thread& self() { return current_block->threads[current_block->current]; }

inline uint3 thread_idx() {
  const Block& b = *current_block;
  const unsigned i = static_cast<unsigned>(b.current);
  return {i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
}
inline uint3 block_idx() { return current_block->index; }
inline dim3 block_dim() { return current_block->block; }
inline dim3 grid_dim() { return current_block->grid; }

inline std::string where() {
  const Block& b = *current_block;
  char s[160];
  std::snprintf(s, sizeof(s), " [kernel %s, block (%u, %u, %u), thread %d]", b.kernel, b.index.x, b.index.y,
                b.index.z, b.current);
  return s;
}

inline void yield(Wait w) {
  Thread& t = self();
  t.wait = w;
#if SIMT_FAST_SWITCH
  simt_switch(&t.sp, current_block->scheduler_sp);
#else
  swapcontext(&t.ctx, &current_block->scheduler);
#endif
}

inline void thread_entry() {
  current_block->body();
  self().wait = Wait::Done;
#if SIMT_FAST_SWITCH
  void* unused;
  simt_switch(&unused, current_block->scheduler_sp);  // never resumed
  __builtin_unreachable();
#endif
  // with ucontext, uc_link returns to the scheduler
}

// A fresh fiber on `stack` that starts in thread_entry.
inline void start_fiber(Thread& t, char* stack, ucontext_t* link) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);  // frames of the previous block's fibers
#endif
#if SIMT_FAST_SWITCH
  // What simt_switch pops: mxcsr + x87 control word, r15, r14, r13, r12, rbx, rbp, then the return
  // address; thread_entry then starts with rsp = 8 mod 16, as after a call.
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15));
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&thread_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(uintptr_t(0x037F) << 32 | 0x1F80);  // default x87 control, mxcsr
  t.sp = sp;
  (void)link;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = link;
  makecontext(&t.ctx, thread_entry, 0);
#endif
}

inline void resume(Block& b, Thread& t) {
#if SIMT_FAST_SWITCH
  simt_switch(&b.scheduler_sp, t.sp);
#else
  swapcontext(&b.scheduler, &t.ctx);
#endif
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current_block->smem);
}

inline bool in_smem(const void* p, size_t bytes) {
  const Block& b = *current_block;
  const uint8_t* q = static_cast<const uint8_t*>(p);
  return b.smem != nullptr && q >= b.smem && q + bytes <= b.smem + b.smem_bytes;
}

// ---- shared-memory bank accounting ----------------------------------------------------------------
//
// Shared memory has 32 banks of 4-byte words; a warp-wide access needs as many wavefronts as the
// largest number of distinct words any one bank must deliver (lanes reading the same word share
// it), and at least one per 128 bytes of distinct data. The k-th marked access of each lane of a
// warp between two synchronization points is taken as one instruction (the kernels mark only
// accesses made by all 32 lanes in uniform control flow); `ideal` is the conflict-free minimum.

struct SmemStats {
  long long requests = 0, wavefronts = 0, ideal = 0;
};
inline std::map<std::string, SmemStats> smem_stats;
inline long long smem_divergent = 0;  // warp epochs whose lanes marked different access sequences

inline void smem_access(const char* site, const void* p, int bytes) {
  if (bytes == 0) {  // a lane that does not take part in this access (smem_load_if)
    self().log.push_back({site, 0, 0});
    return;
  }
  if (!in_smem(p, bytes)) return;  // static __shared__ arrays are not modelled
  self().log.push_back({site, static_cast<uint32_t>(static_cast<const uint8_t*>(p) - current_block->smem), bytes});
}

inline void account(const char* site, const uint32_t* offsets, const int* bytes, int lanes) {
  std::vector<uint32_t> words;
  for (int l = 0; l < lanes; ++l) {
    if (bytes[l] == 0) continue;
    for (uint32_t w = offsets[l] / 4; w <= (offsets[l] + bytes[l] - 1) / 4; ++w) words.push_back(w);
  }
  SmemStats& st = smem_stats[site];
  st.requests += 1;
  if (words.empty()) return;  // no lane took part: no bank access
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  int per_bank[32] = {};
  int worst = 0;
  for (uint32_t w : words) worst = std::max(worst, ++per_bank[w % 32]);
  st.wavefronts += worst;
  st.ideal += (static_cast<long long>(words.size()) + 31) / 32;
}

// Accounts the marked accesses the 32 lanes of a warp made since their last synchronization point.
// Lanes that made the same sequence form one warp access per entry. Otherwise (a predicated loop
// that some lanes leave early, e.g. a tile copy whose last rows are skipped) the k-th access of each
// site by each lane forms one warp access, the lanes without a k-th one not taking part, as inactive
// lanes do on the GPU; such epochs are counted in smem_divergent.
inline void flush_warp_log(Thread* lanes) {
  const size_t n = lanes[0].log.size();
  bool same = true;
  for (int l = 1; l < 32 && same; ++l) same = lanes[l].log.size() == n;
  for (size_t k = 0; k < n && same; ++k) {
    for (int l = 1; l < 32; ++l) same = same && lanes[l].log[k].site == lanes[0].log[k].site;
  }
  uint32_t offsets[32];
  int bytes[32];
  if (same) {
    for (size_t k = 0; k < n; ++k) {
      for (int l = 0; l < 32; ++l) {
        offsets[l] = lanes[l].log[k].offset;
        bytes[l] = lanes[l].log[k].bytes;
      }
      account(lanes[0].log[k].site, offsets, bytes, 32);
    }
  } else {
    ++smem_divergent;
    std::map<std::string, std::vector<std::vector<const Access*>>> by_site;  // site -> lane -> accesses
    for (int l = 0; l < 32; ++l) {
      for (const Access& a : lanes[l].log) {
        auto& per_lane = by_site[a.site];
        per_lane.resize(32);
        per_lane[l].push_back(&a);
      }
    }
    for (const auto& [site, per_lane] : by_site) {
      size_t most = 0;
      for (const auto& v : per_lane) most = std::max(most, v.size());
      for (size_t k = 0; k < most; ++k) {
        for (int l = 0; l < 32; ++l) {
          const bool has = k < per_lane[l].size();
          offsets[l] = has ? per_lane[l][k]->offset : 0;
          bytes[l] = has ? per_lane[l][k]->bytes : 0;
        }
        account(site.c_str(), offsets, bytes, 32);
      }
    }
  }
  for (int l = 0; l < 32; ++l) lanes[l].log.clear();
}

// ---- cp.async --------------------------------------------------------------------------------

inline void perform(const Copy& c) {
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.src_bytes < c.bytes) std::memset(static_cast<uint8_t*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (!in_smem(dst, bytes)) fail("cp.async destination outside the block's dynamic shared memory" + where());
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0) fail("cp.async destination misaligned" + where());
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0) fail("cp.async source misaligned" + where());
  if (in_smem(src, 1)) fail("cp.async source in shared memory" + where());
  static const char* const kSite[17] = {nullptr, nullptr, nullptr, nullptr, "cp_async_4", nullptr, nullptr, nullptr,
                                        "cp_async_8", nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                        "cp_async_16"};
  smem_access(kSite[bytes], dst, bytes);  // one site per copy size (callers pass 4, 8 or 16)
  const Copy c{dst, src, bytes, src_bytes};
  if (!options.late_copies) {
    perform(c);
    return;
  }
  std::memset(dst, 0xFF, bytes);
  self().open.push_back(c);
}

inline void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) perform(c);
    t.groups.erase(t.groups.begin());
  }
}

// ---- warp collectives ----------------------------------------------------------------------------

struct LdmatrixArgs {
  const void* p;
  bool trans;
  uint32_t* out;  // 4 registers
};
struct MmaArgs {
  float* d;  // 4 accumulators, updated in place
  const uint32_t* a;
  const uint32_t* b;
  bool half;  // fp16 inputs (else bf16)
};
struct ShflArgs {
  unsigned mask;
  uint32_t value;
  int lane_mask;
  uint32_t* out;
};

inline void collective(Op op, void* args) {
  Thread& t = self();
  t.op = op;
  t.args = args;
  yield(Wait::Collective);
}

inline float half_bits_to_float(uint16_t h, bool fp16) {
  if (fp16) return simt_half_to_float(h);
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void run_ldmatrix(Thread* lanes) {
  const uint8_t* row[32];
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<LdmatrixArgs*>(lanes[l].args);
    if (a->trans != static_cast<LdmatrixArgs*>(lanes[0].args)->trans) fail("ldmatrix: lanes disagree on .trans");
    if (!in_smem(a->p, 16)) fail("ldmatrix row address outside the block's dynamic shared memory");
    if (reinterpret_cast<uintptr_t>(a->p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    row[l] = static_cast<const uint8_t*>(a->p);
  }
  uint32_t offsets[32];
  int sixteen[32];
  for (int l = 0; l < 32; ++l) {
    offsets[l] = static_cast<uint32_t>(row[l] - current_block->smem);
    sixteen[l] = 16;
  }
  account("ldmatrix", offsets, sixteen, 32);
  // Matrix j's 8 rows come from lanes 8j..8j+7. Plain: lane l gets row l/4, columns 2(l%4), +1.
  // Transposed: lane l gets column l/4 of rows 2(l%4) and 2(l%4)+1 (the lower row in the low half).
  for (int l = 0; l < 32; ++l) {
    auto* a = static_cast<LdmatrixArgs*>(lanes[l].args);
    for (int j = 0; j < 4; ++j) {
      uint32_t v;
      if (!a->trans) {
        std::memcpy(&v, row[8 * j + l / 4] + 4 * (l % 4), 4);
      } else {
        v = uint32_t(load16(row[8 * j + 2 * (l % 4)] + 2 * (l / 4))) |
            uint32_t(load16(row[8 * j + 2 * (l % 4) + 1] + 2 * (l / 4))) << 16;
      }
      a->out[j] = v;
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: lane l = 4g + t holds
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)   [row, k]
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C: c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)                  [row, n]
inline void run_mma(Thread* lanes) {
  const bool fp16 = static_cast<MmaArgs*>(lanes[0].args)->half;
  float A[16][16], B[16][8];
  double C[16][8];
  auto lo = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r & 0xFFFF), fp16); };
  auto hi = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r >> 16), fp16); };
  for (int l = 0; l < 32; ++l) {
    auto* m = static_cast<MmaArgs*>(lanes[l].args);
    if (m->half != fp16) fail("mma: lanes disagree on the input type");
    const int g = l / 4, t = l % 4;
    for (int q = 0; q < 4; ++q) {
      const int r = g + 8 * (q % 2), k = 2 * t + 8 * (q / 2);
      A[r][k] = lo(m->a[q]);
      A[r][k + 1] = hi(m->a[q]);
    }
    for (int q = 0; q < 2; ++q) {
      B[2 * t + 8 * q][g] = lo(m->b[q]);
      B[2 * t + 8 * q + 1][g] = hi(m->b[q]);
    }
    for (int e = 0; e < 4; ++e) C[g + 8 * (e / 2)][2 * t + e % 2] = m->d[e];
  }
  for (int l = 0; l < 32; ++l) {
    auto* m = static_cast<MmaArgs*>(lanes[l].args);
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e / 2), n = 2 * t + e % 2;
      double s = C[r][n];
      for (int k = 0; k < 16; ++k) s += double(A[r][k]) * double(B[k][n]);
      m->d[e] = static_cast<float>(s);
    }
  }
}

inline void run_shfl(Thread* lanes) {
  for (int l = 0; l < 32; ++l) {
    auto* s = static_cast<ShflArgs*>(lanes[l].args);
    if (s->mask != 0xFFFFFFFFu) fail("__shfl_xor_sync with a partial mask (the kernels use full warps)");
    s->out[0] = static_cast<ShflArgs*>(lanes[l ^ (s->lane_mask & 31)].args)->value;
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  LdmatrixArgs a{p, trans, r};
  collective(Op::Ldmatrix, &a);
}

inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool half) {
  MmaArgs m{d, a, b, half};
  collective(Op::Mma, &m);
}

inline void syncthreads() { yield(Wait::Barrier); }

// ---- the scheduler -------------------------------------------------------------------------------

inline const char* op_name(Op op) {
  switch (op) {
    case Op::Ldmatrix: return "ldmatrix";
    case Op::Mma: return "mma";
    case Op::Shfl: return "shfl";
    default: return "none";
  }
}

// Executes warp w's collective if all its 32 lanes wait at the same one; true if it did.
inline bool resolve_warp(Block& b, int w) {
  Thread* lanes = &b.threads[w * 32];
  int waiting = 0, done = 0;
  for (int l = 0; l < 32; ++l) {
    waiting += lanes[l].wait == Wait::Collective;
    done += lanes[l].wait == Wait::Done;
  }
  if (waiting == 0) return false;
  if (done > 0) {
    fail(std::string("a warp collective (") + op_name(lanes[0].op) + ") with exited lanes in kernel " + b.kernel);
  }
  if (waiting < 32) return false;  // the others are at a barrier: a deadlock unless something else moves
  flush_warp_log(lanes);
  const Op op = lanes[0].op;
  for (int l = 1; l < 32; ++l) {
    if (lanes[l].op != op) {
      fail(std::string("lanes of one warp at different collectives (") + op_name(op) + " / " + op_name(lanes[l].op) +
           ") in kernel " + b.kernel);
    }
  }
  switch (op) {
    case Op::Ldmatrix: run_ldmatrix(lanes); break;
    case Op::Mma: run_mma(lanes); break;
    case Op::Shfl: run_shfl(lanes); break;
    default: fail("unknown collective");
  }
  for (int l = 0; l < 32; ++l) lanes[l].wait = Wait::Running;
  return true;
}

// Runs the ready threads among `ids`, in order, each until its next synchronization point.
inline void run_ready(Block& b, const std::vector<int>& ids) {
  for (int i : ids) {
    if (b.threads[i].wait != Wait::Running) continue;
    b.current = i;
    resume(b, b.threads[i]);
  }
  b.current = -1;
}

inline void run_block(Block& b, std::mt19937& rng) {
  const int n = static_cast<int>(b.threads.size()), warps = n / 32;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t = Thread{};
    start_fiber(t, stacks[i], &b.scheduler);
  }
  auto ordered = [&](int count) {
    std::vector<int> v(count);
    std::iota(v.begin(), v.end(), 0);
    if (options.order == Order::Reverse) std::reverse(v.begin(), v.end());
    if (options.order == Order::Shuffled) std::shuffle(v.begin(), v.end(), rng);
    return v;
  };
  for (;;) {
    if (options.warp_serial) {
      for (int w : ordered(warps)) {
        std::vector<int> lanes;
        for (int l : ordered(32)) lanes.push_back(w * 32 + l);
        do run_ready(b, lanes);
        while (resolve_warp(b, w));
      }
    } else {
      run_ready(b, ordered(n));
    }
    int live = 0, at_barrier = 0;
    for (const Thread& t : b.threads) {
      live += t.wait != Wait::Done;
      at_barrier += t.wait == Wait::Barrier;
    }
    if (live == 0) break;
    bool released = false;
    for (int w = 0; w < warps; ++w) released |= resolve_warp(b, w);
    if (released) continue;
    if (at_barrier == live) {
      for (int w = 0; w < warps; ++w) flush_warp_log(&b.threads[w * 32]);
      for (Thread& t : b.threads) {
        if (t.wait == Wait::Barrier) t.wait = Wait::Running;
      }
      continue;
    }
    char s[200];
    std::snprintf(s, sizeof(s), "deadlock in kernel %s, block (%u, %u, %u): %d live threads, %d at __syncthreads",
                  b.kernel, b.index.x, b.index.y, b.index.z, live, at_barrier);
    fail(s);
  }
  for (int w = 0; w < warps; ++w) flush_warp_log(&b.threads[w * 32]);
  for (Thread& t : b.threads) {
    for (auto& g : t.groups) {
      for (const Copy& c : g) perform(c);
    }
    for (const Copy& c : t.open) perform(c);
  }
}

// ---- launches and the runtime API --------------------------------------------------------------

constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

inline int last_error = 0;  // a cudaError_t value
inline std::map<const void*, size_t> smem_opt_in;
inline long long launches = 0;

struct Launch {
  dim3 grid, block;
  size_t smem;
  const char* name;

  Launch(dim3 g, dim3 b, size_t s, const void* /*stream*/, const char* n) : grid(g), block(b), smem(s), name(n) {}

  template <typename... P, typename... Args>
  void operator()(void (*kernel)(P...), Args&&... args) const {
    const size_t threads = size_t(block.x) * block.y * block.z;
    const auto it = smem_opt_in.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = it != smem_opt_in.end() ? std::max(it->second, kDefaultDynamicSmem) : kDefaultDynamicSmem;
    if (threads == 0 || threads > 1024 || threads % 32 != 0 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu) {
      last_error = 9;  // cudaErrorInvalidConfiguration
      return;
    }
    if (smem > limit) {
      last_error = 1;  // cudaErrorInvalidValue: too much dynamic shared memory without the opt-in
      return;
    }
    ++launches;
    // Kernel parameters are copies, converted to the parameter types as <<<...>>> converts them.
    const std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
    while (stacks.size() < threads) stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
    std::mt19937 rng(options.seed);
    Block b;
    b.kernel = name;
    b.grid = grid;
    b.block = block;
    b.threads.resize(threads);
    b.smem_bytes = smem;
    std::vector<uint8_t> smem_buffer;
    b.body = [&] { std::apply([&](auto... p) { kernel(p...); }, params); };
    Block* saved = current_block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          // A fresh exact-size allocation per block: AddressSanitizer sees overruns, and every
          // block starts from 0xFF bytes, never from its predecessor's data.
          uint8_t* smem_block = smem > 0 ? static_cast<uint8_t*>(std::malloc(smem)) : nullptr;
          if (smem > 0) std::memset(smem_block, 0xFF, smem);
          b.smem = smem_block;
          b.index = {x, y, z};
          current_block = &b;
          run_block(b, rng);
          std::free(smem_block);
        }
      }
    }
    current_block = saved;
  }
};

}  // namespace simt
