// The CPU vector kernels of lut_simd.h written once, over an instruction set V, and compiled once
// per instruction set: lut_avx2.cpp, lut_avx512.cpp and lut_avx512bf16.cpp each define
// SPALLM_VEC_FN (the function attribute that enables their instructions), include this file inside
// an anonymous namespace and then define their V, so every instantiation is private to its file
// and carries its own target.
//
// V decodes V::kWidth consecutive codes of one (row, group) per step (a multiple of 8: every
// packing of csrc/codes.h keeps eight codes in BITS bytes) and provides
//   V::Table<BITS>                 one (row, group) table, held in registers
//   V::table<BITS>(const float*)   load it from the 2^BITS LUT entries
//   V::codes<BITS>(const uint8_t*) the kWidth codes whose bytes start at the pointer, one per lane
//   V::lookup<BITS>(table, codes)  their weights (a permute: no arithmetic on unselected entries)
//   V::Reg, zero, load, fmadd, add, hsum, and store to fp32 or (high halves) bf16
// and for the fused pass (GemvBlock)
//   V::XElem, V::load_x            the tokens' element type (float, or uint16_t for bf16) and
//                                  kWidth of them into a register
//   V::WReg, V::weights<BITS>      one step's kWidth weights of a row, from its table and codes
//   V::fmadd(w, x, acc)            acc plus the products (fp32 lanes; a bf16 V sums pairs)
//   V::kBlock, V::kRows            tokens that share one decode, rows that share one x load
// Being included inside a namespace, it includes nothing itself: lut_simd.h, included first by
// every file that includes it, brings <algorithm>, <cstdint>, <cstring> and <type_traits>.
#pragma once

// The BITS bytes that hold the eight codes of columns 8q .. 8q + 7 (from byte BITS * q on), read
// as one little-endian integer (byte i at bits 8i..). Three bytes are assembled by hand: a 3-byte
// memcpy can stay a library call per chunk.
template <int BITS>
SPALLM_VEC_FN uint32_t chunk_word(const uint8_t* chunk) {
  if constexpr (BITS == 3) {
    return uint32_t(chunk[0]) | uint32_t(chunk[1]) << 8 | uint32_t(chunk[2]) << 16;
  } else if constexpr (BITS == 2) {
    uint16_t half;
    std::memcpy(&half, chunk, 2);
    return half;
  } else {
    static_assert(BITS == 4, "bits must be 2, 3 or 4");
    uint32_t word;
    std::memcpy(&word, chunk, 4);
    return word;
  }
}

// out[(r - r0) * (c1 - c0) + c - c0] = W[r, c] for rows r0 <= r < r1 and columns c0 <= c < c1
// (multiples of V::kWidth; a window may start or end inside a group). out_t is float, or
// uint16_t for bf16.
template <class V, int BITS, typename out_t>
SPALLM_VEC_FN void decode_rows(const spallm::cpu::CodeRows& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                               out_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* crow = w.codes + r * w.row_bytes;
    out_t* orow = out + (r - r0) * (c1 - c0);
    for (int64_t g = c0 / w.group_size; g * w.group_size < c1; ++g) {
      const auto t = V::template table<BITS>(w.lut + (r * w.G + g) * w.E);
      const int64_t c_end = std::min(c1, (g + 1) * w.group_size);
      for (int64_t c = std::max(c0, g * w.group_size); c < c_end; c += V::kWidth) {
        V::store(orow + (c - c0), V::template lookup<BITS>(t, V::template codes<BITS>(crow + c / 8 * BITS)));
      }
    }
  }
}

// R rows against TB tokens. An FMA waits ~4 cycles for the previous one on its accumulator, so
// each (row, token) gets U accumulators taking the steps in turn (R * TB * U >= 4 chains in
// flight); the steps of a group that do not fill a turn go to accumulator 0. The R rows share
// every load of x: at 8+ tokens x no longer fits L1 (8 x 4096 fp32 is 128 KB) and re-reading it
// from L2 once per row, not the decode, is what limits the pass. Sums are combined in a fixed
// order (u = 0, 1, ..., then across lanes) that R does not change, so results repeat bit for bit
// whichever rows a thread gets.
template <class V, int BITS, int R, int TB, int U>
struct GemvBlock {
  typename V::Reg acc[R][TB][U];
  typename V::template Table<BITS> table[R];
  const uint8_t* crow[R];

  using X = typename V::XElem;

  // One step of kWidth columns from column c into accumulator u: the R rows' weights, then every
  // token's x once for all R rows.
  SPALLM_VEC_FN inline void step(const X* x, int64_t K, int64_t c, int u) {
    typename V::WReg wv[R];
    for (int i = 0; i < R; ++i) wv[i] = V::template weights<BITS>(table[i], crow[i] + c / 8 * BITS);
    for (int t = 0; t < TB; ++t) {
      const auto xv = V::load_x(x + t * K + c);
      for (int i = 0; i < R; ++i) acc[i][t][u] = V::fmadd(wv[i], xv, acc[i][t][u]);
    }
  }

