// The compiled CPU ops, one extension (kernels/cpu/extension.py builds every kernels/cpu/*.cpp
// together; kernels/cpu/module.cpp exposes them to Python). Each op's file documents its layouts and the
// torch reference it is tested against.
#pragma once

// torch/types.h (at::Tensor and ATen's ops under torch::), not torch/extension.h: the kernels need no
// pybind11 or torch's C++ frontend, and the lighter header parses in 16 s instead of 56 s per file
// (g++ 12 -O3, measured), which is most of a cold build. Only module.cpp includes torch/extension.h.
#include <torch/types.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lowbit_cpu {

#if defined(__AVX512F__)
// 16 consecutive values as fp32 lanes: cache rows (attention.cpp), scales and mins (gemm.cpp).
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 widen16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
inline __m512 widen16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// norm_rotary.cpp: the decode step's small ops.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps,
                           torch::ScalarType out_dtype);
torch::Tensor rotary_kv_store(torch::Tensor heads, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                              int64_t kv_heads, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale);

// attention.cpp: attention over the paged KV cache.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap);
torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                      torch::Tensor block_table, int64_t context_len, double scale,
                                      int64_t window, double softcap);

// gemm.cpp: group-quantized int4 / int8 GEMM.
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                        int64_t group_size, torch::ScalarType out_dtype, bool portable);
torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t group_size,
                        torch::ScalarType out_dtype, bool portable);
torch::Tensor dequantize(torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t group_size, torch::ScalarType dtype, bool split);
bool has_avx512();

// ggml_blocks.cpp: GGUF block types (K-quants, Q5_0/Q5_1, IQ4) on the file's own bytes.
torch::Tensor ggml_gemm(torch::Tensor x, torch::Tensor w, int64_t type, bool int8_activations, bool portable);
bool ggml_has_avx2();
torch::Tensor ggml_dequantize(torch::Tensor w, int64_t k, int64_t type);
bool has_amx();  // compiled in, and the kernel lets this process use the tiles

// decode_layer.cpp: a whole decoder layer for steps where every sequence has one new token.
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor argmax_rows(torch::Tensor logits);

}  // namespace lowbit_cpu

namespace lowbit_cpu {

// One Llama-family decoder layer for a step in which every sequence has exactly one new token:
// the ops of runtime/models/llama.py DecoderLayer, with the same roundings, called from C++ so
// that the ~25 torch dispatches and Python frames between them (~180 us a layer measured at one
// token, against ~250 us in the layer's GEMMs) are gone. Built once per layer at load, from weights
// packed for kernels/cpu/gemm.py or kept as GGUF blocks (kernels/cpu/ggml.py).
class DecodeLayer {
 public:
  // Each projection (qkv, o, gate_up, down, in that order) is parts_per_projection[p] consecutive
  // parts whose outputs are concatenated; a part is [q, scales] (int8) or [q, scales, mins] (int4)
  // with its group size as code, or [blocks] of GGUF blocks with code -ggml_type. biases: one per
  // projection in the compute dtype, added to its whole output (an empty tensor: none); q_norm /
  // k_norm: per-head RMSNorm weights [head_dim] applied to q and k before rotary (empty: none);
  // window / softcap: as paged_decode_attention's (0: none).
  DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm, double eps,
              std::vector<std::vector<torch::Tensor>> parts, std::vector<int64_t> codes,
              std::vector<int64_t> parts_per_projection, std::vector<torch::Tensor> biases,
              torch::Tensor q_norm, torch::Tensor k_norm, int64_t num_heads, int64_t kv_heads, double scale,
              int64_t window, double softcap, torch::ScalarType dtype);

  // x: the previous layer's output [T, hidden] (none for the first layer, whose input is already in
  // residual); residual fp32 [T, hidden], updated in place. Returns this layer's output [T, hidden].
  torch::Tensor forward(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor cos,
                        torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                        c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                        torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens) const;

 private:
  struct Part {
    std::vector<torch::Tensor> packed;
    int64_t code;  // group size, or -ggml_type for GGUF blocks
    torch::Tensor operator()(const torch::Tensor& x, torch::ScalarType dtype) const;
  };
  struct Projection {
    std::vector<Part> parts;
    torch::Tensor bias;  // undefined: none
    torch::Tensor operator()(const torch::Tensor& x, torch::ScalarType dtype) const;
  };
  torch::Tensor input_norm_, post_norm_, q_norm_, k_norm_;  // q_norm_ / k_norm_ undefined: none
  double eps_;
  Projection qkv_, o_, gate_up_, down_;
  int64_t num_heads_, kv_heads_;
  double scale_;
  int64_t window_;
  double softcap_;
  torch::ScalarType dtype_;
};

}  // namespace lowbit_cpu
