// GGUF (ggml) block-quantized GEMM and dequantization for CPU, on the file's own bytes.
//
// Weights stay exactly as the GGUF stores them: uint8 [N, row_bytes], each row a run of blocks
// (32 weights for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL, 256-weight super-blocks for the K-quants and
// IQ4_XS). So the resident weight is the file's tensor bytes, row selection (GGUF's q/k
// permutation, fusing q/k/v) is a row copy, and an embedding table is gathered by row.
//
// Every type decodes a block to the same form: small integers q (int8) and, per sub-block of
// SUB weights, a scale s and a min m with w = s * q - m, in the order and with the fp32 roundings
// of gguf-py's `dequantize_blocks` (the reference: tests check dequantize() against it bit for
// bit). A block is decoded once per call and used for every activation row of a tile, so decode
// cost does not grow with the batch. Two arithmetics:
// - fp32 activations: y = sum_sub s (q . x) - m sum(x), fp32 products and sums (only the
//   summation order differs from dequantize-then-matmul);
// - 16-bit activations (the fast mode), llama.cpp's way: activations quantized to int8 per block
//   of the weight type (32, or 256 for super-blocks as its Q8_K), integer dot products with AVX2
//   maddubs, and for super-blocks the integer sub-block scales applied before anything is
//   converted to float. Error: rounding each activation to 1/254 of its block's largest (tests
//   compare against that rounding emulated in torch). With AVX2 the file's bytes go straight into
//   registers (b32_rows_avx2: four blocks of 32 a step; rows_k_avx2: a super-block's scales
//   unpacked with SIMD, its 32-weight chunks decoded one by one): no block is written to memory
//   and no sum leaves a register before the end of the row.
//
// Layouts (byte offsets in a block; h = f16, "q[e]" = value of element e):
//   Q5_0   22 B: h d | u32 qh | u8 qs[16]            q[e] = (nib_e | bit_e(qh) << 4) - 16, s = d
//   Q5_1   24 B: h d, h m | u32 qh | u8 qs[16]       q[e] = nib_e | bit_e(qh) << 4, s = d, m = -m
//           nib: element l < 16 in the low nibble of qs[l], element l + 16 in its high nibble
//   IQ4_NL 18 B: h d | u8 qs[16]                     q[e] = KVALUES[nib_e], s = d
//   Q2_K   84 B: u8 sc[16] | u8 qs[64] | h d, h dmin q[128h+32j+l] = (qs[32h+l] >> 2j) & 3;
//                                                   s = d (sc & 15), m = dmin (sc >> 4), SUB 16
//   Q3_K  110 B: u8 hmask[32] | u8 qs[64] | u8 sc[12] | h d
//                q[128h+32j+l] = ((qs[32h+l] >> 2j) & 3) - (hmask[l] bit 4h+j ? 0 : 4);
//                6-bit signed scales (-32) packed 4+2 bits; s = d sc, SUB 16
//   Q4_K  144 B: h d, h dmin | u8 sc[12] | u8 qs[128] q[64c+32t+l] = (qs[32c+l] >> 4t) & 15;
//                6-bit scales and mins (get_scale_min); s = d sc, m = dmin mn, SUB 32
//   Q5_K  176 B: h d, h dmin | u8 sc[12] | u8 qh[32] | u8 qs[128]   Q4_K's q | (qh[l] bit e/32) << 4
//   Q6_K  210 B: u8 ql[128] | u8 qh[64] | i8 sc[16] | h d
//                within half h (r = e - 128h): lo = (ql[64h + r%64] >> 4(r/64)) & 15,
//                hi = (qh[32h + r%32] >> 2(r/32)) & 3, q = (lo | hi << 4) - 32; s = d sc, SUB 16
//   IQ4_XS 136 B: h d | u16 sh | u8 sl[4] | u8 qs[128]
//                q[32j+16t+l] = KVALUES[(qs[16j+l] >> 4t) & 15]; sc_j = (sl nibble j | sh bits 2j) - 32
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <cstring>
#include <vector>

namespace lowbit_cpu {
namespace {

constexpr int8_t KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // exact, like the software conversion, and ~10x cheaper per block
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// w = s * q - m with the product rounded before the subtraction, as numpy computes it: this one
// function is compiled without fused multiply-adds (the file's flags allow them elsewhere), so
// dequantize() equals gguf-py's values to the bit.
template <int QK, int SUB, bool MIN>
__attribute__((optimize("fp-contract=off"), noinline)) void affine(const int8_t* q, const float* s, const float* m, float* out) {
  for (int e = 0; e < QK; ++e) {
    const float v = s[e / SUB] * static_cast<float>(q[e]);
    out[e] = MIN ? v - m[e / SUB] : v;
  }
}

#if defined(__AVX2__)
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store32(int8_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// 16 bytes -> their 32 nibbles as bytes: low nibbles first (elements 0..15), then high ones.
inline __m256i nibbles32_avx2(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// 32 bits -> 32 bytes, 0xFF where the bit is set (byte e from bit e).
inline __m256i bits32_avx2(const uint8_t* p) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(u32(p))),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

// IQ4's 16 values in both lanes, for a byte shuffle by nibble.
inline __m256i kvalues_avx2() {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES));
  return _mm256_set_m128i(t, t);
}
#endif

inline void nibbles32(const uint8_t* qs, uint8_t* out) {
  for (int l = 0; l < 16; ++l) {
    out[l] = qs[l] & 15;
    out[l + 16] = qs[l] >> 4;
  }
}

// A super-block's scales as floats from their integer form (int_scales): s_j = d sc_j, m_j = dmin mn_j,
// one fp32 rounding each, as gguf-py computes them.
template <typename B>
void float_scales(const uint8_t* b, float* s, float* m) {
  constexpr int SUBS = B::QK / B::SUB;
  int16_t sc[SUBS], mn[SUBS];
  float d = 0.f, dmin = 0.f;
  B::int_scales(b, sc, mn, d, dmin);
  for (int j = 0; j < SUBS; ++j) {
    s[j] = d * static_cast<float>(sc[j]);
    if constexpr (B::MIN) m[j] = dmin * static_cast<float>(mn[j]);
  }
}

// Each type: QK weights per block of BYTES bytes, sub-blocks of SUB sharing a scale (and a min
// if MIN); quants() writes the small integers (the portable form), scales() the fp32 scales and
// mins; with AVX2, block_avx2() (blocks of 32) or prep_avx2() and chunk_avx2<C>() (super-blocks)
// decode into registers.
struct Q4_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 18;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    uint8_t lo[32];
    nibbles32(b + 2, lo);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(lo[e] - 8);
  }
  static void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
