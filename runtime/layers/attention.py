"""Self-attention over the paged KV cache: the qkv projection, the model's attention backend
(rotary, cache write, paged attention: runtime/backends/attention.py), the o projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.runtime.backends.attention import AttentionBackend
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.quant import WeightLike

from .attention_metadata import AttentionMetadata
from .linear import FusedLinear, Linear


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
        backend: AttentionBackend,
    ):
        super().__init__()
        self.qkv = FusedLinear([q, k, v], device, dtype)
        self.o_proj = Linear(o, device, dtype)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.dtype = dtype
        self.backend = backend  # chosen once for the whole model

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # fmt: skip
        """rope: the step's (cos, sin) [T, 1, D]; x [T, hidden] -> [T, hidden] in the compute dtype."""
        tokens = x.shape[0]
        heads = self.qkv.joint(x).view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        out = self.backend.forward(heads, rope, cache, meta, self.num_heads, self.num_kv_heads, self.scale)
        return self.o_proj(out.reshape(tokens, -1))  # out [T, H, D] in the compute dtype

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step
