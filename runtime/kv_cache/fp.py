"""Floating-point paged KV cache (fp32 / fp16 / bf16)."""

from __future__ import annotations

import torch

from .layer import LayerKVCache, zeros
from .spec import KVCacheSpec


def allocate_fp(spec: KVCacheSpec, device: torch.device) -> list[LayerKVCache]:
    shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        LayerKVCache(zeros(shape, spec.torch_dtype, device), zeros(shape, spec.torch_dtype, device))
        for _ in range(spec.num_layers)
    ]