  SPALLM_VEC_FN inline void run(const spallm::cpu::CodeRows& w, const X* x, int64_t r, float* y_col) {
    for (int i = 0; i < R; ++i) {
      crow[i] = w.codes + (r + i) * w.row_bytes;
      for (int t = 0; t < TB; ++t) {
        for (int u = 0; u < U; ++u) acc[i][t][u] = V::zero();
      }
    }
    for (int64_t g = 0; g < w.G; ++g) {
      for (int i = 0; i < R; ++i) table[i] = V::template table<BITS>(w.lut + ((r + i) * w.G + g) * w.E);
      const int64_t c_end = (g + 1) * w.group_size;
      int64_t c = g * w.group_size;
      for (; c + U * V::kWidth <= c_end; c += U * V::kWidth) {
        for (int u = 0; u < U; ++u) step(x, w.K, c + u * V::kWidth, u);
      }
      for (; c < c_end; c += V::kWidth) step(x, w.K, c, 0);
    }
    for (int i = 0; i < R; ++i) {
      for (int t = 0; t < TB; ++t) {
        auto s = acc[i][t][0];
        for (int u = 1; u < U; ++u) s = V::add(s, acc[i][t][u]);
        y_col[i + t * w.N] = V::hsum(s);
      }
    }
  }
};

// `tokens` (1 .. V::kBlock) tokens against R rows, dispatched to the block of that width. Fewer
// tokens get more accumulators each, to keep about four FMA chains in flight.
template <class V, int BITS, int R, int TB = V::kBlock>
SPALLM_VEC_FN void gemv_tokens(const spallm::cpu::CodeRows& w, const typename V::XElem* x, int64_t tokens, int64_t r,
                               float* y_col) {
  if constexpr (TB > 0) {
    if (tokens == TB) {
      GemvBlock<V, BITS, R, TB, (TB >= 4 ? 1 : TB == 1 ? 4 : 2)>().run(w, x, r, y_col);
    } else {
      gemv_tokens<V, BITS, R, TB - 1>(w, x, tokens, r, y_col);
    }
  }
}

// y[m * N + r] = sum_c x[m * K + c] W[r, c] for rows r0 <= r < r1 and all M tokens. Rows go in
// chunks of kRowChunk; inside a chunk every block of V::kBlock tokens passes over the chunk's rows,
// V::kRows at a time (the rest one by one). Each row group reads its token block's x (8 x 4096
// fp32 = 128 KB, past L1) from L2. With the token loop inside the row loop instead, each row group
// swept all M tokens' x (M x 16 KB), which from about 24 tokens no longer stays in a 1 MB L2 and
// came from L3 (0.15 instead of 0.11 ms per token on 4096 x 4096); inside a chunk the sweep is one
// token block plus the chunk's codes (32 rows x 2 KB at 4096 4-bit columns), both L2-resident.
template <class V, int BITS>
SPALLM_VEC_FN void gemv_rows(const spallm::cpu::CodeRows& w, const typename V::XElem* x, int64_t M, int64_t r0,
                             int64_t r1, float* y) {
  constexpr int64_t kRowChunk = 32;
  const int64_t chunk = M <= V::kBlock ? r1 - r0 : kRowChunk;  // one token block: one sweep anyway
  for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
    const int64_t c1 = std::min(r1, c0 + chunk);
    for (int64_t m = 0; m < M; m += V::kBlock) {
      const int64_t tb = std::min<int64_t>(V::kBlock, M - m);
      int64_t r = c0;
      for (; r + V::kRows <= c1; r += V::kRows) gemv_tokens<V, BITS, V::kRows>(w, x + m * w.K, tb, r, y + m * w.N + r);
      for (; r < c1; ++r) gemv_tokens<V, BITS, 1>(w, x + m * w.K, tb, r, y + m * w.N + r);
    }
  }
}

template <typename F>
void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// The table of entry points lut_simd.h hands out for an fp32 V.
template <class V>
spallm::cpu::VectorKernels vector_kernels(const char* name) {
  using spallm::cpu::CodeRows;
  spallm::cpu::VectorKernels k;
  k.name = name;
  k.width = V::kWidth;
  k.decode = [](const CodeRows& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out) {
    dispatch_bits(w.bits, [&](auto b) { decode_rows<V, decltype(b)::value>(w, r0, r1, c0, c1, out); });
  };
  k.decode_bf16 = [](const CodeRows& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, uint16_t* out) {
    dispatch_bits(w.bits, [&](auto b) { decode_rows<V, decltype(b)::value>(w, r0, r1, c0, c1, out); });
  };
  k.gemv = [](const CodeRows& w, const float* x, int64_t M, int64_t r0, int64_t r1, float* y) {
    dispatch_bits(w.bits, [&](auto b) { gemv_rows<V, decltype(b)::value>(w, x, M, r0, r1, y); });
  };
  return k;
}
