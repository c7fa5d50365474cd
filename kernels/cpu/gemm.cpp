// Group-quantized int4 / int8 GEMM for CPU: y[M, N] = x[M, K] @ dequant(W)[N, K].T.
//
// Why not torch's int4pack / int8pack: measured on a 2-core Xeon (torch 2.13, bf16, M = 1),
// `_weight_int4pack_mm_for_cpu` reads a 3072x576 weight in 80 us (11 GB/s from a 300 MiB L3 that
// copies at 70 GB/s), and int8pack takes per-channel scales only, so GGUF Q8_0 (a scale per 32)
// had to be dequantized to a dense fp16 weight. These kernels keep the file's groups and compute
// in fp32: the products are those of the fp32 reference, only the summation order differs.
//
// Layout (kernels/cpu/gemm.py packs it from the canonical one): output rows in blocks of 16, one
// fp32 lane each, so the inner loop broadcasts one activation and does 16 multiply-adds without a
// horizontal sum, and the weights stream through memory in the order they are read.
//   int4: q [N/16, K/8, 64] uint8: 16 rows x 8 features per 64 bytes, ordered by int4_byte()
//   int8: q [N/16, K, 16] int8
//   scales (and int4 mins) [N/16, K/G, 16], fp16 where that is exact, else fp32
//   w[n, k] = q[n, k] * scale[n, k/G] (+ min[n, k/G] for int4)
// The int4 min term is folded per group: sum_k (q s + m) x = s sum_k q x + m sum_k x.
// The AVX-512 path and the portable one (plain loops the compiler vectorizes) compute the same
// thing; the tests run both against fp32 dequantize-then-matmul.
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace lowbit_cpu {

#if defined(__AVX512BF16__)
constexpr bool HAS_BF16_DOT = true;
#else
constexpr bool HAS_BF16_DOT = false;
#endif
constexpr int64_t LANES = 16;  // output rows per packed block
constexpr int MAX_TILE = 4;    // activation rows sharing one pass over a weight block

struct Problem {
  const float* x;     // [M, K] fp32
  const float* xsum;  // [M, K/G] fp32 (int4 only)
  const void* xbf16;  // x itself when it is bf16 and the bf16 dot product is compiled in, else null
  const void* q;
  const void* scales;
  const void* mins;   // int4 only
  int64_t M, N, K, G;
  void* y;            // [M, N] in out_dtype
  torch::ScalarType out_dtype;
};

// Row t of a tile: 16 outputs from fp32 into the output dtype.
inline void store(const Problem& p, int64_t row, int64_t block, const float* v) {
  const int64_t at = row * p.N + block * LANES;
  switch (p.out_dtype) {
    case torch::kFloat: std::memcpy(static_cast<float*>(p.y) + at, v, LANES * sizeof(float)); break;
    case torch::kBFloat16:
      for (int r = 0; r < LANES; ++r) static_cast<c10::BFloat16*>(p.y)[at + r] = c10::BFloat16(v[r]);
      break;
    default:
      for (int r = 0; r < LANES; ++r) static_cast<c10::Half*>(p.y)[at + r] = c10::Half(v[r]);
  }
}

template <typename S>
inline float scalar(const S* p, int64_t i) { return static_cast<float>(p[i]); }

// Offset of (row r, feature f) inside an int4 chunk of 16 rows x 8 features (64 bytes); the
// feature is in the low nibble for f < 4, else the high one. The order is what AVX-512's byte
// unpacks turn into (feature 2j, feature 2j + 1) pairs per row lane: see tile_int4_avx512.
constexpr int int4_byte(int r, int f) { return 16 * (r / 4) + 8 * ((f % 4) / 2) + 2 * (r % 4) + f % 2; }

// ---------------------------------------------------------------- portable path
template <bool INT4>
inline float weight_at(const uint8_t* block, int r, int64_t k) {
  if constexpr (INT4) {
    const uint8_t b = block[(k / 8) * 64 + int4_byte(r, static_cast<int>(k % 8))];
    return static_cast<float>(k % 8 < 4 ? b & 15 : b >> 4);
  } else {
    return static_cast<float>(static_cast<int8_t>(block[k * LANES + r]));
  }
}

template <int T, bool INT4, typename S>
void tile_portable(const Problem& p, int64_t block, int64_t m0) {
  const int64_t groups = p.K / p.G;
  const auto* qb = static_cast<const uint8_t*>(p.q) + block * p.K * (INT4 ? 8 : 16);
  const auto* sb = static_cast<const S*>(p.scales) + block * groups * LANES;
  const auto* mb = INT4 ? static_cast<const S*>(p.mins) + block * groups * LANES : nullptr;
  float acc[T][LANES] = {};
  for (int64_t g = 0; g < groups; ++g) {
    float part[T][LANES] = {};
    for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) {
      float w[LANES];  // feature k of the block's 16 rows
      for (int r = 0; r < LANES; ++r) w[r] = weight_at<INT4>(qb, r, k);
      for (int t = 0; t < T; ++t) {
        const float x = p.x[(m0 + t) * p.K + k];
        for (int r = 0; r < LANES; ++r) part[t][r] += w[r] * x;
      }
    }
    for (int t = 0; t < T; ++t) {
      const float xs = INT4 ? p.xsum[(m0 + t) * groups + g] : 0.f;
      for (int r = 0; r < LANES; ++r) {
        acc[t][r] += part[t][r] * scalar(sb, g * LANES + r);
        if constexpr (INT4) acc[t][r] += scalar(mb, g * LANES + r) * xs;
      }
    }
  }
  for (int t = 0; t < T; ++t) store(p, m0 + t, block, acc[t]);
}

