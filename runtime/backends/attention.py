"""Attention backends: rotary on q and k, the KV cache write, and attention over the paged cache.

One is chosen per model, first of `ATTENTION_BACKENDS` that can run on the device:
- `triton`: the Triton kernels (CUDA; a CPU model only through the interpreter in tests).
- `compiled-cpu`: the compiled CPU ops (kernels/cpu/*.cpp) where they could be built.
- `torch`: the torch reference paths (kernels/paged_attention_ref.py, kernels/kv_store_ref.py),
  which compute the same thing anywhere.
All read the layouts of kernels/paged_attention_ref.py and are tested against its
`paged_attention_ref`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from lowbit.kernels.kv_store_ref import kv_store_ref
from lowbit.kernels.paged_attention_ref import decode_attention_cpu, prefill_attention_cpu
from lowbit.kernels.triton_support import triton_unavailable
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.layers.attention_metadata import AttentionMetadata
from lowbit.runtime.layers.rotary import apply_rotary

from .base import CompiledCPU, DeviceBackend

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes, beside its inputs: the head counts, the score scale,
    the sliding window (0: none; keys (p - window, p] for the query at position p) and the logit
    soft-cap (0: none; Gemma 2's softcap * tanh(s / softcap))."""

    num_heads: int
    num_kv_heads: int
    scale: float
    window: int = 0
    softcap: float = 0.0