#if defined(__AVX2__)
  static constexpr int OFFSET = 8;  // the stored value is q + 8 (b32_rows_avx2 takes it unsigned)
  static __m256i unsigned_avx2(const uint8_t* b) { return nibbles32_avx2(b + 2); }
  static __m256i block_avx2(const uint8_t* b) { return _mm256_sub_epi8(unsigned_avx2(b), _mm256_set1_epi8(8)); }
#endif
};

struct Q4_1 {
  static constexpr int QK = 32, SUB = 32, BYTES = 20;
  static constexpr bool MIN = true;
  static void quants(const uint8_t* b, int8_t* q) {
    uint8_t lo[32];
    nibbles32(b + 4, lo);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(lo[e]);
  }
  static void scales(const uint8_t* b, float* s, float* m) {
    s[0] = f16(b);
    m[0] = -f16(b + 2);
  }
#if defined(__AVX2__)
  static constexpr int OFFSET = 0;
  static __m256i block_avx2(const uint8_t* b) { return nibbles32_avx2(b + 4); }
#endif
};

struct Q8_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 34;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) { std::memcpy(q, b + 2, 32); }
  static void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
#if defined(__AVX2__)
  static constexpr int OFFSET = 0;
  static __m256i block_avx2(const uint8_t* b) { return load32(b + 2); }
#endif
};

struct Q5_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 22;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    uint8_t lo[32];
    nibbles32(b + 6, lo);
    const uint32_t qh = u32(b + 2);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>((lo[e] | ((qh >> e) & 1) << 4) - 16);
  }
  static void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
#if defined(__AVX2__)
  static constexpr int OFFSET = 16;  // q + 16; offsets are powers of two (b32_rows_avx2 shifts)
  static __m256i unsigned_avx2(const uint8_t* b) {
    return _mm256_or_si256(nibbles32_avx2(b + 6), _mm256_and_si256(bits32_avx2(b + 2), _mm256_set1_epi8(16)));
  }
  static __m256i block_avx2(const uint8_t* b) { return _mm256_sub_epi8(unsigned_avx2(b), _mm256_set1_epi8(16)); }
#endif
};

struct Q5_1 {
  static constexpr int QK = 32, SUB = 32, BYTES = 24;
  static constexpr bool MIN = true;
  static void quants(const uint8_t* b, int8_t* q) {
    uint8_t lo[32];
    nibbles32(b + 8, lo);
    const uint32_t qh = u32(b + 4);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(lo[e] | ((qh >> e) & 1) << 4);
  }
  static void scales(const uint8_t* b, float* s, float* m) {
    s[0] = f16(b);
    m[0] = -f16(b + 2);
  }
#if defined(__AVX2__)
  static constexpr int OFFSET = 0;
  static __m256i block_avx2(const uint8_t* b) {
    return _mm256_or_si256(nibbles32_avx2(b + 8), _mm256_and_si256(bits32_avx2(b + 4), _mm256_set1_epi8(16)));
  }
#endif
};

struct IQ4_NL {
  static constexpr int QK = 32, SUB = 32, BYTES = 18;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    uint8_t lo[32];
    nibbles32(b + 2, lo);
    for (int e = 0; e < 32; ++e) q[e] = KVALUES[lo[e]];
  }
  static void scales(const uint8_t* b, float* s, float*) { s[0] = f16(b); }
#if defined(__AVX2__)
  static constexpr int OFFSET = 0;
  static __m256i block_avx2(const uint8_t* b) { return _mm256_shuffle_epi8(kvalues_avx2(), nibbles32_avx2(b + 2)); }
#endif
};

struct Q2_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 84;
  static constexpr bool MIN = true;
  static void quants(const uint8_t* b, int8_t* q) {
    const uint8_t* qs = b + 16;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) q[128 * h + 32 * j + l] = static_cast<int8_t>((qs[32 * h + l] >> (2 * j)) & 3);
  }
  static void int_scales(const uint8_t* b, int16_t* sc, int16_t* mn, float& d, float& dmin) {
    for (int i = 0; i < 16; ++i) {
      sc[i] = b[i] & 15;
      mn[i] = b[i] >> 4;
    }
    d = f16(b + 80);
    dmin = f16(b + 82);
  }
  static void scales(const uint8_t* b, float* s, float* m) { float_scales<Q2_K>(b, s, m); }