// ---------------------------------------------------------------- AVX-512 path
#if defined(__AVX512F__)
// store() for one vector: bf16 rounds as c10::BFloat16 does (to nearest even on the bits, NaN to
// 0x7FC0), which vcvtneps2bf16 would not for denormals; at hundreds of rows a scalar loop of
// conversions took as long as the GEMM.
inline void store16(const Problem& p, int64_t row, int64_t block, __m512 v) {
  const int64_t at = row * p.N + block * LANES;
  if (p.out_dtype == torch::kFloat) {
    _mm512_storeu_ps(static_cast<float*>(p.y) + at, v);
  } else if (p.out_dtype == torch::kBFloat16) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<c10::BFloat16*>(p.y) + at), _mm512_cvtepi32_epi16(rounded));
  } else {
    const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<c10::Half*>(p.y) + at), half);
  }
}

template <int T>
inline void store_tile(const Problem& p, int64_t block, int64_t m0, const __m512 (&acc)[T]) {
  for (int t = 0; t < T; ++t) store16(p, m0 + t, block, acc[t]);
}

// At one token a step the weights come from DRAM once each, and the loop is bound by how soon they
// arrive. Each thread streams one contiguous range; asking for the line PREFETCH_BYTES ahead
// starts the next reads earlier than the hardware prefetcher, which stops at 4 KiB pages.
constexpr int64_t PREFETCH_BYTES = 1024;
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0); }

// Several partial sums per activation row: a multiply-add has 4-5 cycles of latency and the loop
// issues about one a cycle, so a single chain would stall. With one row, 4; with more rows, 2.
template <int T>
constexpr int partials() { return T == 1 ? 4 : 2; }

template <int T, int U>
inline void zero(__m512 (&part)[T][U]) {
  for (int t = 0; t < T; ++t)
    for (int u = 0; u < U; ++u) part[t][u] = _mm512_setzero_ps();
}

template <int T, int U>
inline __m512 total(const __m512 (&part)[T][U], int t) {
  __m512 sum = part[t][0];
  for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, part[t][u]);
  return sum;
}

