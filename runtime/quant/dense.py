"""Unquantized weights: `weight` [out, in] in any float dtype, cast to the compute dtype at load."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LinearKernel, QuantConfig, QuantizedWeight, QuantLinearMethod, TensorSpec


@dataclass(frozen=True)
class DenseConfig(QuantConfig):
    name = "dense"


class TorchDenseKernel(LinearKernel):
    name = "torch-dense"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        return None

    def pack(self, tensors):
        return {"weight": tensors["weight"].to(device=self.device, dtype=self.dtype).contiguous()}

    def apply(self, x, packed):
        return F.linear(x, packed["weight"])


class DenseMethod(QuantLinearMethod):
    kernels = (TorchDenseKernel,)

    def create_weights(self, in_features, out_features):
        return {"weight": TensorSpec((out_features, in_features), torch.float32)}

    def dequantize(self, tensors):
        return tensors["weight"].float()


def dense_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Wrap a plain [out, in] tensor so dense and quantized weights travel the same way."""
    if weight.ndim != 2:
        raise ValueError(f"a linear weight must be 2-D, got shape {tuple(weight.shape)}")
    return QuantizedWeight(DenseConfig(), weight.shape[0], weight.shape[1], {"weight": weight})
