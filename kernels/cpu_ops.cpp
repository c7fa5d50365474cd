// Fused CPU ops for the decode step, where eager PyTorch spends more time dispatching small ops
// than computing. Each has a torch reference it is tested against (tests/kernels/test_cpu_ops.py):
//   add_rms_norm           -> residual += x; F.rms_norm(residual, weight) cast to out_dtype
//   paged_decode_attention -> kernels/paged_attention.py decode_attention_cpu
//   paged_prefill_attention -> kernels/paged_attention.py prefill_attention_cpu (SDPA's math path)
//   rotary_kv_store        -> runtime/layers/rotary.py apply_rotary + kernels/kv_store.py kv_store_ref
// Layouts are those documented in kernels/paged_attention.py and kernels/kv_store.py.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace lowbit_cpu {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// residual [T, N] fp32 (updated in place), x [T, N] any float dtype, weight [N] fp32.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps,
                           torch::ScalarType out_dtype) {
  TORCH_CHECK(residual.scalar_type() == torch::kFloat && residual.is_contiguous(), "residual: contiguous fp32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.is_contiguous(), "weight: contiguous fp32");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.dim() == 2, "x and residual: same [T, N] shape");
  auto xc = x.contiguous();
  const int64_t rows = residual.size(0), n = residual.size(1);
  auto out = torch::empty({rows, n}, residual.options().dtype(out_dtype));
  float* res = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "add_rms_norm_x", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "add_rms_norm_out", [&] {
      using out_t = scalar_t;
      out_t* op = out.data_ptr<out_t>();
      for (int64_t r = 0; r < rows; ++r) {
        float* rr = res + r * n;
        const auto* xr = xp + r * n;
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          rr[i] += to_float(xr[i]);
          sum += rr[i] * rr[i];
        }
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
        out_t* orow = op + r * n;
        for (int64_t i = 0; i < n; ++i) orow[i] = static_cast<out_t>(rr[i] * inv * w[i]);
      }
    });
  });
  return out;
}