// int8: 16 rows x 1 feature per 16 bytes; sign-extend, convert, multiply-add.
template <int T, typename S>
void tile_int8_avx512(const Problem& p, int64_t block, int64_t m0) {
  constexpr int U = partials<T>();
  const int64_t groups = p.K / p.G;
  const auto* qb = static_cast<const uint8_t*>(p.q) + block * p.K * LANES;
  const auto* sb = static_cast<const S*>(p.scales) + block * groups * LANES;
  const float* xt = p.x + m0 * p.K;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[T][U];
    zero(part);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; k += U) {
      prefetch(qb + k * LANES);
      for (int u = 0; u < U; ++u) {
        const auto* qk = reinterpret_cast<const __m128i*>(qb + (k + u) * LANES);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qk)));
        for (int t = 0; t < T; ++t)
          part[t][u] = _mm512_fmadd_ps(w, _mm512_set1_ps(xt[t * p.K + k + u]), part[t][u]);
      }
    }
    const __m512 s = widen16(sb + g * LANES);
    for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(total(part, t), s, acc[t]);
  }
  store_tile<T>(p, block, m0, acc);
}

// One 64-byte int4 chunk (16 rows x 8 features) -> 4 vectors, pairs[j] holding features
// (2j, 2j + 1) of row r in lane r as two 16-bit words: each nibble beside the byte `pad`.
inline void int4_pairs(const uint8_t* chunk, __m512i pad, __m512i* pairs) {
  const __m512i nibble = _mm512_set1_epi8(15);
  const __m512i v = _mm512_loadu_si512(chunk);
  const __m512i lo = _mm512_and_si512(v, nibble);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  pairs[0] = _mm512_unpacklo_epi8(lo, pad);
  pairs[1] = _mm512_unpackhi_epi8(lo, pad);
  pairs[2] = _mm512_unpacklo_epi8(hi, pad);
  pairs[3] = _mm512_unpackhi_epi8(hi, pad);
}

// int4, per 64-byte chunk (16 rows x 8 features): mask out the low and high nibbles, then
// interleave each with a constant byte: lane r of each result holds row r's features
// (2j, 2j + 1) as two 16-bit words. With bf16 activations the constant is 0x43, which makes each
// word the bf16 number 128 + q, exact, and one vdpbf16ps does 32 multiply-adds (the 128 is taken
// back per group through sum(x)). Otherwise the constant is 0 and each word is converted to fp32.
template <int T, typename S, bool BF16>
void tile_int4_avx512(const Problem& p, int64_t block, int64_t m0) {
  constexpr int U = partials<T>();
  const int64_t groups = p.K / p.G;
  const auto* qb = static_cast<const uint8_t*>(p.q) + block * p.K * 8;
  const auto* sb = static_cast<const S*>(p.scales) + block * groups * LANES;
  const auto* mb = static_cast<const S*>(p.mins) + block * groups * LANES;
  const __m512i pad = _mm512_set1_epi8(BF16 ? 0x43 : 0);
  const __m512i low_word = _mm512_set1_epi32(0xFFFF);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[T][U];
    zero(part);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 8) {
      prefetch(qb + k * 8);
      __m512i pairs[4];
      int4_pairs(qb + k * 8, pad, pairs);
      for (int j = 0; j < 4; ++j) {  // features k + 2j, k + 2j + 1
        for (int t = 0; t < T; ++t) {
          __m512& sum = part[t][j % U];
#if defined(__AVX512BF16__)
          if constexpr (BF16) {
            const auto* xb = static_cast<const uint16_t*>(p.xbf16) + (m0 + t) * p.K + k + 2 * j;
            int32_t pair;
            std::memcpy(&pair, xb, sizeof(pair));
            sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_set1_epi32(pair), (__m512bh)pairs[j]);
            continue;
          }
#endif
          const float* x = p.x + (m0 + t) * p.K + k + 2 * j;
          sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(pairs[j], low_word)), _mm512_set1_ps(x[0]), sum);
          sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(pairs[j], 16)), _mm512_set1_ps(x[1]), sum);
        }
      }
    }
    const __m512 s = widen16(sb + g * LANES);
    // With bf16 weights q + 128: min - 128 scale multiplies sum(x) instead of min.
    const __m512 mn = BF16 ? _mm512_fnmadd_ps(s, _mm512_set1_ps(128.f), widen16(mb + g * LANES))
                           : widen16(mb + g * LANES);
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm512_fmadd_ps(total(part, t), s, acc[t]);
      acc[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(p.xsum[(m0 + t) * groups + g]), acc[t]);
    }
  }
  store_tile<T>(p, block, m0, acc);
}