#if defined(__AVX2__)
  // Register form (rows_k_avx2): chunk C's quants as unsigned bytes, scales and mins as int16.
  static constexpr int OFFSET = 0;
  static void prep_avx2(const uint8_t* b, __m256i& sc, __m256i& mn, float& d, float& dmin) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    sc = _mm256_and_si256(v, _mm256_set1_epi16(15));
    mn = _mm256_srli_epi16(v, 4);
    d = f16(b + 80);
    dmin = f16(b + 82);
  }
  template <int C>
  static __m256i chunk_avx2(const uint8_t* b) {
    return _mm256_and_si256(_mm256_srli_epi16(load32(b + 16 + 32 * (C / 4)), 2 * (C % 4)), _mm256_set1_epi8(3));
  }
#endif
};

struct Q3_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 110;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    const uint8_t *hmask = b, *qs = b + 32;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) {
          const int low = (qs[32 * h + l] >> (2 * j)) & 3;
          const int high = (hmask[l] >> (4 * h + j)) & 1;
          q[128 * h + 32 * j + l] = static_cast<int8_t>(low - (high ? 0 : 4));
        }
  }
  static void int_scales(const uint8_t* b, int16_t* sc, int16_t*, float& d, float&) {
    const uint8_t* packed = b + 96;
    for (int i = 0; i < 16; ++i) {
      const int low = (packed[i % 8] >> (4 * (i / 8))) & 15;
      const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
      sc[i] = static_cast<int16_t>((low | high << 4) - 32);
    }
    d = f16(b + 108);
  }
  static void scales(const uint8_t* b, float* s, float* m) { float_scales<Q3_K>(b, s, m); }
#if defined(__AVX2__)
  // Register form: q + 4 (0..7, the high bit as 4), with the offset as a min of 4 sc (dmin = d).
  static constexpr int OFFSET = 4;
  static void prep_avx2(const uint8_t* b, __m256i& sc, __m256i& mn, float& d, float& dmin) {
    alignas(32) int16_t s[16], unused[16];
    int_scales(b, s, unused, d, dmin);
    sc = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    mn = _mm256_slli_epi16(sc, 2);
    dmin = d;
  }
  template <int C>
  static __m256i chunk_avx2(const uint8_t* b) {
    constexpr int h = C / 4, j = C % 4;
    const __m256i low = _mm256_and_si256(_mm256_srli_epi16(load32(b + 32 + 32 * h), 2 * j), _mm256_set1_epi8(3));
    const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << (4 * h + j)));
    const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(load32(b), bit), bit), _mm256_set1_epi8(4));
    return _mm256_or_si256(low, high);
  }
#endif
};

template <bool FIVE>
struct KQuant45 {
  static constexpr int QK = 256, SUB = 32, BYTES = FIVE ? 176 : 144;
  static constexpr bool MIN = true;
  static void quants(const uint8_t* b, int8_t* q) {
    const uint8_t* qs = b + (FIVE ? 48 : 16);
    const uint8_t* qh = b + 16;
    for (int c = 0; c < 4; ++c)
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 32; ++l) {
          int v = (qs[32 * c + l] >> (4 * t)) & 15;
          if constexpr (FIVE) v |= ((qh[l] >> (2 * c + t)) & 1) << 4;
          q[64 * c + 32 * t + l] = static_cast<int8_t>(v);
        }
  }
  static void int_scales(const uint8_t* b, int16_t* sc, int16_t* mn, float& d, float& dmin) {
    // get_scale_min for all 8 sub-blocks at once on 32-bit words (llama.cpp's kmask trick):
    // bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same
    // for mins, bytes 8-11 the low nibbles of scales 4-7 and mins 4-7.
    uint32_t w[3];
    std::memcpy(w, b + 4, 12);
    const uint32_t low6 = 0x3f3f3f3f, nib = 0x0f0f0f0f, top2 = 0x03030303;
    const uint32_t scales[2] = {w[0] & low6, (w[2] & nib) | (((w[0] >> 6) & top2) << 4)};
    const uint32_t mins[2] = {w[1] & low6, ((w[2] >> 4) & nib) | (((w[1] >> 6) & top2) << 4)};
    uint8_t bytes[16];
    std::memcpy(bytes, scales, 8);
    std::memcpy(bytes + 8, mins, 8);
    for (int j = 0; j < 8; ++j) {
      sc[j] = bytes[j];
      mn[j] = bytes[8 + j];
    }
    d = f16(b);
    dmin = f16(b + 2);
  }
  static void scales(const uint8_t* b, float* s, float* m) { float_scales<KQuant45>(b, s, m); }
#if defined(__AVX2__)
  // Register form: scales in int16 lanes 0-7, mins in lanes 0-7 of mn (8-15 zero).
  static constexpr int OFFSET = 0;
  static void prep_avx2(const uint8_t* b, __m256i& sc, __m256i& mn, float& d, float& dmin) {
    uint32_t w[3];
    std::memcpy(w, b + 4, 12);
    const uint32_t low6 = 0x3f3f3f3f, nib = 0x0f0f0f0f, top2 = 0x03030303;
    const uint32_t s0 = w[0] & low6, s1 = (w[2] & nib) | (((w[0] >> 6) & top2) << 4);
    const uint32_t m0 = w[1] & low6, m1 = ((w[2] >> 4) & nib) | (((w[1] >> 6) & top2) << 4);
    sc = _mm256_cvtepu8_epi16(_mm_set_epi32(static_cast<int>(m1), static_cast<int>(m0), static_cast<int>(s1), static_cast<int>(s0)));
    mn = _mm256_permute2x128_si256(sc, sc, 0x81);
    d = f16(b);
    dmin = f16(b + 2);
  }
  template <int C>
  static __m256i chunk_avx2(const uint8_t* b) {
    const __m256i v = load32(b + (FIVE ? 48 : 16) + 32 * (C / 2));
    __m256i q = _mm256_and_si256(C % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
    if constexpr (FIVE) {  // bit C of qh[l] to bit 4 (16-bit shifts; the mask drops what crossed bytes)
      const __m256i qh = load32(b + 16);
      const __m256i moved = C <= 4 ? _mm256_slli_epi16(qh, 4 - C) : _mm256_srli_epi16(qh, C - 4);
      q = _mm256_or_si256(q, _mm256_and_si256(moved, _mm256_set1_epi8(16)));
    }
    return q;
  }
#endif
};
using Q4_K = KQuant45<false>;
using Q5_K = KQuant45<true>;

