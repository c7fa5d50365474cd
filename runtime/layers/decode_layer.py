"""Decode steps on CPU through one compiled call per decoder layer (kernels/cpu_decode_layer.cpp).

At one token per sequence the eager layer spends almost as long between its ops (Python frames,
torch dispatch, small allocations) as in them: measured ~180 us a layer for the default model's 30
layers on 2 threads, against ~250 us in its GEMMs. The compiled layer runs the same ops with the same
roundings. It is used when every projection of every layer runs on cpu_gemm's kernels (what
GGUF, GPTQ and AWQ int4 and Q8_0 weights pick on CPU) and the compiled ops are available; other
steps and models keep the eager layers, which tests/model/test_cpu_ops_engine.py compares with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lowbit.kernels import cpu_ops
from lowbit.runtime.kv_cache import LayerKVCache

from .attention import AttentionMetadata

# Kernels whose packed tensors the compiled layer reads, with the tensor names in its order.
PACKED_TENSORS = {"cpu-group-int4": ("q", "scales", "mins"), "cpu-group-int8": ("q", "scales")}


def _projection(fused: Any) -> tuple[list[torch.Tensor], int] | None:
    """(packed tensors, group size) of a Linear/FusedLinear computed in one cpu_gemm call, else None."""
    parts = getattr(fused, "parts", [fused])
    if len(parts) != 1:
        return None
    packed = parts[0].packed
    names = PACKED_TENSORS.get(packed.kernel.name)
    if names is None or getattr(packed.kernel.config, "act_order", False):
        return None
    group_size = getattr(packed.kernel.config, "group_size", None) or packed.in_features
    return [packed.tensors[name] for name in names], group_size


def compile_layer(layer: Any, dtype: torch.dtype) -> Any | None:
    """The compiled equivalent of one DecoderLayer, or None if it cannot be compiled."""
    ops = cpu_ops.load()
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if ops is None or attn.triton_attention is not None or any(n.quantize_output for n in norms):
        return None
    projections = [_projection(p) for p in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)]
    if any(p is None for p in projections):
        return None
    packed, group_sizes = zip(*projections, strict=True)
    return ops.DecodeLayer(
        norms[0].weight, norms[1].weight, norms[0].eps, list(packed), list(group_sizes),
        attn.num_heads, attn.num_kv_heads, attn.scale, dtype,
    )  # fmt: skip


def compile_layers(layers: Sequence[Any], dtype: torch.dtype) -> list[Any] | None:
    """Every layer compiled, or None (a model runs all its layers one way)."""
    compiled = [compile_layer(layer, dtype) for layer in layers]
    return None if any(c is None for c in compiled) else compiled


def run_decode_layers(
    layers: Sequence[Any], hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
    kv_caches: Sequence[LayerKVCache], meta: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """hidden: embeddings fp32 [T, hidden] of a step with one token per sequence.
    Returns (last layer's output, residual fp32), as the eager loop over DecoderLayer does."""
    residual, x = hidden, None
    cos, sin = rope
    tables, lens = meta.decode_block_tables, meta.context_lens
    for layer, cache in zip(layers, kv_caches, strict=True):
        x = layer.forward(
            x, residual, cos, sin, cache.k, cache.v, cache.k_scale, cache.v_scale,
            meta.slot_mapping, tables, lens,
        )  # fmt: skip
    return x, residual