template <int T, bool INT4, typename S>
void tile_avx512(const Problem& p, int64_t block, int64_t m0) {
  if constexpr (!INT4) {
    tile_int8_avx512<T, S>(p, block, m0);
  } else if (HAS_BF16_DOT && T == 1 && p.xbf16 != nullptr) {
    // One row: the bf16 dot product halves the work per weight. With more rows each weight
    // vector feeds T dot products, which measured slower here than T pairs of fp32 multiply-adds.
    tile_int4_avx512<T, S, HAS_BF16_DOT>(p, block, m0);
  } else {
    tile_int4_avx512<T, S, false>(p, block, m0);
  }
}
#endif

// ---------------------------------------------------------------- AMX path (bf16/fp16 x, 2+ rows)
// With several activation rows the AVX-512 loops above are bound by multiply-adds (each weight
// vector feeds one or two FMAs per row), not by memory: 8 rows ran a decode layer's GEMMs ~3x
// slower than one. AMX multiplies tiles instead: the same unpacked 128 + q words of 32 features x
// 16 output rows are exactly a bf16 B tile (16 feature pairs x 16 columns x 2), as are int8 codes
// converted to bf16; x's rows for those features are an A tile, and one tdpbf16ps does all rows'
// 512 multiply-adds. Per group the tile's raw sums are scaled (and for int4 shifted) in AVX-512 as
// above: scales differ per output row and group, and rounding the weights with their scale into
// bf16 would not be exact.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
// Linux hands out the tile registers' state only to processes that ask (arch_prctl), once.
// LOWBIT_AMX=0 keeps the AVX-512 and dense paths (for A/B runs, or a machine that misreports AMX).
bool amx_ready() {
  static const bool ready = [] {
    const char* env = std::getenv("LOWBIT_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile register
  uint8_t rows[16] = {};
};

// The B tile of features [k, k + 32) of a weight block: 4 chunks of 8 features unpacked to
// 128 + q bf16 words, one feature pair (64 bytes) per tile row.
inline void unpack_b_tile(const uint8_t* chunks, __m512i* b) {
  const __m512i pad = _mm512_set1_epi8(0x43);
  for (int chunk = 0; chunk < 4; ++chunk) {
    prefetch(chunks + 64 * chunk);
    int4_pairs(chunks + 64 * chunk, pad, b + 4 * chunk);
  }
}

// The B tile of features [k, k + 32) of an int8 weight block (16 rows x 1 feature per 16 bytes):
// each feature pair's two 16-byte rows become bf16 words side by side. |q| <= 128 is exact in bf16,
// which is the top half of the fp32 the integer converts to.
inline void unpack_b_tile_int8(const uint8_t* features, __m512i* b) {
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int j = 0; j < 16; ++j) {
    const uint8_t* even = features + 2 * j * LANES;
    if (j % 2 == 0) prefetch(even);
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(even))));
    const __m512 c =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(even + LANES))));
    b[j] = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(c), high),
                           _mm512_srli_epi32(_mm512_castps_si512(a), 16));
  }
}

// x's rows as A tiles: bf16 rows as they are; fp16 rows as two bf16 halves, hi = bf16(x) and
// lo = x - hi (exact: fp16's 11 significant bits fit in two bf16s), both multiplied by each B tile.
struct AmxRows {
  std::vector<uint16_t> hi, lo;  // [padded rows, K]; lo empty for bf16 rows
};