struct Q6_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 210;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {  // ggml's order: one qh byte feeds four elements 32 apart
        const int a = ql[64 * h + l], c = ql[64 * h + 32 + l], hi = qh[32 * h + l];
        int8_t* o = q + 128 * h + l;
        o[0] = static_cast<int8_t>(((a & 15) | (hi & 3) << 4) - 32);
        o[32] = static_cast<int8_t>(((c & 15) | ((hi >> 2) & 3) << 4) - 32);
        o[64] = static_cast<int8_t>(((a >> 4) | ((hi >> 4) & 3) << 4) - 32);
        o[96] = static_cast<int8_t>(((c >> 4) | ((hi >> 6) & 3) << 4) - 32);
      }
  }
  static void int_scales(const uint8_t* b, int16_t* sc, int16_t*, float& d, float&) {
    for (int i = 0; i < 16; ++i) sc[i] = static_cast<int8_t>(b[192 + i]);
    d = f16(b + 208);
  }
  static void scales(const uint8_t* b, float* s, float* m) { float_scales<Q6_K>(b, s, m); }
#if defined(__AVX2__)
  // Register form: q + 32 (0..63), with the offset as a min of 32 sc (dmin = d).
  static constexpr int OFFSET = 32;
  static void prep_avx2(const uint8_t* b, __m256i& sc, __m256i& mn, float& d, float& dmin) {
    sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    mn = _mm256_slli_epi16(sc, 5);
    d = dmin = f16(b + 208);
  }
  template <int C>
  static __m256i chunk_avx2(const uint8_t* b) {
    constexpr int h = C / 4, j = C % 4;
    const __m256i src = load32(b + 64 * h + 32 * (j % 2));
    const __m256i low = _mm256_and_si256(j < 2 ? src : _mm256_srli_epi16(src, 4), _mm256_set1_epi8(15));
    const __m256i hi = load32(b + 128 + 32 * h);  // bits 2j, 2j+1 to bits 4, 5
    const __m256i moved = j == 0 ? _mm256_slli_epi16(hi, 4) : j == 1 ? _mm256_slli_epi16(hi, 2) : j == 2 ? hi : _mm256_srli_epi16(hi, 2);
    return _mm256_or_si256(low, _mm256_and_si256(moved, _mm256_set1_epi8(0x30)));
  }
#endif
};

struct IQ4_XS {
  static constexpr int QK = 256, SUB = 32, BYTES = 136;
  static constexpr bool MIN = false;
  static void quants(const uint8_t* b, int8_t* q) {
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 8; ++j)
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 16; ++l) q[32 * j + 16 * t + l] = KVALUES[(qs[16 * j + l] >> (4 * t)) & 15];
  }
  static void int_scales(const uint8_t* b, int16_t* sc, int16_t*, float& d, float&) {
    const uint8_t* sl = b + 4;
    uint16_t sh;
    std::memcpy(&sh, b + 2, 2);
    for (int j = 0; j < 8; ++j) {
      const int low = (sl[j / 2] >> (4 * (j % 2))) & 15;
      const int high = (sh >> (2 * j)) & 3;
      sc[j] = static_cast<int16_t>((low | high << 4) - 32);
    }
    d = f16(b);
  }
  static void scales(const uint8_t* b, float* s, float* m) { float_scales<IQ4_XS>(b, s, m); }
#if defined(__AVX2__)
  // Register form: signed values (the kernel moves their sign onto the activations), no min.
  static constexpr int OFFSET = 0;
  static void prep_avx2(const uint8_t* b, __m256i& sc, __m256i& mn, float& d, float& dmin) {
    alignas(16) int16_t s[8], unused[8];
    int_scales(b, s, unused, d, dmin);
    sc = _mm256_zextsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(s)));
    mn = _mm256_setzero_si256();
    dmin = 0.f;
  }
  template <int C>
  static __m256i chunk_avx2(const uint8_t* b) { return _mm256_shuffle_epi8(kvalues_avx2(), nibbles32_avx2(b + 8 + 16 * C)); }
#endif
};

// ggml's type ids (gguf.GGMLQuantizationType).
enum TypeId : int64_t {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
  kIQ4_NL = 20, kIQ4_XS = 23
};

template <typename F>
void dispatch(int64_t type, F&& f) {
  switch (type) {
    case kQ4_0: return f(Q4_0{});
    case kQ4_1: return f(Q4_1{});
    case kQ8_0: return f(Q8_0{});
    case kQ5_0: return f(Q5_0{});
    case kQ5_1: return f(Q5_1{});
    case kQ2_K: return f(Q2_K{});
    case kQ3_K: return f(Q3_K{});
    case kQ4_K: return f(Q4_K{});
    case kQ5_K: return f(Q5_K{});
    case kQ6_K: return f(Q6_K{});
    case kIQ4_NL: return f(IQ4_NL{});
    case kIQ4_XS: return f(IQ4_XS{});
    default: TORCH_CHECK(false, "ggml type ", type, " has no CPU kernel");
  }
}

