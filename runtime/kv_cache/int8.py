"""int8 paged KV cache: one fp32 scale per (token, head) for K and for V, set when a token is
written (kernels/kv_store_ref.py) and applied inside attention (kernels/paged_attention_ref.py).

There is no global calibration scale: a per-tensor scale of 1.0 is how FP8 caches elsewhere turn
into garbage on models whose keys are large.
"""

from __future__ import annotations

import torch

from .layer import LayerKVCache, zeros
from .spec import SCALE_DTYPE, KVCacheSpec


def allocate_int8(spec: KVCacheSpec, device: torch.device) -> list[LayerKVCache]:
    shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    scale_shape = shape[:-1]
    return [
        LayerKVCache(
            zeros(shape, torch.int8, device),
            zeros(shape, torch.int8, device),
            zeros(scale_shape, SCALE_DTYPE, device),
            zeros(scale_shape, SCALE_DTYPE, device),
        )
        for _ in range(spec.num_layers)
    ]