AmxRows amx_rows(const torch::Tensor& x, int64_t M, int64_t K, int64_t padded) {
  AmxRows rows;
  rows.hi.assign(padded * K, 0);  // A tiles read whole tiles: zero rows past M
  if (x.scalar_type() == torch::kBFloat16) {
    std::memcpy(rows.hi.data(), x.data_ptr(), M * K * sizeof(uint16_t));
    return rows;
  }
  rows.lo.assign(padded * K, 0);
  const auto* src = x.data_ptr<c10::Half>();
  for (int64_t i = 0; i < M * K; ++i) {
    const float v = static_cast<float>(src[i]);
    const c10::BFloat16 hi(v);
    rows.hi[i] = hi.x;
    rows.lo[i] = c10::BFloat16(v - static_cast<float>(hi)).x;
  }
  return rows;
}

// Tile C += A (x's rows at feature k) x B (the weights' tile at k), and the low halves' tile L
// for fp16 rows. A macro, not a template: GCC's tile intrinsics paste the register numbers into
// the instruction text, so they must be literal.
#define LOWBIT_TILE_STEP(C, A, B, L, k)          \
  do {                                           \
    _tile_loadd(B, tiles + ((k) / 32) * 16, 64); \
    _tile_loadd(A, hi + (k), stride);            \
    _tile_dpbf16ps(C, A, B);                     \
    if (lo != nullptr) {                         \
      _tile_loadd(L, lo + (k), stride);          \
      _tile_dpbf16ps(C, L, B);                   \
    }                                            \
  } while (0)

// Rows [m0, m0 + MT) of x over one 16-row weight block, whose B tiles (`tiles`, [K/32][16 x 64
// bytes]) are unpacked once for all row tiles. Groups go in pairs on two sets of tiles (A 0/5,
// with fp16 rows also A 6/7 for the low halves; B 1/4; C 2/3), so one's loads and multiply overlap
// the other's; their raw sums wait in `sums` [groups][MT][16] for the scaling pass at the end.
template <int MT, bool INT4, typename S>
void rows_amx(const Problem& p, const AmxRows& x, const __m512i* tiles, int64_t block, int64_t m0, float* sums) {
  const int64_t groups = p.K / p.G, rows = std::min<int64_t>(MT, p.M - m0);
  const auto* sb = static_cast<const S*>(p.scales) + block * groups * LANES;
  const auto* mb = static_cast<const S*>(p.mins) + block * groups * LANES;
  const uint16_t* hi = x.hi.data() + m0 * p.K;
  const uint16_t* lo = x.lo.empty() ? nullptr : x.lo.data() + m0 * p.K;
  const int64_t stride = p.K * sizeof(uint16_t);
  for (int64_t g = 0; g < groups; g += 2) {
    const bool pair = g + 1 < groups;
    _tile_zero(2);
    if (pair) _tile_zero(3);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 32) {
      LOWBIT_TILE_STEP(2, 0, 1, 6, k);
      if (pair) LOWBIT_TILE_STEP(3, 5, 4, 7, k + p.G);
    }
    _tile_stored(2, sums + g * MT * LANES, LANES * sizeof(float));
    if (pair) _tile_stored(3, sums + (g + 1) * MT * LANES, LANES * sizeof(float));
  }
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = widen16(sb + g * LANES);
    const float* sg = sums + g * MT * LANES;
    if constexpr (INT4) {
      const __m512 mn = _mm512_fnmadd_ps(s, _mm512_set1_ps(128.f), widen16(mb + g * LANES));  // see above
      for (int t = 0; t < MT && t < rows; ++t) {
        acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(sg + t * LANES), s, acc[t]);
        acc[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(p.xsum[(m0 + t) * groups + g]), acc[t]);
      }
    } else {
      for (int t = 0; t < MT && t < rows; ++t) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(sg + t * LANES), s, acc[t]);
    }
  }
  for (int t = 0; t < rows; ++t) store16(p, m0 + t, block, acc[t]);
}

