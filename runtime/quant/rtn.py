"""Round-to-nearest quantization of dense weights into the canonical W4A16 / W8A16 layouts.

Asymmetric int4 uses an integer zero point (w = (q - z) * s, stored as min = -z * s) so the
result is also expressible in GPTQ/AWQ files; int8 is symmetric (w = q * s).
"""

from __future__ import annotations

import torch

from lowbit.kernels.w4a16_matmul import pack_int4

from .base import QuantizedWeight
from .w4a16 import W4A16Config
from .w8a16 import W8A16Config


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
    return weight.float().reshape(out_features, in_features // group_size, group_size)


def quantize_w4a16_rtn(weight: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """[out, in] float -> W4A16 QuantizedWeight."""
    w = _grouped(weight, group_size)  # [N, G, g]
    w_min = w.amin(dim=-1).clamp(max=0.0)  # the range must contain 0 so zero is exact
    w_max = w.amax(dim=-1).clamp(min=0.0)
    scale = ((w_max - w_min) / 15.0).clamp(min=1e-8)  # [N, G]
    zero = torch.round(-w_min / scale).clamp(0, 15)  # [N, G]
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8)  # [N, G, g]
    tensors = {
        "qweight": pack_int4(q.reshape(weight.shape)),
        "scales": scale,
        "mins": -zero * scale,
    }
    return QuantizedWeight(W4A16Config(group_size), weight.shape[0], weight.shape[1], tensors)


def quantize_w8a16_rtn(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """[out, in] float -> symmetric W8A16 QuantizedWeight; group_size None is per-channel."""
    w = _grouped(weight, group_size or weight.shape[1])  # [N, G, g]
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-8)  # [N, G]
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    tensors = {"qweight": q.reshape(weight.shape), "scales": scale}
    return QuantizedWeight(W8A16Config(group_size), weight.shape[0], weight.shape[1], tensors)


RTN_SCHEMES = {
    "w4a16": quantize_w4a16_rtn,
    "w8a16": quantize_w8a16_rtn,
}


def quantize_rtn(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    try:
        return RTN_SCHEMES[scheme](weight)
    except KeyError:
        raise ValueError(f"quantization must be one of {sorted(RTN_SCHEMES)}, got {scheme!r}") from None
