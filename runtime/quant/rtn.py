"""Round-to-nearest quantization onto the canonical W4A16 / W8A16 / W8A8 layouts, and the integer
grids every quantizer here shares (GPTQ and AWQ choose scales the same way).

int4 follows GPTQ/AutoAWQ: asymmetric w = (q - z) * s with an integer zero point z in [0, 15]
(stored as min = -z * s, so the result can be written as GPTQ/AWQ/compressed-tensors), or
symmetric with z = 8 and s = 2 max|w| / 15. int8 is symmetric: w = q * s, q in [-127, 127].
"""

from __future__ import annotations

import torch

from lowbit.kernels.w4a16_matmul import pack_int4

from .base import QuantizedWeight
from .w4a16 import W4A16Config
from .w8a8 import W8A8Config
from .w8a16 import W8A16Config

MAXQ4 = 15
MAX8 = 127.0
MIN_SCALE = 1e-8


def int4_grid(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for each row of w [..., g] (the last dim is one group)."""
    w = w.float()
    if symmetric:
        scale = (2 * w.abs().amax(dim=-1) / MAXQ4).clamp(min=MIN_SCALE)
        return scale, torch.full_like(scale, (MAXQ4 + 1) / 2)
    low = w.amin(dim=-1).clamp(max=0.0)  # the grid must contain 0, so zeros stay exact
    high = w.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / MAXQ4).clamp(min=MIN_SCALE)
    return scale, torch.round(-low / scale).clamp(0, MAXQ4)


def int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w [..., g] onto the grid of (scale, zero) [...]: uint8 q in [0, 15]."""
    return torch.round(w.float() / scale[..., None] + zero[..., None]).clamp(0, MAXQ4).to(torch.uint8)


def int4_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                perm: torch.Tensor | None = None) -> QuantizedWeight:  # fmt: skip
    """Integer codes q uint8 [N, K] (columns in `perm` order if given), scale/zero [N, K/g]."""
    tensors = {"qweight": pack_int4(q), "scales": scale.float(), "mins": -zero.float() * scale.float()}
    if perm is not None:
        tensors["perm"] = perm.to(torch.int64)
    config = W4A16Config(group_size, act_order=perm is not None)
    return QuantizedWeight(config, q.shape[0], q.shape[1], tensors)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
    return weight.float().reshape(out_features, in_features // group_size, group_size)


def quantize_w4a16_rtn(
    weight: torch.Tensor, group_size: int = 128, symmetric: bool = False
) -> QuantizedWeight:
    """[out, in] float -> W4A16; group_size -1 is one group per output channel."""
    group_size = weight.shape[1] if group_size == -1 else group_size
    w = _groups(weight, group_size)  # [N, G, g]
    scale, zero = int4_grid(w, symmetric)  # [N, G]
    q = int4_round(w, scale, zero).reshape(weight.shape)
    return int4_weight(q, scale, zero, group_size)


def _int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = _groups(weight, group_size)  # [N, G, g]
    scale = (w.abs().amax(dim=-1) / MAX8).clamp(min=MIN_SCALE)  # [N, G]
    q = torch.round(w / scale[..., None]).clamp(-MAX8, MAX8).to(torch.int8)
    return q.reshape(weight.shape), scale


def quantize_w8a16_rtn(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """[out, in] float -> symmetric W8A16; group_size None is per-channel."""
    q, scale = _int8(weight, group_size or weight.shape[1])
    return QuantizedWeight(
        W8A16Config(group_size), weight.shape[0], weight.shape[1], {"qweight": q, "scales": scale}
    )


def quantize_w8a8_rtn(weight: torch.Tensor) -> QuantizedWeight:
    """[out, in] float -> W8A8 (per-channel int8 weights; activations are quantized at run time)."""
    q, scale = _int8(weight, weight.shape[1])
    return QuantizedWeight(W8A8Config(), weight.shape[0], weight.shape[1], {"qweight": q, "scales": scale})


RTN_SCHEMES = {
    "w4a16": quantize_w4a16_rtn,
    "w8a16": quantize_w8a16_rtn,
    "w8a8": quantize_w8a8_rtn,
}


def quantize_rtn(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    try:
        return RTN_SCHEMES[scheme](weight)
    except KeyError:
        raise ValueError(f"quantization must be one of {sorted(RTN_SCHEMES)}, got {scheme!r}") from None
