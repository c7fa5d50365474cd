// Fused CPU ops for the decode step, where eager PyTorch spends more time dispatching small ops
// than computing (attention is in attention.cpp). Each has a torch reference it is tested
// against (tests/kernels/test_cpu_ops.py):
//   add_rms_norm    -> residual += x; F.rms_norm(residual, weight) cast to out_dtype
//   rotary_kv_store -> runtime/layers/rotary.py apply_rotary + kernels/kv_store_ref.py kv_store_ref
// The cache layout is the one documented in kernels/kv_store_ref.py.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
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

template <typename cache_t>
inline void store_row(cache_t* dst, float* scale_dst, const float* src, int64_t dim) {
  if constexpr (std::is_same_v<cache_t, int8_t>) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(src[d]));
    const float scale = std::max(amax / 127.f, 1e-8f);  // kv_store_ref.py: INT8_MAX, MIN_SCALE
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