template <int MT, bool INT4, typename S>
void run_amx_tiles(const Problem& p, const torch::Tensor& x) {
  const AmxRows rows = amx_rows(x, p.M, p.K, (p.M + MT - 1) / MT * MT);
  at::parallel_for(0, p.N / LANES, 1, [&](int64_t begin, int64_t end) {
    TileConfig config;  // per thread: tile configuration is thread state
    for (const int tile : {0, 2, 3, 5, 6, 7}) config.rows[tile] = MT;  // A and C tiles: one row per x row
    config.rows[1] = config.rows[4] = 16;  // B tiles: 16 feature pairs
    for (int tile = 0; tile < 8; ++tile) config.colsb[tile] = 64;
    _tile_loadconfig(&config);
    std::vector<float> sums(p.K / p.G * MT * LANES);
    std::vector<__m512i> tiles(p.K / 32 * 16);  // one block's B tiles
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t k = 0; k < p.K; k += 32) {
        __m512i* b = tiles.data() + (k / 32) * 16;
        if constexpr (INT4) {
          unpack_b_tile(static_cast<const uint8_t*>(p.q) + block * p.K * 8 + k * 8, b);
        } else {
          unpack_b_tile_int8(static_cast<const uint8_t*>(p.q) + (block * p.K + k) * LANES, b);
        }
      }
      for (int64_t m0 = 0; m0 < p.M; m0 += MT) rows_amx<MT, INT4, S>(p, rows, tiles.data(), block, m0, sums.data());
    }
    _tile_release();
  });
}

// x: [M, K] bf16 or fp16, M >= 2. Rows per A tile: M rounded up to 4, 8 or 16 (at most 16), so
// that few padding rows are computed.
template <bool INT4, typename S>
void run_amx(const Problem& p, const torch::Tensor& x) {
  if (p.M <= 4) return run_amx_tiles<4, INT4, S>(p, x);
  if (p.M <= 8) return run_amx_tiles<8, INT4, S>(p, x);
  run_amx_tiles<16, INT4, S>(p, x);
}
#else
bool amx_ready() { return false; }
template <bool INT4, typename S>
void run_amx(const Problem&, const torch::Tensor&) {}
#endif

template <bool INT4, typename S>
void run_tile(const Problem& p, int64_t block, int64_t m0, int rows, bool portable) {
#if defined(__AVX512F__)
  if (!portable) {
    switch (rows) {
      case 1: return tile_avx512<1, INT4, S>(p, block, m0);
      case 2: return tile_avx512<2, INT4, S>(p, block, m0);
      case 3: return tile_avx512<3, INT4, S>(p, block, m0);
      default: return tile_avx512<4, INT4, S>(p, block, m0);
    }
  }
#endif
  switch (rows) {
    case 1: return tile_portable<1, INT4, S>(p, block, m0);
    case 2: return tile_portable<2, INT4, S>(p, block, m0);
    case 3: return tile_portable<3, INT4, S>(p, block, m0);
    default: return tile_portable<4, INT4, S>(p, block, m0);
  }
}

template <bool INT4, typename S>
void run(const Problem& p, bool portable) {
  // Each thread takes whole blocks of 16 output rows and runs every activation row over a block
  // while it is in L1 (16 rows x K=1536 int4 is 12 KiB), so weights leave memory once per call.
  at::parallel_for(0, p.N / LANES, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t m0 = 0; m0 < p.M; m0 += MAX_TILE)
        run_tile<INT4, S>(p, block, m0, static_cast<int>(std::min<int64_t>(MAX_TILE, p.M - m0)), portable);
  });
}