// q [B, H, D] fp32; caches [NB, BS, Hkv, D]; scales [NB, BS, Hkv] fp32 or empty;
// block_tables [B, nb] int64; context_lens [B] int32 -> [B, H, D] fp32.
template <typename cache_t>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const float* k_scale, const float* v_scale, const torch::Tensor& block_tables,
                           const torch::Tensor& context_lens, double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, width = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const cache_t* kp = k_cache.data_ptr<cache_t>();
  const cache_t* vp = v_cache.data_ptr<cache_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = kv_heads * dim;  // elements between consecutive slots
  // One task per (sequence, kv head): its `group` query heads share every K/V row read.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t len = lens[b];
      TORCH_CHECK(len <= width * block_size, "context longer than the block table");
      scores.assign(group * len, 0.f);
      for (int64_t l = 0; l < len; ++l) {
        const int64_t slot = bt[b * width + l / block_size] * block_size + l % block_size;
        const cache_t* kr = kp + slot * token_stride + kvh * dim;
        const float ks = k_scale ? k_scale[slot * kv_heads + kvh] : 1.f;
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qp + (b * heads + kvh * group + g) * dim;
          float dot = 0.f;
          for (int64_t d = 0; d < dim; ++d) dot += qr[d] * to_float(kr[d]);
          scores[g * len + l] = dot * ks * static_cast<float>(scale);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> norm(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        const float top = len ? *std::max_element(s, s + len) : 0.f;
        for (int64_t l = 0; l < len; ++l) {
          s[l] = std::exp(s[l] - top);
          norm[g] += s[l];
        }
      }
      for (int64_t l = 0; l < len; ++l) {
        const int64_t slot = bt[b * width + l / block_size] * block_size + l % block_size;
        const cache_t* vr = vp + slot * token_stride + kvh * dim;
        const float vs = v_scale ? v_scale[slot * kv_heads + kvh] : 1.f;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + l] * vs;
          float* a = acc.data() + g * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * to_float(vr[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = op + (b * heads + kvh * group + g) * dim;
        const float inv = norm[g] > 0.f ? 1.f / norm[g] : 0.f;
        for (int64_t d = 0; d < dim; ++d) o[d] = acc[g * dim + d] * inv;
      }
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim of q and cache differ");
  auto qf = q.to(torch::kFloat).contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = context_lens.to(torch::kInt).contiguous();
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "one block table and length per query");
  auto out = torch::empty(qf.sizes(), qf.options());
  const bool int8 = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(!int8 || (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs k_scale and v_scale");
  torch::Tensor ks, vs;
  if (int8) {
    ks = k_scale->contiguous();
    vs = v_scale->contiguous();
    decode_attention_impl<int8_t>(qf, k_cache, v_cache, ks.data_ptr<float>(), vs.data_ptr<float>(), tables, lens,
                                  scale, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode_attention", [&] {
    decode_attention_impl<scalar_t>(qf, k_cache, v_cache, nullptr, nullptr, tables, lens, scale, out);
  });
  return out;
}

// exp(x) for the softmax's x <= 0, within ~2 ulp: Cephes' expf (range reduction by ln 2 in two
// parts, degree-6 polynomial, 2^n from the exponent bits). std::exp sets errno, so a loop calling
// it stays scalar; this one vectorizes, and prefill attention takes ~1.2M exps per layer at 512 tokens.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // 2^n stays a normal float
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

constexpr int64_t kKeyBlock = 16;  // keys per transposed K block: one 16-lane vector of scores
constexpr int64_t kQueryTile = 16;  // query rows per task, the unit of parallel work

// Dequantizes the first len keys and values of every kv head, scales folded in: K into blocks of
// kKeyBlock keys transposed to keys[Hkv][block][D][16] (zero past len), V into values[Hkv][len][D].
// Once per call, so every query tile reads the same copy.
template <typename cache_t>
void gather_heads(const cache_t* kp, const cache_t* vp, const float* k_scale, const float* v_scale,
                  const int64_t* table, int64_t block_size, int64_t kv_heads, int64_t dim, int64_t len,
                  std::vector<float>& keys, std::vector<float>& values) {
  const int64_t blocks = (len + kKeyBlock - 1) / kKeyBlock, head_keys = blocks * dim * kKeyBlock;
  keys.assign(kv_heads * head_keys, 0.f);
  values.resize(kv_heads * len * dim);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin * kKeyBlock; l < std::min(end * kKeyBlock, len); ++l) {
      const int64_t slot = table[l / block_size] * block_size + l % block_size;
      for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
        const int64_t at = slot * kv_heads + kvh;
        const float ks = k_scale ? k_scale[at] : 1.f, vs = v_scale ? v_scale[at] : 1.f;
        const cache_t* kr = kp + at * dim;
        const cache_t* vr = vp + at * dim;
        float* kt = keys.data() + kvh * head_keys + (l / kKeyBlock) * dim * kKeyBlock + l % kKeyBlock;
        for (int64_t d = 0; d < dim; ++d) kt[d * kKeyBlock] = to_float(kr[d]) * ks;
        float* v = values.data() + (kvh * len + l) * dim;
        for (int64_t d = 0; d < dim; ++d) v[d] = to_float(vr[d]) * vs;
      }
    }
  });
}

// scores[0, 16 * blocks) = q . K for K in transposed blocks [D][16]. Four blocks at a time in
// AVX-512: four independent FMA chains hide the FMA latency a single chain would wait on.
inline void row_scores(const float* q, const float* keys, int64_t dim, int64_t blocks, float* scores) {
  int64_t b = 0;
#if defined(__AVX512F__)
  static_assert(kKeyBlock == 16, "one 16-lane vector per key block");
  const int64_t stride = dim * kKeyBlock;
  for (; b + 4 <= blocks; b += 4) {
    const float* k = keys + b * stride;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 qd = _mm512_set1_ps(q[d]);
      s0 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + d * kKeyBlock), s0);
      s1 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + stride + d * kKeyBlock), s1);
      s2 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 2 * stride + d * kKeyBlock), s2);
      s3 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 3 * stride + d * kKeyBlock), s3);
    }
    _mm512_storeu_ps(scores + b * kKeyBlock, s0);
    _mm512_storeu_ps(scores + (b + 1) * kKeyBlock, s1);
    _mm512_storeu_ps(scores + (b + 2) * kKeyBlock, s2);
    _mm512_storeu_ps(scores + (b + 3) * kKeyBlock, s3);
  }
#endif
  for (; b < blocks; ++b) {
    float s[kKeyBlock] = {};
    const float* k = keys + b * dim * kKeyBlock;
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t j = 0; j < kKeyBlock; ++j) s[j] += q[d] * k[d * kKeyBlock + j];
    std::memcpy(scores + b * kKeyBlock, s, sizeof(s));
  }
}

