// Fused CPU ops for the decode step, where eager PyTorch spends more time dispatching small ops
// than computing. Each has a torch reference it is tested against (tests/kernels/test_cpu_ops.py):
//   add_rms_norm           -> residual += x; F.rms_norm(residual, weight) cast to out_dtype
//   paged_decode_attention -> kernels/paged_attention.py decode_attention_cpu
//   rotary_kv_store        -> runtime/layers/rotary.py apply_rotary + kernels/kv_store.py kv_store_ref
//   q8_linear              -> x quantized to int8 per 32 inputs, times W8A16 g32 weights (GGUF
//                             Q8_0 x Q8_0, as llama.cpp computes its Q8_0 projections):
//                             kernels/w8a16_matmul.py q8_linear_ref
// Layouts are those documented in kernels/paged_attention.py and kernels/kv_store.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <limits>
#include <vector>

namespace {

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

constexpr int64_t kQ8Group = 32;

// x [M, K] float -> int8 codes shifted to uint8 (q + 128, so VNNI's u8 x s8 dot applies) and one
// fp32 scale per 32 inputs: x ~= q * d, q = round(x / d) in [-127, 127], d = amax / 127.
void quantize_q8(const float* x, int64_t k, uint8_t* q, float* d) {
  for (int64_t g = 0; g < k / kQ8Group; ++g) {
    const float* xg = x + g * kQ8Group;
    float amax = 0.f;
    for (int64_t i = 0; i < kQ8Group; ++i) amax = std::max(amax, std::abs(xg[i]));
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    d[g] = scale;
    for (int64_t i = 0; i < kQ8Group; ++i) {
      const int code = static_cast<int>(std::lrintf(xg[i] * inv));  // round half to even, as torch.round
      q[g * kQ8Group + i] = static_cast<uint8_t>(code + 128);
    }
  }
}

// One weight row against one quantized input: sum_g dw[g] dx[g] sum_i (qx_i + 128) w_i over the groups
// the vector loop takes (the caller removes their +128 offset); the rest exactly. `*vector_groups`
// says how many groups that was. dxv: per pair of groups, dx[g] in lanes 0-7 and dx[g + 1] in 8-15.
inline float q8_row_dot(const uint8_t* qx, const float* dx, const void* dxv, const int8_t* w, const float* dw,
                        int64_t groups, int64_t* vector_groups) {
  float total = 0.f;
  int64_t g = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  const __m512* dxpairs = static_cast<const __m512*>(dxv);
  const __m512i low = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (; g + 2 <= groups; g += 2) {  // 64 bytes = two groups: lanes 0-7 and 8-15
    const __m512i xv = _mm512_loadu_si512(qx + g * kQ8Group);
    const __m512i wv = _mm512_loadu_si512(w + g * kQ8Group);
    const __m512 lanes = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv));
    // dw[g] to lanes 0-7 and dw[g + 1] to lanes 8-15 with one permute of a 2-float load.
    const __m512 dwpair = _mm512_permutexvar_ps(low, _mm512_castps128_ps512(_mm_castsi128_ps(
                                                     _mm_loadl_epi64(reinterpret_cast<const __m128i*>(dw + g)))));
    acc = _mm512_fmadd_ps(lanes, _mm512_mul_ps(dwpair, dxpairs[g / 2]), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  *vector_groups = g;
  for (; g < groups; ++g) {
    // Integer products summed in float: exact (|sum| <= 32 * 127 * 127 < 2^24) in any order. An int32
    // accumulator gave wrong sums for negative activations with GCC 12.2 -O3 -march=native (its
    // auto-vectorized int8 dot product), caught by test_q8_linear_matches_its_reference.
    float dot = 0.f;
    for (int64_t i = g * kQ8Group; i < (g + 1) * kQ8Group; ++i) {
      dot += static_cast<float>(static_cast<int32_t>(qx[i]) - 128) * static_cast<float>(w[i]);
    }
    total += dw[g] * dx[g] * dot;
  }
  return total;
}

// x [M, K] float; qweight int8 [N, K]; scales fp32 [N, K/32]; wcorr fp32 [N, K/32] = scales * (each
// group's sum of codes), precomputed at load -> [M, N] fp32.
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor wcorr) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "x [M, K], qweight [N, K]");
  const int64_t m_rows = x.size(0), k = x.size(1), n = qweight.size(0), groups = k / kQ8Group;
  TORCH_CHECK(k % kQ8Group == 0 && qweight.size(1) == k, "K must match and be a multiple of 32");
  TORCH_CHECK(qweight.scalar_type() == torch::kChar && qweight.is_contiguous(), "qweight: contiguous int8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.size(0) == n &&
                  scales.size(1) == groups, "scales: contiguous fp32 [N, K / 32]");
  TORCH_CHECK(wcorr.scalar_type() == torch::kFloat && wcorr.sizes() == scales.sizes(), "wcorr: fp32 [N, K / 32]");
  auto xf = x.to(torch::kFloat).contiguous();
  std::vector<uint8_t> qx(m_rows * k);
  auto dx = torch::empty({m_rows, groups}, xf.options());
  float* dxp = dx.data_ptr<float>();
  for (int64_t m = 0; m < m_rows; ++m) quantize_q8(xf.data_ptr<float>() + m * k, k, &qx[m * k], dxp + m * groups);
  // Per input row, the pairs of activation scales as 16-lane vectors (64-byte aligned).
  const int64_t pairs = groups / 2;
  std::vector<float> dxv_storage(m_rows * pairs * 16 + 16);
  float* dxv = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(dxv_storage.data()) + 63) & ~uintptr_t(63));
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t p = 0; p < pairs; ++p) {
      for (int64_t lane = 0; lane < 16; ++lane) dxv[(m * pairs + p) * 16 + lane] = dxp[m * groups + 2 * p + lane / 8];
    }
  }
  auto out = torch::empty({m_rows, n}, xf.options());
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<int64_t> vector_groups{0};
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    int64_t done = 0;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t m = 0; m < m_rows; ++m) {
        op[m * n + r] = q8_row_dot(&qx[m * k], dxp + m * groups, dxv + m * pairs * 16, wp + r * k, sp + r * groups,
                                   groups, &done);
      }
    }
    vector_groups = done;
  });
  // The +128 offset of the vector-loop groups: 128 * sum_g dw[g] wsum[g] dx[g], one small matmul.
  const int64_t vg = vector_groups;
  if (vg > 0) {
    auto corr = at::matmul(dx.narrow(1, 0, vg), wcorr.narrow(1, 0, vg).t());  // [M, N]
    out.sub_(corr, 128.0);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "residual += x; rms_norm(residual) * weight, cast to out_dtype");
  m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over a paged KV cache");
  m.def("q8_linear", &q8_linear, "int8-quantized x times Q8_0-style int8 weights, fp32 out");
  m.def("rotary_kv_store", &rotary_kv_store, "rotate q and k, store k and v in the paged cache, return q");
}