template <typename B>
void check_weights(const torch::Tensor& w, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "weights must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(k % B::QK == 0 && w.size(1) == k / B::QK * B::BYTES, "row of ", w.size(1), " bytes does not hold ", k, " weights");
}

// Compile-time loop: f(std::integral_constant<int, 0>{}) ... f(<N - 1>).
template <int N, typename F, int... I>
inline void unroll(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unroll(F&& f) {
  unroll<N>(f, std::make_integer_sequence<int, N>{});
}

// The block's small integers (B::quants' values) with AVX2 where SIMD: through the register
// decoders the int8 GEMM uses (block_avx2, or chunk_avx2 less the offset it carries).
template <typename B, bool SIMD>
inline void quants(const uint8_t* b, int8_t* q) {
#if defined(__AVX2__)
  if constexpr (SIMD && B::QK == 32) return store32(q, B::block_avx2(b));
  if constexpr (SIMD && B::QK == 256) {
    return unroll<B::QK / 32>([&](auto c) {
      constexpr int C = decltype(c)::value;
      store32(q + 32 * C, _mm256_sub_epi8(B::template chunk_avx2<C>(b), _mm256_set1_epi8(B::OFFSET)));
    });
  }
#endif
  B::quants(b, q);
}

constexpr int64_t TILE = 16;  // activation rows sharing one decode of a weight block

struct Operands {
  const uint8_t* w;
  const float* x;     // [M, K] fp32 (fp32 path)
  const int8_t* xq;   // [M, K] int8 (int8 path)
  const float* dx;    // [M, K/32] scales of xq
  const float* xsum;  // [M, K/SUB] sums of x (or of dx * xq) per weight sub-block (types with mins)
  const int16_t* bsum;  // [M, K/SUB] integer sums of xq per sub-block (|sum| <= 32 x 127)
  float* y;           // [M, N]
  int64_t M, N, K;
};

// fp32 path: y = sum over sub-blocks of s * (q . x) - m * sum(x); products and sums in fp32.
template <typename B, bool SIMD>
void rows_fp32(const Operands& o, int64_t n0, int64_t n1, int64_t m0, int64_t mt) {
  constexpr int SUBS = B::QK / B::SUB;
  const int64_t blocks = o.K / B::QK, row_bytes = blocks * B::BYTES;
  alignas(32) int8_t q[B::QK];
  float w_block[B::QK], s[SUBS], m[SUBS], acc[TILE];
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc, acc + mt, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* b = o.w + n * row_bytes + blk * B::BYTES;
      quants<B, SIMD>(b, q);
      B::scales(b, s, m);
      // Scaled once per block, then one long dot per activation row (short per-sub-block dots of
      // 16 did not vectorize).
      for (int j = 0; j < SUBS; ++j)
        for (int i = 0; i < B::SUB; ++i) w_block[j * B::SUB + i] = s[j] * static_cast<float>(q[j * B::SUB + i]);
      for (int64_t t = 0; t < mt; ++t) {
        const float* xb = o.x + (m0 + t) * o.K + blk * B::QK;
        float dot = 0.f;
        for (int i = 0; i < B::QK; ++i) dot += w_block[i] * xb[i];
        if constexpr (B::MIN) {
          const float* xs = o.xsum + (m0 + t) * (o.K / B::SUB) + blk * SUBS;
          for (int j = 0; j < SUBS; ++j) dot -= m[j] * xs[j];
        }
        acc[t] += dot;
      }
    }
    for (int64_t t = 0; t < mt; ++t) o.y[(m0 + t) * o.N + n] = acc[t];
  }
}

// int8 path (llama.cpp's way for quantized GEMMs): integer dot products of the weights' small
// integers with activations quantized per block, scaled per block or sub-block:
//   s * dx * (q . xq) - m * dx * sum(xq).
#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Blocks of 32, portable loops (the AVX2 form is rows_int8_32_avx2).
template <typename B>
void rows_int8_portable(const Operands& o, int64_t n0, int64_t n1, int64_t m0, int64_t mt) {
  const int64_t blocks = o.K / 32;
  int8_t q[32];
  float s[1], m[1];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t t = 0; t < mt; ++t) o.y[(m0 + t) * o.N + n] = 0.f;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* b = o.w + (n * blocks + blk) * B::BYTES;
      B::quants(b, q);
      B::scales(b, s, m);
      for (int64_t t = 0; t < mt; ++t) {
        const int64_t row = m0 + t;
        const int8_t* xq = o.xq + row * o.K + blk * 32;
        int32_t isum = 0;
        for (int i = 0; i < 32; ++i) isum += q[i] * xq[i];
        float v = s[0] * o.dx[row * blocks + blk] * static_cast<float>(isum);
        if constexpr (B::MIN) v -= m[0] * o.xsum[row * blocks + blk];
        o.y[row * o.N + n] += v;
      }
    }
  }
}