// out[D] = inv_norm * sum_l p[l] * values[l][D]. In AVX-512, 64 output lanes at a time stay in
// four registers across the whole sum.
inline void weighted_values(const float* p, const float* values, int64_t len, int64_t dim, float inv_norm,
                            float* out) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 64 <= dim; d0 += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t l = 0; l < len; ++l) {
      const float* v = values + l * dim + d0;
      const __m512 pl = _mm512_set1_ps(p[l]);
      a0 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v), a0);
      a1 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 16), a1);
      a2 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 32), a2);
      a3 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 48), a3);
    }
    const __m512 inv = _mm512_set1_ps(inv_norm);
    _mm512_storeu_ps(out + d0, _mm512_mul_ps(a0, inv));
    _mm512_storeu_ps(out + d0 + 16, _mm512_mul_ps(a1, inv));
    _mm512_storeu_ps(out + d0 + 32, _mm512_mul_ps(a2, inv));
    _mm512_storeu_ps(out + d0 + 48, _mm512_mul_ps(a3, inv));
  }
#endif
  std::fill(out + d0, out + dim, 0.f);
  for (int64_t l = 0; l < len; ++l)
    for (int64_t d = d0; d < dim; ++d) out[d] += p[l] * values[l * dim + d];
  for (int64_t d = d0; d < dim; ++d) out[d] *= inv_norm;
}

// q [Tq, H, D] fp32 (the sequence's newest Tq tokens, the last at position context_len - 1);
// caches as for decode; table [nb] int64 -> out [Tq, H, D] fp32. Query row i sees keys
// [0, context_len - Tq + i]. Scores are never materialized beyond one row of one head; the
// context's dequantized K and V are held for the call (4 * 2 * Hkv * D bytes per token).
template <typename cache_t>
void prefill_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const float* k_scale, const float* v_scale, const int64_t* table, int64_t context_len,
                            double scale, torch::Tensor& out) {
  const int64_t tq = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int64_t first = context_len - tq, tiles = (tq + kQueryTile - 1) / kQueryTile;
  const float* qp = q.data_ptr<float>();
  const cache_t* kp = k_cache.data_ptr<cache_t>();
  const cache_t* vp = v_cache.data_ptr<cache_t>();
  float* op = out.data_ptr<float>();
  std::vector<float> keys, values;
  gather_heads(kp, vp, k_scale, v_scale, table, block_size, kv_heads, dim, context_len, keys, values);
  const int64_t head_keys = keys.size() / kv_heads;
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(head_keys / dim), qs(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kvh = task / tiles, r0 = (task % tiles) * kQueryTile;
      const int64_t r1 = std::min(r0 + kQueryTile, tq);
      const float* head_k = keys.data() + kvh * head_keys;
      const float* head_v = values.data() + kvh * context_len * dim;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t len = first + r + 1;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kvh * group + g;
          const float* qr = qp + (r * heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) qs[d] = qr[d] * static_cast<float>(scale);
          row_scores(qs.data(), head_k, dim, (len + kKeyBlock - 1) / kKeyBlock, scores.data());
          const float top = *std::max_element(scores.data(), scores.data() + len);
          float norm = 0.f;
          for (int64_t l = 0; l < len; ++l) {
            scores[l] = exp_nonpositive(scores[l] - top);
            norm += scores[l];
          }
          weighted_values(scores.data(), head_v, len, dim, 1.f / norm, op + (r * heads + h) * dim);
        }
      }
    }
  });
}

torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                      torch::Tensor block_table, int64_t context_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [Tq, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim of q and cache differ");
  TORCH_CHECK(q.size(0) >= 1 && context_len >= q.size(0), "context_len must cover the queries");
  auto table = block_table.to(torch::kLong).contiguous();
  TORCH_CHECK(table.dim() == 1 && context_len <= table.size(0) * k_cache.size(1),
              "context longer than the block table");
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t used = (context_len + k_cache.size(1) - 1) / k_cache.size(1);  // entries past it are padding
  for (int64_t i = 0; i < used; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < k_cache.size(0), "block table entry out of range");
  auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty(qf.sizes(), qf.options());
  if (k_cache.scalar_type() == torch::kChar) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs k_scale and v_scale");
    auto ks = k_scale->contiguous(), vs = v_scale->contiguous();
    prefill_attention_impl<int8_t>(qf, k_cache, v_cache, ks.data_ptr<float>(), vs.data_ptr<float>(), tp,
                                   context_len, scale, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_prefill_attention", [&] {
    prefill_attention_impl<scalar_t>(qf, k_cache, v_cache, nullptr, nullptr, tp, context_len, scale, out);
  });
  return out;
}

template <typename cache_t>
inline void store_row(cache_t* dst, float* scale_dst, const float* src, int64_t dim) {
  if constexpr (std::is_same_v<cache_t, int8_t>) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(src[d]));
    const float scale = std::max(amax / 127.f, 1e-8f);  // kv_store.py: INT8_MAX, MIN_SCALE
    *scale_dst = scale;
    for (int64_t d = 0; d < dim; ++d) {
      // nearbyint rounds half to even, as torch.round does.
      dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(src[d] / scale), -127.f, 127.f));
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<cache_t>(src[d]);
  }
}

