// A decoder layer for decode steps (class DecodeLayer in ops.h), plus the two small ops around
// it that eager torch makes slow at one token:
//   silu_mul    -> F.silu(gate) * up on the fused gate/up output, rounded as torch rounds each op
//   argmax_rows -> logits.argmax(-1) (torch's takes ~90-130 us over a 49k vocabulary on 2 threads)
// References: the eager DecoderLayers on the real model (tests/model/test_cpu_ops_engine.py),
// F.silu(gate) * up and torch.argmax (tests/kernels/test_cpu_gemm.py).
#include "ops.h"

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <limits>

namespace lowbit_cpu {

// [T, 2I] -> [T, I]: silu(gate) rounded to the dtype, times up, rounded again (what the eager
// `F.silu(gate) * up` computes in a 16-bit dtype).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: expected [T, 2I], got ", gate_up.sizes());
  const auto in = gate_up.contiguous();
  const int64_t rows = in.size(0), inter = in.size(1) / 2;
  auto out = torch::empty({rows, inter}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* gate = src + r * 2 * inter;
      const scalar_t* up = gate + inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        const auto act = static_cast<scalar_t>(g / (1.f + std::exp(-g)));
        dst[r * inter + i] = static_cast<scalar_t>(static_cast<float>(act) * static_cast<float>(up[i]));
      }
    }
  });
  return out;
}

// Two passes: the maximum (noting any NaN), then the first index holding it (or the first NaN).
// A single pass that carries the index along is one dependent compare per element (~90 us over
// 49k logits, no faster than torch); split, each pass runs 16 lanes at a time.
static int64_t first_max(const float* row, int64_t n) {
  float top = row[0];
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 best = _mm512_set1_ps(row[0]);
  __mmask16 unordered = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(v, best);  // a NaN in v keeps best; NaNs are tracked above
  }
  top = _mm512_reduce_max_ps(best);
  nan = unordered != 0;
#endif
  for (; i < n; ++i) {
    nan |= std::isnan(row[i]);
    top = row[i] > top ? row[i] : top;
  }
  i = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(top);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
    if (hit != 0) return i + __builtin_ctz(hit);
  }
#endif
  while (nan ? !std::isnan(row[i]) : row[i] != top) ++i;
  return i;
}

// [S, V] fp32 -> int64 [S]: the first maximum of each row; a NaN counts as the maximum, as in torch.
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat && logits.size(1) > 0,
              "logits: expected fp32 [S, V] with V > 0, got ", logits.scalar_type(), " ", logits.sizes());
  const auto in = logits.contiguous();
  const int64_t rows = in.size(0), vocab = in.size(1);
  auto out = torch::empty({rows}, in.options().dtype(torch::kLong));
  const float* src = in.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) dst[r] = first_max(src + r * vocab, vocab);
  return out;
}

// An empty tensor stands for "none" across the Python boundary; kept as an undefined one.
static torch::Tensor optional_tensor(torch::Tensor t) { return t.numel() == 0 ? torch::Tensor() : t; }