// K follows from the packed weight; scales and mins are checked against it.
static int64_t check_weight(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor* mins,
                            int64_t group_size) {
  const bool int4 = mins != nullptr;
  const int64_t width = int4 ? 64 : LANES;  // see the layout at the top
  TORCH_CHECK(q.scalar_type() == (int4 ? torch::kUInt8 : torch::kInt8), "q: expected ",
              int4 ? "uint8" : "int8", ", got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && q.size(2) == width && q.is_contiguous(),
              "q: expected contiguous [N/16, ", int4 ? "K/8" : "K", ", ", width, "], got ", q.sizes());
  const int64_t K = int4 ? q.size(1) * 8 : q.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group_size must be a multiple of 32 dividing K, got ", group_size, " for K = ", K);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == q.size(0) && scales.size(1) == K / group_size &&
                  scales.size(2) == LANES && scales.is_contiguous(),
              "scales: expected contiguous [N/16, K/G, 16], got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf,
              "scales: expected fp32 or fp16, got ", scales.scalar_type());
  if (int4)
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() &&
                    mins->is_contiguous(),
                "mins: expected the shape and dtype of scales");
  return K;
}

static torch::Tensor gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, const torch::Tensor* mins,
                   int64_t group_size, torch::ScalarType out_dtype, bool portable) {
  const bool int4 = mins != nullptr;
  const int64_t K = check_weight(q, scales, mins, group_size);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x: expected [..., ", K, "], got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "x: expected a floating dtype, got ", x.scalar_type());
  const int64_t M = x.numel() / K, N = q.size(0) * LANES, groups = K / group_size;
  // Per-group sums of x for the int4 min term, and (except for the AMX path, which takes bf16 or
  // fp16 x as bf16 halves) x in fp32, once per call. Done here rather than with torch ops: at one token per
  // step the kernel runs in tens of microseconds, and each extra op dispatch costs a few.
  const auto xc = x.contiguous();
  const bool bf16_dot = int4 && HAS_BF16_DOT && !portable && x.scalar_type() == torch::kBFloat16;
  const bool half_x = x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
  const bool amx = !portable && half_x && M >= 2 && amx_ready();
  std::vector<float> xf(amx ? 0 : M * K), xsum(int4 ? M * groups : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "cpu_gemm_x", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    if (!amx)
      for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(src[i]);
    for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {  // groups of [M, K] in order
      float sum = 0.f;
      for (int64_t k = 0; k < group_size; ++k) sum += static_cast<float>(src[i * group_size + k]);
      xsum[i] = sum;
    }
  });
  TORCH_CHECK(out_dtype == torch::kFloat || out_dtype == torch::kBFloat16 || out_dtype == torch::kHalf,
              "out_dtype: expected fp32, bf16 or fp16, got ", out_dtype);
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options().dtype(out_dtype));
  Problem p{xf.data(), xsum.data(), bf16_dot ? xc.data_ptr() : nullptr, q.data_ptr(), scales.data_ptr(),
            int4 ? mins->data_ptr() : nullptr, M, N, K, group_size, y.data_ptr(), out_dtype};
  const bool half = scales.scalar_type() == torch::kHalf;
  if (amx && int4) {
    half ? run_amx<true, c10::Half>(p, xc) : run_amx<true, float>(p, xc);
  } else if (amx) {
    half ? run_amx<false, c10::Half>(p, xc) : run_amx<false, float>(p, xc);
  } else if (int4) {
    half ? run<true, c10::Half>(p, portable) : run<true, float>(p, portable);
  } else {
    half ? run<false, c10::Half>(p, portable) : run<false, float>(p, portable);
  }
  return y;
}

// x [..., K] any float dtype -> [..., N] in out_dtype.
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                        int64_t group_size, torch::ScalarType out_dtype, bool portable) {
  return gemm(x, q, scales, &mins, group_size, out_dtype, portable);
}

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t group_size,
                        torch::ScalarType out_dtype, bool portable) {
  return gemm(x, q, scales, nullptr, group_size, out_dtype, portable);
}