class AttentionBackend(DeviceBackend):
    """One layer's attention step, after its qkv projection and before its o projection."""

    @abstractmethod
    def forward(
        self, heads: torch.Tensor, rope: Rope, cache: LayerKVCache, meta: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:  # fmt: skip
        """heads [T, H + 2 Hkv, D]: the qkv projection (q and k may be rotated in place); rope: the
        step's (cos, sin) [T, 1, D]. Stores this step's k and v in `cache` and returns the attention
        output [T, H, D] in heads' dtype."""


class TritonAttention(AttentionBackend):
    """Rotate q and k in place in the fused qkv buffer, store k and v (quantizing for an int8 cache),
    then one launch: the decode kernel when every sequence has one query token, else the varlen
    prefill kernel, which also takes the decode rows of a mixed batch (query length 1)."""

    name = "triton"

    @classmethod
    def can_implement(cls, device, dtype):
        return triton_unavailable(device)

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        # Imported only once this backend is chosen: a CPU engine never loads Triton.
        from lowbit.kernels.triton_decode_attention import paged_decode_attention_triton
        from lowbit.kernels.triton_kv_store import kv_store_triton
        from lowbit.kernels.triton_prefill_attention import prefill_attention_triton
        from lowbit.kernels.triton_rotary import rotary_triton

        self.decode, self.prefill = paged_decode_attention_triton, prefill_attention_triton
        self.rotary, self.kv_store = rotary_triton, kv_store_triton

    def forward(self, heads, rope, cache, meta, spec):
        num_heads, num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.rotary(heads, *rope, num_heads + num_kv_heads)
        q = heads[:, :num_heads]  # [T, H, D], strided view
        k = heads[:, num_heads : num_heads + num_kv_heads]
        v = heads[:, num_heads + num_kv_heads :]
        self.kv_store(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_scale, cache.v_scale)
        if meta.num_prefills == 0:
            return self.decode(
                q, cache.k, cache.v, meta.block_tables, meta.context_lens, spec.scale, cache.k_scale,
                cache.v_scale, window=spec.window, softcap=spec.softcap,
            )  # fmt: skip
        return self.prefill(
            q, cache.k, cache.v, meta.block_tables, meta.query_start_tensor, meta.context_lens,
            meta.max_query_len, spec.scale, cache.k_scale, cache.v_scale, window=spec.window,
            softcap=spec.softcap,
        )  # fmt: skip


class PagedAttention(AttentionBackend):
    """The CPU-style step: rotate and store, then each prompt's queries over its own cache (one call
    per prompt) and all single-token sequences as one batched decode call, computed in fp32."""

    def forward(self, heads, rope, cache, meta, spec):
        q = self.rotate_and_store(heads, rope, cache, meta, spec.num_heads, spec.num_kv_heads)
        return self.paged_attention(q, cache, meta, spec).to(heads.dtype)

    def paged_attention(
        self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, spec: AttentionSpec
    ) -> torch.Tensor:
        """q [T, H, D] -> fp32 [T, H, D], dispatching prefill sequences and the decode batch."""
        if meta.num_prefills == 0:  # the common step: no staging buffer
            return self.decode(q, cache, meta, spec)
        first_decode = meta.num_prefill_tokens
        if meta.num_prefills == 1 and first_decode == q.shape[0]:  # one prompt alone: no staging either
            return self.prefill(q, cache, meta, 0, spec)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for b in range(meta.num_prefills):
            out[meta.query_start[b] : meta.query_start[b + 1]] = self.prefill(q, cache, meta, b, spec)
        if first_decode < q.shape[0]:
            out[first_decode:] = self.decode(q[first_decode:], cache, meta, spec)
        return out

    @abstractmethod
    def rotate_and_store(
        self, heads: torch.Tensor, rope: Rope, cache: LayerKVCache, meta: AttentionMetadata,
        num_heads: int, num_kv_heads: int,
    ) -> torch.Tensor:  # fmt: skip
        """heads [T, H + 2 Hkv, D] -> rotated q fp32 [T, H, D]; rotated k and v go to the cache."""

    @abstractmethod
    def prefill(
        self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, b: int, spec: AttentionSpec
    ) -> torch.Tensor:
        """Sequence b's queries (its rows of q [T, H, D]) over its cache -> fp32 [Tq, H, D]."""

    @abstractmethod
    def decode(
        self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, spec: AttentionSpec
    ) -> torch.Tensor:
        """One query per decode sequence, q [B_decode, H, D] -> fp32 [B_decode, H, D]."""


class CompiledCPUAttention(CompiledCPU, PagedAttention):
    """The compiled ops: rotary and both cache writes in one call (kernels/cpu/norm_rotary.cpp),
    attention read straight from the paged cache (kernels/cpu/attention.cpp)."""

    name = "compiled-cpu"

    def forward(self, heads, rope, cache, meta, spec):
        # rotate_and_store inlined: the eager layers' hot path, one Python frame fewer per layer.
        q = self.ops.rotary_kv_store(heads, *rope, spec.num_heads, spec.num_kv_heads, cache.k, cache.v,
                                     meta.slot_mapping, cache.k_scale, cache.v_scale)  # fmt: skip
        return self.paged_attention(q, cache, meta, spec).to(heads.dtype)

    def rotate_and_store(self, heads, rope, cache, meta, num_heads, num_kv_heads):
        return self.ops.rotary_kv_store(heads, *rope, num_heads, num_kv_heads, cache.k, cache.v,
                                        meta.slot_mapping, cache.k_scale, cache.v_scale)  # fmt: skip

    def prefill(self, q, cache, meta, b, spec):
        q = q[meta.query_start[b] : meta.query_start[b + 1]]
        table, context_len = meta.block_tables[b], meta.context_lens_host[b]
        return self.ops.paged_prefill_attention(
            q, cache.k, cache.v, cache.k_scale, cache.v_scale, table, context_len, spec.scale, spec.window,
            spec.softcap,
        )  # fmt: skip

    def decode(self, q, cache, meta, spec):
        return self.ops.paged_decode_attention(
            q, cache.k, cache.v, cache.k_scale, cache.v_scale, meta.decode_block_tables,
            meta.context_lens[meta.num_prefills :], spec.scale, spec.window, spec.softcap,
        )  # fmt: skip


class TorchAttention(PagedAttention):
    """The torch reference paths, on any device: eager rotary and cache writes, batched decode
    attention and SDPA's math path for prompts (kernels/paged_attention_ref.py)."""

    name = "torch"

    def rotate_and_store(self, heads, rope, cache, meta, num_heads, num_kv_heads):
        qk_heads = num_heads + num_kv_heads
        # q and k heads sit side by side: one rotation for both.
        q, k = apply_rotary(heads[:, :qk_heads], *rope).split([num_heads, num_kv_heads], dim=1)
        v = heads[:, qk_heads:]
        kv_store_ref(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_scale, cache.v_scale,
                     padded=meta.has_padding)  # fmt: skip
        return q

    def prefill(self, q, cache, meta, b, spec):
        q = q[meta.query_start[b] : meta.query_start[b + 1]]
        table, context_len = meta.block_tables[b], meta.context_lens_host[b]
        return prefill_attention_cpu(
            q, cache.k, cache.v, table, context_len, spec.scale, cache.k_scale, cache.v_scale,
            window=spec.window, softcap=spec.softcap,
        )  # fmt: skip

    def decode(self, q, cache, meta, spec):
        return decode_attention_cpu(
            q, cache.k, cache.v, meta.decode_block_tables, meta.context_lens[meta.num_prefills :], spec.scale,
            cache.k_scale, cache.v_scale, masked=meta.decode_mask(cache.k.shape[1], spec.window),
            softcap=spec.softcap,
        )  # fmt: skip


# In order of preference: the first that can run on the engine's device is the model's.
ATTENTION_BACKENDS: tuple[type[AttentionBackend], ...] = (
    TritonAttention,
    CompiledCPUAttention,
    TorchAttention,
)