// heads [T, H + 2 Hkv, D] (q, k, v heads side by side); cos, sin [T, D] fp32 (HF rotate_half
// layout); caches [NB, BS, Hkv, D]; slots [T] int64 (-1: skip); scales [NB, BS, Hkv] for int8.
// Rotates q and k in fp32, stores k and v, returns q [T, H, D] fp32.
template <typename in_t, typename cache_t>
void rotary_kv_store_impl(const torch::Tensor& heads, const float* cos, const float* sin, int64_t num_heads,
                          int64_t kv_heads, torch::Tensor& k_cache, torch::Tensor& v_cache, const int64_t* slots,
                          float* k_scale, float* v_scale, torch::Tensor& q_out) {
  const int64_t tokens = heads.size(0), all_heads = heads.size(1), dim = heads.size(2), half = dim / 2;
  const in_t* hp = heads.data_ptr<in_t>();
  cache_t* kc = k_cache.data_ptr<cache_t>();
  cache_t* vc = v_cache.data_ptr<cache_t>();
  float* qp = q_out.data_ptr<float>();
  std::vector<float> row(dim);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * dim;
    const float* sn = sin + t * dim;
    const int64_t slot = slots[t];
    for (int64_t h = 0; h < num_heads + kv_heads; ++h) {
      const in_t* x = hp + (t * all_heads + h) * dim;
      float* out = h < num_heads ? qp + (t * num_heads + h) * dim : row.data();
      for (int64_t d = 0; d < half; ++d) {
        const float lo = static_cast<float>(x[d]), hi = static_cast<float>(x[d + half]);
        out[d] = lo * c[d] - hi * sn[d];
        out[d + half] = hi * c[d + half] + lo * sn[d + half];
      }
      if (h >= num_heads && slot >= 0) {
        const int64_t j = h - num_heads, at = slot * kv_heads + j;
        store_row<cache_t>(kc + at * dim, k_scale ? k_scale + at : nullptr, out, dim);
      }
    }
    if (slot < 0) continue;
    for (int64_t j = 0; j < kv_heads; ++j) {
      const in_t* x = hp + (t * all_heads + num_heads + kv_heads + j) * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<float>(x[d]);
      const int64_t at = slot * kv_heads + j;
      store_row<cache_t>(vc + at * dim, v_scale ? v_scale + at : nullptr, row.data(), dim);
    }
  }
}

torch::Tensor rotary_kv_store(torch::Tensor heads, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                              int64_t kv_heads, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(heads.dim() == 3 && heads.size(1) == num_heads + 2 * kv_heads, "heads [T, H + 2 Hkv, D]");
  TORCH_CHECK(heads.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(2) == kv_heads &&
                  k_cache.size(3) == heads.size(2), "caches [NB, BS, Hkv, D], contiguous");
  auto h = heads.contiguous();
  auto c = cos.to(torch::kFloat).contiguous(), s = sin.to(torch::kFloat).contiguous();
  TORCH_CHECK(c.numel() == heads.size(0) * heads.size(2) && s.numel() == c.numel(), "cos, sin: [T, D]");
  auto sl = slots.to(torch::kLong).contiguous();
  TORCH_CHECK(sl.numel() == heads.size(0), "one slot per token");
  auto q = torch::empty({heads.size(0), num_heads, heads.size(2)}, h.options().dtype(torch::kFloat));
  const bool int8 = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(!int8 || (k_scale.has_value() && v_scale.has_value()), "an int8 KV cache needs k_scale and v_scale");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "rotary_kv_store", [&] {
    using in_t = scalar_t;
    if (int8) {
      TORCH_CHECK(k_scale->is_contiguous() && v_scale->is_contiguous(), "scales must be contiguous");
      rotary_kv_store_impl<in_t, int8_t>(h, c.data_ptr<float>(), s.data_ptr<float>(), num_heads, kv_heads, k_cache,
                                         v_cache, sl.data_ptr<int64_t>(), k_scale->data_ptr<float>(),
                                         v_scale->data_ptr<float>(), q);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "rotary_kv_store_cache", [&] {
      rotary_kv_store_impl<in_t, scalar_t>(h, c.data_ptr<float>(), s.data_ptr<float>(), num_heads, kv_heads,
                                           k_cache, v_cache, sl.data_ptr<int64_t>(), nullptr, nullptr, q);
    });
  });
  return q;
}

}  // namespace lowbit_cpu