// 8 weights to dtype at row; with lo, also what rounding left over (split weights, bf16).
template <typename scalar_t>
inline void store_row8(scalar_t* row, const float* exact, scalar_t* lo) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // the scalar conversion is ~4x slower
    const __m256 v = _mm256_loadu_ps(exact);
    const __m128bh hi = _mm256_cvtneps_pbh(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row), (__m128i)hi);
    if (lo != nullptr) {
      const __m256 back = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)hi), 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), (__m128i)_mm256_cvtneps_pbh(_mm256_sub_ps(v, back)));
    }
    return;
  }
#endif
  for (int f = 0; f < 8; ++f) {
    row[f] = static_cast<scalar_t>(exact[f]);
    if (lo != nullptr) lo[f] = static_cast<scalar_t>(exact[f] - static_cast<float>(row[f]));
  }
}

// The dense weight [N, K] in dtype: w = q * scale (+ min). For large M a dense matmul of it
// (oneDNN, with AMX where the CPU has it) beats the per-row kernel several times over.
//
// split (bf16 only): [N, 2K], row n = [hi, lo] with hi = bf16(w), lo = bf16(w - hi). Against
// [x, x] one bf16 matmul sums both halves' products in its fp32 accumulator: ~16 bits of each
// weight where bf16 alone keeps 8, one rounding of the output, at twice a bf16 matmul's cost
// (still well under fp32's here: AMX has no fp32).
torch::Tensor dequantize(torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t group_size, torch::ScalarType dtype, bool split) {
  const torch::Tensor* m = mins.has_value() ? &*mins : nullptr;
  const int64_t K = check_weight(q, scales, m, group_size), blocks = q.size(0), groups = K / group_size;
  TORCH_CHECK(!split || dtype == torch::kBFloat16, "split: bf16 only, got ", dtype);
  const int64_t N = blocks * LANES;
  const int64_t width = split ? 2 * K : K;
  auto w = torch::empty({N, width}, q.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_gemm_dequantize", [&] {
    scalar_t* out = w.data_ptr<scalar_t>();
    const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
    const bool half = scales.scalar_type() == torch::kHalf;
    auto value_at = [&](const torch::Tensor& t, int64_t i) {
      return half ? static_cast<float>(static_cast<const c10::Half*>(t.data_ptr())[i])
                  : static_cast<const float*>(t.data_ptr())[i];
    };
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sc(groups * LANES), mn(groups * LANES, 0.f);  // this block's, as fp32
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < groups * LANES; ++i) {
          sc[i] = value_at(scales, b * groups * LANES + i);
          if (m) mn[i] = value_at(*m, b * groups * LANES + i);
        }
        const uint8_t* qb = qp + b * K * (m ? 8 : 16);
        for (int64_t k0 = 0; k0 < K; k0 += 8) {  // 16 rows x 8 features at a time
          float tile[LANES][8];
          if (m) {
            const uint8_t* chunk = qb + k0 * 8;  // one 64-byte chunk
            for (int r = 0; r < LANES; ++r) {
              for (int f = 0; f < 4; ++f) {
                const uint8_t byte = chunk[int4_byte(r, f)];  // features f (low) and f + 4 (high)
                tile[r][f] = static_cast<float>(byte & 15);
                tile[r][f + 4] = static_cast<float>(byte >> 4);
              }
            }
          } else {
            for (int f = 0; f < 8; ++f)
              for (int r = 0; r < LANES; ++r) tile[r][f] = static_cast<int8_t>(qb[(k0 + f) * LANES + r]);
          }
          const int64_t g = k0 / group_size;
          for (int r = 0; r < LANES; ++r) {
            scalar_t* row = out + (b * LANES + r) * width + k0;
            const float s = sc[g * LANES + r], o = mn[g * LANES + r];
            float exact[8];
            for (int f = 0; f < 8; ++f) exact[f] = tile[r][f] * s + o;
            store_row8(row, exact, split ? row + K : nullptr);
          }
        }
      }
    });
  });
  return w;
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool has_amx() { return amx_ready(); }

}  // namespace lowbit_cpu