#if defined(__AVX2__)
inline int16_t half_bits(const uint8_t* p) {
  int16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Blocks of 32 with AVX2, four blocks a step for R activation rows: the four blocks' integer sums
// fold into one vector (lanes i and i + 4 hold block i's two halves), converted once and scaled by
// the four blocks' d_w dx at once, so the float work per block is a quarter of a block-at-a-time
// loop and no block waits on the previous one's multiply-add. Each block is decoded once for the
// R rows. Types with a min add m (sum of the rounded activations) the same way, four at a time.
template <typename B, int R>
void b32_rows_avx2(const Operands& o, int64_t n, int64_t row0) {
  constexpr bool SIGNED = !B::MIN && B::OFFSET == 0;
  const int64_t blocks = o.K / 32;
  const uint8_t* w = o.w + n * blocks * B::BYTES;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  float tail[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t blk = 0;
  for (; blk + 4 <= blocks; blk += 4) {
    const uint8_t* b = w + blk * B::BYTES;
    constexpr int S = B::BYTES;
    const __m128 ws = _mm_cvtph_ps(_mm_setr_epi16(half_bits(b), half_bits(b + S), half_bits(b + 2 * S), half_bits(b + 3 * S), 0, 0, 0, 0));
    [[maybe_unused]] __m256 wm;
    if constexpr (B::MIN) {
      wm = _mm256_zextps128_ps256(_mm_cvtph_ps(
          _mm_setr_epi16(half_bits(b + 2), half_bits(b + S + 2), half_bits(b + 2 * S + 2), half_bits(b + 3 * S + 2), 0, 0, 0, 0)));
    }
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      if constexpr (B::OFFSET) q[i] = B::unsigned_avx2(b + i * S);
      else q[i] = B::block_avx2(b + i * S);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      const int8_t* x = o.xq + row * o.K + blk * 32;
      __m256i p[4];
      for (int i = 0; i < 4; ++i) {
        __m256i a = load32(reinterpret_cast<const uint8_t*>(x + 32 * i));
        // maddubs multiplies unsigned by signed bytes: types with a min or an offset take q >= 0;
        // the others give |q| and move q's sign onto the activation.
        if constexpr (SIGNED) a = _mm256_sign_epi8(a, q[i]);
        p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(SIGNED ? _mm256_sign_epi8(q[i], q[i]) : q[i], a), ones);
      }
      __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
      if constexpr (B::OFFSET) {  // (q + OFFSET) . x - OFFSET sum(x), exact in int32
        const __m128i bsum = _mm_cvtepi16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(o.bsum + row * blocks + blk)));
        sums = _mm256_sub_epi32(sums, _mm256_zextsi128_si256(_mm_slli_epi32(bsum, B::OFFSET == 8 ? 3 : 4)));
      }
      const __m128 scale = _mm_mul_ps(ws, _mm_loadu_ps(o.dx + row * blocks + blk));
      acc[r] = _mm256_fmadd_ps(_mm256_set_m128(scale, scale), _mm256_cvtepi32_ps(sums), acc[r]);
      if constexpr (B::MIN) acc[r] = _mm256_fmadd_ps(wm, _mm256_zextps128_ps256(_mm_loadu_ps(o.xsum + row * blocks + blk)), acc[r]);
    }
  }
  for (; blk < blocks; ++blk) {  // the last K/32 mod 4 blocks, one at a time
    const uint8_t* b = w + blk * B::BYTES;
    const __m256i q = B::block_avx2(b);
    float s[1], m[1];
    B::scales(b, s, m);
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      __m256i a = load32(reinterpret_cast<const uint8_t*>(o.xq + row * o.K + blk * 32));
      if constexpr (!B::MIN) a = _mm256_sign_epi8(a, q);
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(B::MIN ? q : _mm256_sign_epi8(q, q), a), ones);
      tail[r] += s[0] * o.dx[row * blocks + blk] * hsum(_mm256_cvtepi32_ps(p));
      if constexpr (B::MIN) tail[r] -= m[0] * o.xsum[row * blocks + blk];
    }
  }
  for (int r = 0; r < R; ++r) o.y[(row0 + r) * o.N + n] = hsum(acc[r]) + tail[r];
}

// Weight rows n0..n1 against the tile's activation rows in groups of up to four: kernel(count, n,
// row0) with the group size as a compile-time constant, so each size keeps its sums in registers.
template <typename F>
void row_groups(int64_t n0, int64_t n1, int64_t m0, int64_t mt, F&& kernel) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t t0 = 0; t0 < mt; t0 += 4) {
      switch (std::min<int64_t>(4, mt - t0)) {
        case 1: kernel(std::integral_constant<int, 1>{}, n, m0 + t0); break;
        case 2: kernel(std::integral_constant<int, 2>{}, n, m0 + t0); break;
        case 3: kernel(std::integral_constant<int, 3>{}, n, m0 + t0); break;
        default: kernel(std::integral_constant<int, 4>{}, n, m0 + t0); break;
      }
    }
  }
}

template <typename B>
void rows_int8_32_avx2(const Operands& o, int64_t n0, int64_t n1, int64_t m0, int64_t mt) {
  row_groups(n0, n1, m0, mt, [&](auto rows, int64_t n, int64_t row0) { b32_rows_avx2<B, decltype(rows)::value>(o, n, row0); });
}
#endif

