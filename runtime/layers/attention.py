"""Self-attention over the paged KV cache: the qkv projection (with Qwen2's biases where the model
has them), Qwen3's and Gemma 3's per-head q/k RMSNorm, the model's attention backend (rotary, cache
write, paged attention with the layer's window and soft-cap: runtime/backends/attention.py), the o
projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.runtime.backends.attention import AttentionBackend, AttentionSpec
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.quant import WeightLike

from .attention_metadata import AttentionMetadata
from .linear import FusedLinear, Linear


class HeadRMSNorm:
    """RMSNorm over head_dim of each head, in place (Qwen3's and Gemma 3's q_norm / k_norm, applied
    before rotary). As transformers computes Qwen3's: normalized in fp32, cast back, then scaled
    (Gemma 3 scales before the cast: the same in fp32; its 1 + w comes from the loaders)."""

    def __init__(self, weight: torch.Tensor, eps: float, device: torch.device, dtype: torch.dtype):
        self.weight = weight.to(device=device, dtype=dtype)  # [D]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> None:
        """x [T, heads, D], a view into the qkv output: overwritten with its normed values."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        x.copy_(normed.to(x.dtype) * self.weight)


class Attention(nn.Module):
    def __init__(
        self,
        qkv: Sequence[WeightLike],
        o: WeightLike,
        spec: AttentionSpec,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend,
        qkv_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        o_bias: torch.Tensor | None = None,
        qk_norm: tuple[HeadRMSNorm, HeadRMSNorm] | None = None,
    ):
        super().__init__()
        # qkv: [q, k, v], or one weight the checkpoint already fused (Phi-3).
        num_heads, num_kv_heads = spec.num_heads, spec.num_kv_heads
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.qkv = FusedLinear(qkv, device, dtype, qkv_bias, sizes if len(qkv) == 1 else None)
        self.o_proj = Linear(o, device, dtype, o_bias)
        self.qk_norm = qk_norm
        self.spec = spec
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.backend = backend  # chosen once for the whole model

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # fmt: skip
        """rope: the step's (cos, sin) [T, 1, D]; x [T, hidden] -> [T, hidden] in the compute dtype."""
        tokens = x.shape[0]
        heads = self.qkv.joint(x).view(tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            q_norm, k_norm = self.qk_norm
            q_norm(heads[:, : self.num_heads])
            k_norm(heads[:, self.num_heads : self.num_heads + self.num_kv_heads])
        out = self.backend.forward(heads, rope, cache, meta, self.spec)
        return self.o_proj(out.reshape(tokens, -1))  # out [T, H, D] in the compute dtype

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step
