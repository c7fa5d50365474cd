"""The compiled CPU kernels: one C++ extension, built once per machine on first use.

- `extension.py` builds and loads it (`extension.load()`, None where it cannot be built).
- `ops.h` declares every op, `module.cpp` binds them to Python.
- `norm_rotary.cpp`: the decode step's small fused ops (add_rms_norm, rotary_kv_store).
- `attention.cpp`: attention over the paged KV cache (reference: kernels/paged_attention_ref.py).
- `gemm.cpp` (packing and calls in `gemm.py`): group-quantized int4/int8 GEMMs (references:
  kernels/w4a16_matmul.py, kernels/w8a16_matmul.py).
- `decode_layer.cpp`: a whole decoder layer for decode steps, and the sampler's argmax.
"""