// Super-block types (QK 256) with activations quantized per 256 (llama.cpp's Q8_K), portable
// loops (the AVX2 form is rows_k_avx2): the integer sub-block scales multiply the integer dot
// products before anything is converted to float, one conversion per block and activation row:
//   y += d dx sum_j sc_j (q . xq)_j  -  dmin dx sum_j mn_j bsum_j      (bsum_j = sum of xq in j)
// Integer ranges: |q| <= 127 and |xq| <= 127 keep maddubs' int16 pair sums below 32767; scales
// |sc| <= 127 keep a block's int32 sums below 2^27.
template <typename B>
void rows_int8_k(const Operands& o, int64_t n0, int64_t n1, int64_t m0, int64_t mt) {
  constexpr int SUBS = B::QK / B::SUB;
  const int64_t blocks = o.K / B::QK, row_bytes = blocks * B::BYTES;
  int8_t q[B::QK];
  int16_t sc[SUBS], mn[SUBS];
  float acc[TILE];
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc, acc + mt, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* b = o.w + n * row_bytes + blk * B::BYTES;
      B::quants(b, q);
      float d = 0.f, dmin = 0.f;
      B::int_scales(b, sc, mn, d, dmin);
      for (int64_t t = 0; t < mt; ++t) {
        const int64_t row = m0 + t;
        const int8_t* xq = o.xq + row * o.K + blk * B::QK;
        const float dx = o.dx[row * blocks + blk];
        int32_t isum = 0;
        for (int j = 0; j < SUBS; ++j) {
          int32_t part = 0;
          for (int i = 0; i < B::SUB; ++i) part += q[j * B::SUB + i] * xq[j * B::SUB + i];
          isum += sc[j] * part;
        }
        acc[t] += d * dx * static_cast<float>(isum);
        if constexpr (B::MIN) {
          const int16_t* bsum = o.bsum + row * (o.K / B::SUB) + blk * SUBS;
          int32_t msum = 0;
          for (int j = 0; j < SUBS; ++j) msum += mn[j] * bsum[j];
          acc[t] -= dmin * dx * static_cast<float>(msum);
        }
      }
    }
    for (int64_t t = 0; t < mt; ++t) o.y[(m0 + t) * o.N + n] = acc[t];
  }
}

#if defined(__AVX2__)
// Chunk C's int16 scale lanes from the block's scales (prep_avx2): one scale for all 16 lanes
// (sub-blocks of 32), or sub-block 2C's for lanes 0-7 and 2C+1's for lanes 8-15 (sub-blocks of 16;
// maddubs' lane i sums weights 2i and 2i+1). `half` holds the right 128-bit half in both lanes.
template <int SUB, int C>
inline __m256i chunk_scales(__m256i half) {
  if constexpr (SUB == 32) return _mm256_shuffle_epi8(half, _mm256_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * C)));
  constexpr int i0 = (2 * C) % 8, i1 = (2 * C + 1) % 8;
  return _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * i1)),
                                                    _mm_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * i0))));
}

// Super-blocks straight from the file's bytes into registers (the decode path): for R activation
// rows (int8 per 256, as llama.cpp's Q8_K) and one weight row, each 32-weight chunk is decoded once
// and used for all R rows; the sums stay in registers for the whole row.
//   y = sum_blocks d dx sum_j sc_j (q . xq)_j  -  dmin dx sum_j mn_j bsum_j
// Types whose quants are signed around an offset (Q3_K, Q6_K) store q + OFFSET and take the offset
// as a min of OFFSET sc_j with dmin = d, subtracted in int32 before the one float conversion; IQ4_XS
// keeps signed values and moves their sign onto the activations (maddubs takes unsigned weights).
template <typename B, int R>
void k_rows_avx2(const Operands& o, int64_t n, int64_t row0) {
  constexpr int SUBS = B::QK / B::SUB;
  constexpr bool SIGNED = !B::MIN && B::OFFSET == 0;
  const int64_t blocks = o.K / B::QK;
  const uint8_t* w = o.w + n * blocks * B::BYTES;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* b = w + blk * B::BYTES;
    __m256i sc, mn;
    float d, dmin;
    B::prep_avx2(b, sc, mn, d, dmin);
    const __m256i lo = _mm256_permute4x64_epi64(sc, 0x44);
    [[maybe_unused]] const __m256i hi = _mm256_permute4x64_epi64(sc, 0xEE);
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    unroll<B::QK / 32>([&](auto c) {
      constexpr int C = decltype(c)::value;
      const __m256i q = B::template chunk_avx2<C>(b);
      const __m256i s = chunk_scales<B::SUB, C>(B::SUB == 16 && C >= 4 ? hi : lo);
      const __m256i q_abs = SIGNED ? _mm256_sign_epi8(q, q) : q;
      for (int r = 0; r < R; ++r) {
        __m256i a = load32(reinterpret_cast<const uint8_t*>(o.xq + (row0 + r) * o.K + blk * B::QK + 32 * C));
        if constexpr (SIGNED) a = _mm256_sign_epi8(a, q);
        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q_abs, a), s));
      }
    });
    for (int r = 0; r < R; ++r) {
      const float dx = o.dx[(row0 + r) * blocks + blk];
      if constexpr (B::MIN || B::OFFSET) {
        const int16_t* bs = o.bsum + (row0 + r) * (o.K / B::SUB) + blk * SUBS;
        const __m256i bsum = SUBS == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs))
                                        : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bs)));
        const __m256i msum = _mm256_madd_epi16(mn, bsum);
        if constexpr (B::OFFSET) {
          isum[r] = _mm256_sub_epi32(isum[r], msum);
        } else {
          acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(msum), acc[r]);
        }
      }
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) o.y[(row0 + r) * o.N + n] = hsum(acc[r]);
}

template <typename B>
void rows_k_avx2(const Operands& o, int64_t n0, int64_t n1, int64_t m0, int64_t mt) {
  row_groups(n0, n1, m0, mt, [&](auto rows, int64_t n, int64_t row0) { k_rows_avx2<B, decltype(rows)::value>(o, n, row0); });
}
#endif

