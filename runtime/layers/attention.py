"""Self-attention over the paged KV cache, and the metadata the runner prepares for it per step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from lowbit.kernels import cpu_ops
from lowbit.kernels.kv_store import kv_store_ref
from lowbit.kernels.paged_attention import decode_attention_cpu, decode_padding_mask, prefill_attention_cpu
from lowbit.kernels.triton_support import use_triton
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.quant import WeightLike

from .linear import FusedLinear, Linear
from .rotary import apply_rotary


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """Everything paging hands to attention for one step (built once, shared by all layers).

    Sequences [0, num_prefills) may have several query tokens and run the prefill path; the rest
    have exactly one query token each and run the batched decode path.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: cached tokens per sequence after this step
    query_start: tuple[int, ...]  # B + 1 host ints: sequence b owns tokens [qs[b], qs[b + 1])
    context_lens_host: tuple[int, ...]  # context_lens on the host
    num_prefills: int
    has_padding: bool = True  # slot_mapping may hold -1 (the engine's never does)

    @property
    def num_prefill_tokens(self) -> int:
        return self.query_start[self.num_prefills]

    @cached_property
    def query_start_tensor(self) -> torch.Tensor:
        """[B + 1] int32 on the device, for kernels that take a whole mixed batch in one launch."""
        return torch.tensor(self.query_start, dtype=torch.int32, device=self.slot_mapping.device)

    @cached_property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))

    @cached_property
    def decode_block_tables(self) -> torch.Tensor:
        """[B_decode, max_blocks] int64: indexing wants int64, so convert once per step, not per layer."""
        return self.block_tables[self.num_prefills :].long()

    @cached_property
    def _decode_masks(self) -> dict[int, torch.Tensor]:
        return {}

    def decode_mask(self, block_size: int) -> torch.Tensor:
        """[B_decode, max_blocks * block_size] bool, True past each context; built once per step."""
        masks = self._decode_masks
        if block_size not in masks:
            length = self.block_tables.shape[1] * block_size
            masks[block_size] = decode_padding_mask(self.context_lens[self.num_prefills :], length)
        return masks[block_size]


def paged_attention(
    q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D] -> fp32 [T, H, D], dispatching prefill sequences and the decode batch."""
    if meta.num_prefills == 0:  # the common step: no staging buffer
        return _decode(q, cache, meta, scale)
    first_decode = meta.num_prefill_tokens
    if meta.num_prefills == 1 and first_decode == q.shape[0]:  # one prompt alone: no staging either
        return _prefill(q, cache, meta, 0, scale)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(meta.num_prefills):
        out[meta.query_start[b] : meta.query_start[b + 1]] = _prefill(q, cache, meta, b, scale)
    if first_decode < q.shape[0]:
        out[first_decode:] = _decode(q[first_decode:], cache, meta, scale)
    return out


def _prefill(
    q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, b: int, scale: float
) -> torch.Tensor:
    """Sequence b's queries [Tq, H, D] over its cache -> fp32 [Tq, H, D]."""
    q = q[meta.query_start[b] : meta.query_start[b + 1]]
    table, context_len = meta.block_tables[b], meta.context_lens_host[b]
    if (ops := cpu_ops.load()) is not None and q.is_cpu:
        return ops.paged_prefill_attention(
            q, cache.k, cache.v, cache.k_scale, cache.v_scale, table, context_len, scale
        )
    return prefill_attention_cpu(q, cache.k, cache.v, table, context_len, scale, cache.k_scale, cache.v_scale)


def _decode(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if (ops := cpu_ops.load()) is not None and q.is_cpu:
        return ops.paged_decode_attention(
            q, cache.k, cache.v, cache.k_scale, cache.v_scale, meta.decode_block_tables,
            meta.context_lens[meta.num_prefills :], scale,
        )  # fmt: skip
    return decode_attention_cpu(
        q, cache.k, cache.v, meta.decode_block_tables, meta.context_lens[meta.num_prefills :], scale,
        cache.k_scale, cache.v_scale, masked=meta.decode_mask(cache.k.shape[1]),
    )  # fmt: skip


class Attention(nn.Module):
    def __init__(
        self,
        q: WeightLike,
        k: WeightLike,
        v: WeightLike,
        o: WeightLike,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.qkv = FusedLinear([q, k, v], device, dtype)
        self.o_proj = Linear(o, device, dtype)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.dtype = dtype
        self.triton_attention = None
        if use_triton(device):  # imported only here: a CPU engine never loads Triton
            from .triton_attention import triton_attention

            self.triton_attention = triton_attention

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # fmt: skip
        """rope: the step's (cos, sin) [T, 1, D]; x [T, hidden] -> [T, hidden] in the compute dtype."""
        tokens = x.shape[0]
        heads = self.qkv.joint(x).view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if self.triton_attention is not None:
            out = self.triton_attention(
                heads, rope, cache, meta, self.num_heads, self.num_kv_heads, self.scale
            )  # [T, H, D]
            return self.o_proj(out.reshape(tokens, -1))
        if (ops := cpu_ops.load()) is not None and heads.is_cpu:  # one op: rotate, store k and v
            q = ops.rotary_kv_store(heads, *rope, self.num_heads, self.num_kv_heads, cache.k, cache.v,
                                    meta.slot_mapping, cache.k_scale, cache.v_scale)  # fmt: skip
        else:
            q = self._rotate_and_store(heads, rope, cache, meta)
        out = paged_attention(q, cache, meta, self.scale)  # [T, H, D] fp32
        return self.o_proj(out.reshape(tokens, -1).to(self.dtype))

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step

    def _rotate_and_store(self, heads, rope, cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        """heads [T, H + 2 Hkv, D] -> rotated q fp32 [T, H, D]; rotated k and v go to the cache."""
        qk_heads = self.num_heads + self.num_kv_heads
        # q and k heads sit side by side: one rotation for both.
        q, k = apply_rotary(heads[:, :qk_heads], *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = heads[:, qk_heads:]
        kv_store_ref(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_scale, cache.v_scale,
                     padded=meta.has_padding)  # fmt: skip
        return q
