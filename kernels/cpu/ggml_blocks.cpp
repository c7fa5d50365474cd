// GGUF (ggml) block-quantized GEMM and dequantization for CPU, on the file's own bytes.
//
// Weights stay exactly as the GGUF stores them: uint8 [N, row_bytes], each row a run of blocks
// (32 weights for Q5_0/Q5_1/IQ4_NL, 256-weight super-blocks for the K-quants and IQ4_XS). So the
// resident weight is the file's tensor bytes, row selection (GGUF's q/k permutation, fusing q/k/v)
// is a row copy, and an embedding table is gathered by row.
//
// Every type decodes a block to the same form: small integers q (int8) and, per sub-block of
// SUB weights, a scale s and a min m with w = s * q - m, in the order and with the fp32 roundings
// of gguf-py's `dequantize_blocks` (the reference: tests check dequantize() against it bit for
// bit). The GEMM then needs one kernel for all types:
//   y[t, n] = sum_blocks sum_sub ( s * sum_i q_i x_i  -  m * sum_i x_i )
// with the activation sums per sub-block computed once per call. The block is decoded once per
// weight row and used for every activation row of the call (a tile), so decode cost does not grow
// with batch size. Products and sums are fp32; only the summation order differs from
// dequantize-then-matmul.
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

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lowbit_cpu {
namespace {

constexpr int8_t KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
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

// K-quants' 6-bit scale and min of sub-block j from the 12 packed bytes (gguf-py get_scale_min).
inline void scale_min_k4(const uint8_t* s, int j, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline void nibbles32(const uint8_t* qs, uint8_t* out) {
  for (int l = 0; l < 16; ++l) {
    out[l] = qs[l] & 15;
    out[l + 16] = qs[l] >> 4;
  }
}

struct Q5_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 22;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* b, int8_t* q, float* s, float*) {
    uint8_t lo[32];
    nibbles32(b + 6, lo);
    const uint32_t qh = u32(b + 2);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>((lo[e] | ((qh >> e) & 1) << 4) - 16);
    s[0] = f16(b);
  }
};

struct Q5_1 {
  static constexpr int QK = 32, SUB = 32, BYTES = 24;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* b, int8_t* q, float* s, float* m) {
    uint8_t lo[32];
    nibbles32(b + 8, lo);
    const uint32_t qh = u32(b + 4);
    for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(lo[e] | ((qh >> e) & 1) << 4);
    s[0] = f16(b);
    m[0] = -f16(b + 2);
  }
};

struct IQ4_NL {
  static constexpr int QK = 32, SUB = 32, BYTES = 18;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* b, int8_t* q, float* s, float*) {
    uint8_t lo[32];
    nibbles32(b + 2, lo);
    for (int e = 0; e < 32; ++e) q[e] = KVALUES[lo[e]];
    s[0] = f16(b);
  }
};

struct Q2_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 84;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* b, int8_t* q, float* s, float* m) {
    const uint8_t* qs = b + 16;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) q[128 * h + 32 * j + l] = static_cast<int8_t>((qs[32 * h + l] >> (2 * j)) & 3);
    const float d = f16(b + 80), dmin = f16(b + 82);
    for (int i = 0; i < 16; ++i) {
      s[i] = d * static_cast<float>(b[i] & 15);
      m[i] = dmin * static_cast<float>(b[i] >> 4);
    }
  }
};

struct Q3_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 110;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* b, int8_t* q, float* s, float*) {
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) {
          const int low = (qs[32 * h + l] >> (2 * j)) & 3;
          const int high = (hmask[l] >> (4 * h + j)) & 1;
          q[128 * h + 32 * j + l] = static_cast<int8_t>(low - (high ? 0 : 4));
        }
    const float d = f16(b + 108);
    for (int i = 0; i < 16; ++i) {
      const int low = (sc[i % 8] >> (4 * (i / 8))) & 15;
      const int high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
      s[i] = d * static_cast<float>((low | high << 4) - 32);
    }
  }
};

template <bool FIVE>
struct KQuant45 {
  static constexpr int QK = 256, SUB = 32, BYTES = FIVE ? 176 : 144;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* b, int8_t* q, float* s, float* m) {
    const uint8_t* qs = b + (FIVE ? 48 : 16);
    const uint8_t* qh = b + 16;
    for (int c = 0; c < 4; ++c)
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 32; ++l) {
          int v = (qs[32 * c + l] >> (4 * t)) & 15;
          if constexpr (FIVE) v |= ((qh[l] >> (2 * c + t)) & 1) << 4;
          q[64 * c + 32 * t + l] = static_cast<int8_t>(v);
        }
    const float d = f16(b), dmin = f16(b + 2);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      scale_min_k4(b + 4, j, sc, mn);
      s[j] = d * static_cast<float>(sc);
      m[j] = dmin * static_cast<float>(mn);
    }
  }
};
using Q4_K = KQuant45<false>;
using Q5_K = KQuant45<true>;