DecodeLayer::DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm, double eps,
                         std::vector<std::vector<torch::Tensor>> parts, std::vector<int64_t> codes,
                         std::vector<int64_t> parts_per_projection, std::vector<torch::Tensor> biases,
                         torch::Tensor q_norm, torch::Tensor k_norm, int64_t num_heads, int64_t kv_heads,
                         double scale, int64_t window, double softcap, torch::ScalarType dtype)
    : input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_norm)),
      q_norm_(optional_tensor(std::move(q_norm))),
      k_norm_(optional_tensor(std::move(k_norm))),
      eps_(eps),
      num_heads_(num_heads),
      kv_heads_(kv_heads),
      scale_(scale),
      window_(window),
      softcap_(softcap),
      dtype_(dtype) {
  TORCH_CHECK(parts_per_projection.size() == 4 && biases.size() == 4, "projections: expected qkv, o, gate_up, down");
  TORCH_CHECK(q_norm_.defined() == k_norm_.defined(), "q and k norms come together");
  TORCH_CHECK(parts.size() == codes.size(), "one code per projection part");
  std::vector<Projection*> order = {&qkv_, &o_, &gate_up_, &down_};
  size_t next = 0;
  for (size_t p = 0; p < 4; ++p) {
    for (int64_t i = 0; i < parts_per_projection[p]; ++i, ++next) {
      TORCH_CHECK(next < parts.size(), "fewer projection parts than counted");
      const auto& packed = parts[next];
      TORCH_CHECK(codes[next] < 0 ? packed.size() == 1 : packed.size() == 2 || packed.size() == 3,
                  "a part is [blocks] (ggml) or [q, scales] or [q, scales, mins]");
      order[p]->parts.push_back({packed, codes[next]});
    }
    TORCH_CHECK(!order[p]->parts.empty(), "a projection needs at least one part");
    order[p]->bias = optional_tensor(biases[p]);
  }
  TORCH_CHECK(next == parts.size(), "more projection parts than counted");
}

torch::Tensor DecodeLayer::Part::operator()(const torch::Tensor& x, torch::ScalarType dtype) const {
  if (code < 0) return ggml_gemm(x, packed[0], -code, dtype != torch::kFloat, false).to(dtype);
  return packed.size() == 3 ? int4_gemm(x, packed[0], packed[1], packed[2], code, dtype, false)
                            : int8_gemm(x, packed[0], packed[1], code, dtype, false);
}

torch::Tensor DecodeLayer::Projection::operator()(const torch::Tensor& x, torch::ScalarType dtype) const {
  torch::Tensor y;
  if (parts.size() == 1) {
    y = parts[0](x, dtype);
  } else {
    std::vector<torch::Tensor> outputs;
    for (const auto& part : parts) outputs.push_back(part(x, dtype));
    y = torch::cat(outputs, -1);
  }
  return bias.defined() ? y.add_(bias) : y;  // as the eager Linear: after the GEMM, in the dtype
}

// Qwen3's q/k norm over each head, in place, with the eager HeadRMSNorm's ops and roundings:
// normalized in fp32, cast back, then scaled.
static void head_rms_norm_(torch::Tensor x, const torch::Tensor& weight, double eps) {
  const auto xf = x.to(torch::kFloat);
  const auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  x.copy_(normed.to(x.scalar_type()) * weight);
}

torch::Tensor DecodeLayer::forward(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor cos,
                                   torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                                   c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                   torch::Tensor slots, torch::Tensor block_tables,
                                   torch::Tensor context_lens) const {
  const int64_t tokens = residual.size(0), head_dim = k_cache.size(3);
  // The first layer's input is already in residual: adding zeros leaves it as it is.
  const auto normed = add_rms_norm(x.has_value() ? *x : torch::zeros_like(residual), residual, input_norm_, eps_,
                                   dtype_);
  const auto heads = qkv_(normed, dtype_).view({tokens, num_heads_ + 2 * kv_heads_, head_dim});
  if (q_norm_.defined()) {
    head_rms_norm_(heads.narrow(1, 0, num_heads_), q_norm_, eps_);
    head_rms_norm_(heads.narrow(1, num_heads_, kv_heads_), k_norm_, eps_);
  }
  const auto q = rotary_kv_store(heads, cos, sin, num_heads_, kv_heads_, k_cache, v_cache, slots, k_scale, v_scale);
  const auto attn = paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale_,
                                           window_, softcap_);
  const auto projected = o_(attn.reshape({tokens, -1}).to(dtype_), dtype_);
  const auto normed_mlp = add_rms_norm(projected, residual, post_norm_, eps_, dtype_);
  return down_(silu_mul(gate_up_(normed_mlp, dtype_)), dtype_);
}

}  // namespace lowbit_cpu