#if defined(__AVX2__)
// quantize_block with AVX2 (blocks of a multiple of 32), the same values: cvtps rounds half to
// even under the default rounding mode, as nearbyint does.
inline float quantize_block_avx2(const float* v, int block, int8_t* out) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int i = 0; i < block; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  const __m256 scale = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int i = 0; i < block; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), scale));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    store32(out + i, _mm256_permutevar8x32_epi32(bytes, order));
  }
  return d;
}
#endif

// One block of activations to int8: scale amax / 127, x * (1 / scale) rounded half to even.
inline float quantize_block(const float* v, int block, int8_t* out) {
  float amax = 0.f;
  for (int i = 0; i < block; ++i) amax = std::max(amax, std::abs(v[i]));
  const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < block; ++i) out[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
  return d;
}

// x fp32 [M, K] -> int8 [M, K] and one scale per `block` (32 or 256), and the integer sums of each
// `sub` quantized values (for the min terms).
void quantize_activations(const float* x, int64_t count, int block, int sub, int8_t* xq, float* dx, int16_t* bsum) {
  for (int64_t c = 0; c < count / block; ++c) {
#if defined(__AVX2__)
    dx[c] = quantize_block_avx2(x + c * block, block, xq + c * block);
#else
    dx[c] = quantize_block(x + c * block, block, xq + c * block);
#endif
  }
  for (int64_t j = 0; j < count / sub; ++j) {
    int32_t total = 0;
    for (int i = 0; i < sub; ++i) total += xq[j * sub + i];
    bsum[j] = static_cast<int16_t>(total);
  }
}

#if defined(__AVX2__)
constexpr bool HAS_AVX2 = true;
#else
constexpr bool HAS_AVX2 = false;
#endif

}  // namespace

bool ggml_has_avx2() { return HAS_AVX2; }

torch::Tensor ggml_gemm(torch::Tensor x, torch::Tensor w, int64_t type, bool int8_activations, bool portable) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  dispatch(type, [&](auto b) {
    using B = decltype(b);
    check_weights<B>(w, K);
    Operands o{w.data_ptr<uint8_t>(), xf.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, y.data_ptr<float>(), M, N, K};
    // Activations are quantized per block of the weight type: 32, or 256 for super-blocks.
    constexpr bool SUPER = B::QK == 256;
    // Buffers reused across calls (a decode step makes ~100 of these calls, each small), kept at
    // the largest size seen; thread-local, so concurrent callers never share them.
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, xsum_int8;
    thread_local std::vector<int16_t> bsum;
    torch::Tensor xsum;
    if (int8_activations) {
      xq.resize(M * K);
      dx.resize(M * K / B::QK);
      bsum.resize(M * K / B::SUB);
      quantize_activations(o.x, M * K, B::QK, B::SUB, xq.data(), dx.data(), bsum.data());
      o.xq = xq.data();
      o.dx = dx.data();
      o.bsum = bsum.data();
    }
    if (B::MIN && !(SUPER && int8_activations)) {
      // The min term sums the activations the dot products see: with the quantized ones, the
      // result is exactly W . x_hat (as llama.cpp's Q8_1 sums do), whose error is bounded by |W|
      // rather than by |s q|, which for affine types can be several times larger.
      if (int8_activations) {  // blocks of 32: one sum per scale
        xsum_int8.resize(bsum.size());
        for (size_t i = 0; i < bsum.size(); ++i) xsum_int8[i] = static_cast<float>(bsum[i]) * dx[i];
        o.xsum = xsum_int8.data();
      } else {
        xsum = xf.view({M, K / B::SUB, B::SUB}).sum(-1).contiguous();
        o.xsum = xsum.data_ptr<float>();
      }
    }
    const bool simd = HAS_AVX2 && !portable;
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {
      const int64_t mt = std::min(TILE, M - m0);
      // Enough rows per task to amortize its setup; each row is K weights against mt activations.
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        if (int8_activations) {
          if constexpr (SUPER) {
#if defined(__AVX2__)
            if (simd) return rows_k_avx2<B>(o, n0, n1, m0, mt);
#endif
            rows_int8_k<B>(o, n0, n1, m0, mt);
          } else {
#if defined(__AVX2__)
            if (simd) return rows_int8_32_avx2<B>(o, n0, n1, m0, mt);
#endif
            rows_int8_portable<B>(o, n0, n1, m0, mt);
          }
        } else {
          simd ? rows_fp32<B, true>(o, n0, n1, m0, mt) : rows_fp32<B, false>(o, n0, n1, m0, mt);
        }
      });
    }
  });
  return y;
}

torch::Tensor ggml_dequantize(torch::Tensor w, int64_t k, int64_t type) {
  const int64_t N = w.size(0);
  auto out = torch::empty({N, k}, torch::TensorOptions().dtype(torch::kFloat));
  dispatch(type, [&](auto b) {
    using B = decltype(b);
    check_weights<B>(w, k);
    constexpr int SUBS = B::QK / B::SUB;
    const int64_t blocks = k / B::QK;
    const uint8_t* src = w.data_ptr<uint8_t>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, N * blocks, 64, [&](int64_t b0, int64_t b1) {
      int8_t q[B::QK];
      float s[SUBS], m[SUBS];
      for (int64_t i = b0; i < b1; ++i) {
        B::quants(src + i * B::BYTES, q);
        B::scales(src + i * B::BYTES, s, m);
        affine<B::QK, B::SUB, B::MIN>(q, s, m, dst + i * B::QK);
      }
    });
  });
  return out;
}

}  // namespace lowbit_cpu