struct Q6_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 210;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* b, int8_t* q, float* s, float*) {
    const uint8_t *ql = b, *qh = b + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {  // ggml's order: one qh byte feeds four elements 32 apart
        const int a = ql[64 * h + l], c = ql[64 * h + 32 + l], hi = qh[32 * h + l];
        int8_t* o = q + 128 * h + l;
        o[0] = static_cast<int8_t>(((a & 15) | (hi & 3) << 4) - 32);
        o[32] = static_cast<int8_t>(((c & 15) | ((hi >> 2) & 3) << 4) - 32);
        o[64] = static_cast<int8_t>(((a >> 4) | ((hi >> 4) & 3) << 4) - 32);
        o[96] = static_cast<int8_t>(((c >> 4) | ((hi >> 6) & 3) << 4) - 32);
      }
    const float d = f16(b + 208);
    for (int i = 0; i < 16; ++i) s[i] = d * static_cast<float>(sc[i]);
  }
};

struct IQ4_XS {
  static constexpr int QK = 256, SUB = 32, BYTES = 136;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* b, int8_t* q, float* s, float*) {
    const uint8_t *sl = b + 4, *qs = b + 8;
    uint16_t sh;
    std::memcpy(&sh, b + 2, 2);
    for (int j = 0; j < 8; ++j)
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 16; ++l) q[32 * j + 16 * t + l] = KVALUES[(qs[16 * j + l] >> (4 * t)) & 15];
    const float d = f16(b);
    for (int j = 0; j < 8; ++j) {
      const int low = (sl[j / 2] >> (4 * (j % 2))) & 15;
      const int high = (sh >> (2 * j)) & 3;
      s[j] = d * static_cast<float>((low | high << 4) - 32);
    }
  }
};

// ggml's type ids (gguf.GGMLQuantizationType).
enum TypeId : int64_t { kQ5_0 = 6, kQ5_1 = 7, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23 };

template <typename F>
void dispatch(int64_t type, F&& f) {
  switch (type) {
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

// Rows [n0, n1) of y [M, N] fp32 for M activation rows (x fp32 [M, K], xsum [M, K/SUB] or null).
template <typename B>
void gemm_rows(const uint8_t* w, const float* x, const float* xsum, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int SUBS = B::QK / B::SUB;
  const int64_t blocks = K / B::QK, row_bytes = blocks * B::BYTES;
  int8_t q[B::QK];
  float w_block[B::QK], s[SUBS], m[SUBS];
  std::vector<float> acc(M);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      B::decode(w + n * row_bytes + blk * B::BYTES, q, s, m);
      // Scaled once per block, then one long dot per activation row (short per-sub-block dots
      // of 16 did not vectorize).
      for (int j = 0; j < SUBS; ++j)
        for (int i = 0; i < B::SUB; ++i) w_block[j * B::SUB + i] = s[j] * static_cast<float>(q[j * B::SUB + i]);
      for (int64_t t = 0; t < M; ++t) {
        const float* xb = x + t * K + blk * B::QK;
        float dot = 0.f;
        for (int i = 0; i < B::QK; ++i) dot += w_block[i] * xb[i];
        if constexpr (B::MIN) {
          const float* xs = xsum + t * (K / B::SUB) + blk * SUBS;
          for (int j = 0; j < SUBS; ++j) dot -= m[j] * xs[j];
        }
        acc[t] += dot;
      }
    }
    for (int64_t t = 0; t < M; ++t) y[t * N + n] = acc[t];
  }
}

}  // namespace

torch::Tensor ggml_gemm(torch::Tensor x, torch::Tensor w, int64_t type) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  dispatch(type, [&](auto b) {
    using B = decltype(b);
    check_weights<B>(w, K);
    torch::Tensor xsum;
    if constexpr (B::MIN) xsum = xf.view({M, K / B::SUB, B::SUB}).sum(-1).contiguous();
    const float* xs = B::MIN ? xsum.data_ptr<float>() : nullptr;
    // Enough rows per task to amortize the per-task setup; the work per row is K weights x M rows.
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      gemm_rows<B>(w.data_ptr<uint8_t>(), xf.data_ptr<float>(), xs, y.data_ptr<float>(), M, N, K, n0, n1);
    });
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
        B::decode(src + i * B::BYTES, q, s, m);
        affine<B::QK, B::SUB, B::MIN>(q, s, m, dst + i * B::QK);
      }
    });
  });
  return out;
}

}  // namespace lowbit_cpu
