"""GGUF block types kept as the file stores them (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS).

Layout: kernels/ggml_blocks_ref.py (uint8 [out, row_bytes], the tensor's bytes in the file). GGUF's
Q4_0, Q4_1 and Q8_0 do not come here: their blocks map exactly onto W4A16/W8A16 (loaders/gguf_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import ggml_blocks_ref as ref
from lowbit.kernels.cpu import ggml as cpu_ggml

from .base import DequantizedKernel, LinearKernel, QuantConfig, QuantLinearMethod, TensorSpec

TYPES = cpu_ggml.TYPES


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """qtype: the ggml type's name (gguf.GGMLQuantizationType), one of TYPES."""

    qtype: str = "Q4_K"
    name = "ggml"

    def __post_init__(self) -> None:
        if self.qtype not in TYPES:
            raise ValueError(f"ggml type {self.qtype!r} is not supported (supported: {', '.join(TYPES)})")


class CpuGGMLKernel(LinearKernel):
    """kernels/cpu/ggml_blocks.cpp on the file's blocks; rows stay readable for a tied embedding."""

    name = "cpu-ggml"
    keeps_rows = True

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if device.type != "cpu":
            return "CPU only"
        return cpu_ggml.supports(config.qtype)

    def pack(self, tensors):
        return {"blocks": tensors["blocks"].contiguous()}

    def apply(self, x, packed):
        return cpu_ggml.gemm(x, packed["blocks"], self.config.qtype)

    def gather_rows(self, packed, rows):
        return {"blocks": packed["blocks"][rows]}

    def compiled_layer_operands(self, packed, in_features):
        return [packed["blocks"]], -ref.qtype(self.config.qtype).value


class GGMLMethod(QuantLinearMethod):
    kernels = (CpuGGMLKernel, DequantizedKernel)

    def create_weights(self, in_features, out_features):
        return {
            "blocks": TensorSpec((out_features, ref.row_bytes(self.config.qtype, in_features)), torch.uint8)
        }

    def dequantize(self, tensors):
        """fp32 [out, in]; the compiled dequantizer where it is built (same values, ~100x faster)."""
        blocks = tensors["blocks"]
        if blocks.device.type == "cpu" and cpu_ggml.supports(self.config.qtype) is None:
            in_features = ref.in_features(self.config.qtype, blocks.shape[1])
            return cpu_ggml.dequantize(blocks, in_features, self.config.qtype)
        return ref.dequantize_ref(blocks, self.config.qtype).to(blocks.device)
