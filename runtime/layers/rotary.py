"""Rotary position embedding, HF layout (rotate_half over two halves of each head).

GGUF files store q/k rows permuted for llama.cpp's interleaved layout; the GGUF loader undoes that
permutation, so one rotary layout serves every format.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.runtime.models.config import RopeScaling


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling, freq_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 [head_dim / 2], with HF's "linear", "llama3" and "longrope" scaling and GGUF's rope_freqs
    factors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling.kind == "longrope":  # as transformers computes it: 1 / (factor * theta^(2i/D))
        factors = scaling.long_factor if scaling.use_long else scaling.short_factor
        if len(factors) != head_dim // 2:
            raise ValueError(f"longrope needs {head_dim // 2} factors per set, got {len(factors)}")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
    inv_freq = 1.0 / theta**exponents
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    if scaling.kind == "default":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise ValueError(
        f"unsupported rope scaling {scaling.kind!r} (supported: default, linear, llama3, longrope)"
    )


def _llama3_scaling(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    smooth interpolation in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of each step's positions, computed per step rather than kept as [max positions, D]
    tables (4 MiB at an 8192-token context): at one token per sequence that is a few small ops, and
    the values are the same fp32 products and cos/sin a table would hold."""

    def __init__(self, inv_freq: torch.Tensor, device: torch.device, attention_factor: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)  # [D/2]
        self.attention_factor = attention_factor  # LongRoPE's scale on cos and sin

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin fp32 [T, 1, D] for positions [T]: made once per step, shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        both = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # both halves at once: [T, 1, D]
        if self.attention_factor != 1.0:
            return both.cos() * self.attention_factor, both.sin() * self.attention_factor
        return both.cos(), both.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (any float dtype); cos, sin [T, 1, D] -> rotated fp32 [T, heads, D]."""
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
