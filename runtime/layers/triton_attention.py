"""The attention step on Triton kernels (CUDA, or CPU under the interpreter in tests).

Rotate q and k in place in the fused qkv buffer, store k and v (quantizing for an int8 cache),
then one launch: the decode kernel when every sequence has one query token, else the varlen
prefill kernel, which also takes the decode rows of a mixed batch (query length 1). Imported only
when the engine chose the Triton path, so a CPU engine never loads Triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels.triton_decode_attention import paged_decode_attention_triton
from lowbit.kernels.triton_kv_store import kv_store_triton
from lowbit.kernels.triton_prefill_attention import prefill_attention_triton
from lowbit.kernels.triton_rotary import rotary_triton
from lowbit.runtime.kv_cache import LayerKVCache

if TYPE_CHECKING:
    from .attention import AttentionMetadata


def triton_attention(
    heads: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: LayerKVCache,
    meta: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """heads [T, H + 2 Hkv, D] (the qkv projection, rotated in place) -> [T, H, D] in its dtype."""
    rotary_triton(heads, *rope, num_heads + num_kv_heads)
    q = heads[:, :num_heads]  # [T, H, D], strided view
    k = heads[:, num_heads : num_heads + num_kv_heads]
    v = heads[:, num_heads + num_kv_heads :]
    kv_store_triton(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_scale, cache.v_scale)
    if meta.num_prefills == 0:
        return paged_decode_attention_triton(
            q, cache.k, cache.v, meta.block_tables, meta.context_lens, scale, cache.k_scale, cache.v_scale
        )
    return prefill_attention_triton(
        q, cache.k, cache.v, meta.block_tables, meta.query_start_tensor, meta.context_lens,
        meta.max_query_len, scale, cache.k_scale, cache.v_scale,
    )  # fmt: skip
