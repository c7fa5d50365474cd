// Python bindings of the compiled CPU ops (declared in ops.h).
#include "ops.h"

#include <torch/extension.h>

namespace ops = lowbit_cpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &ops::add_rms_norm, "residual += x; rms_norm(residual) * weight, cast to out_dtype");
  m.def("paged_decode_attention", &ops::paged_decode_attention, "one query per sequence over a paged KV cache");
  m.def("paged_prefill_attention", &ops::paged_prefill_attention, "causal attention of one sequence's new tokens over its paged KV cache");
  m.def("rotary_kv_store", &ops::rotary_kv_store, "rotate q and k, store k and v in the paged cache, return q");
  m.def("int4_gemm", &ops::int4_gemm, "x @ W.T for group-quantized affine int4 W in kernels/cpu/gemm.py's block layout");
  m.def("int8_gemm", &ops::int8_gemm, "x @ W.T for group-quantized symmetric int8 W in kernels/cpu/gemm.py's block layout");
  m.def("dequantize", &ops::dequantize, "the dense [N, K] weight of one packed by kernels/cpu/gemm.py");
  m.def("ggml_gemm", &ops::ggml_gemm, "fp32 x @ W.T for W in GGUF blocks (uint8 [N, row_bytes]) of a ggml type id");
  m.def("ggml_has_avx2", &ops::ggml_has_avx2, "whether the GGUF block GEMM's AVX2 path was compiled in");
  m.def("ggml_dequantize", &ops::ggml_dequantize, "fp32 [N, K] of GGUF blocks, equal to gguf-py's dequantize");
  m.def("has_avx512", &ops::has_avx512, "whether the AVX-512 GEMM path was compiled in");
  m.def("has_amx", &ops::has_amx, "whether GEMMs of 2+ bf16 or fp16 rows run on AMX tiles");
  m.def("silu_mul", &ops::silu_mul, "silu(gate) * up over a fused [T, 2I] gate/up output");
  m.def("argmax_rows", &ops::argmax_rows, "first maximum of each row of fp32 logits");
  pybind11::class_<ops::DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<torch::Tensor, torch::Tensor, double, std::vector<std::vector<torch::Tensor>>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<torch::Tensor>, torch::Tensor,
                          torch::Tensor, int64_t, int64_t, double, int64_t, double, torch::ScalarType>())
      .def("forward", &ops::DecodeLayer::forward, "the layer's output; residual is updated in place");
}
