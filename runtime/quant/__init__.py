"""Quantization schemes and the registry from a scheme's config to its `QuantLinearMethod`."""

from __future__ import annotations

import torch

from .base import PackedLinear, QuantConfig, QuantizedWeight, QuantLinearMethod
from .dense import DenseConfig, DenseMethod, dense_weight
from .ggml import GGMLConfig, GGMLMethod
from .w4a16 import W4A16Config, W4A16Method
from .w8a8 import W8A8Config, W8A8Method
from .w8a16 import W8A16Config, W8A16Method

_METHODS: dict[type[QuantConfig], type[QuantLinearMethod]] = {
    DenseConfig: DenseMethod,
    GGMLConfig: GGMLMethod,
    W4A16Config: W4A16Method,
    W8A16Config: W8A16Method,
    W8A8Config: W8A8Method,
}


WeightLike = QuantizedWeight | torch.Tensor


def method_for(config: QuantConfig) -> QuantLinearMethod:
    try:
        return _METHODS[type(config)](config)
    except KeyError:
        raise ValueError(f"unsupported quantization scheme {config!r}") from None


def pack_linear(weight: WeightLike, device: torch.device, dtype: torch.dtype) -> PackedLinear:
    """A loader's weight -> packed for the best kernel on `device`."""
    if isinstance(weight, torch.Tensor):
        weight = dense_weight(weight)
    return method_for(weight.config).load(weight, device, dtype)


__all__ = [
    "DenseConfig",
    "GGMLConfig",
    "PackedLinear",
    "QuantConfig",
    "QuantLinearMethod",
    "QuantizedWeight",
    "W4A16Config",
    "W8A8Config",
    "W8A16Config",
    "WeightLike",
    "dense_weight",
    "method_for",
    "pack_linear",
]
