"""W8A16: int8 weights with per-channel or per-block scales, 16-bit activations.
Layout: kernels/w8a16_matmul.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import w8a16_matmul as k8
from lowbit.kernels.cpu import gemm as cpu_gemm

from .base import DequantizedKernel, LinearKernel, QuantConfig, QuantLinearMethod, TensorSpec, cpu_bf16_only
from .ggml import CpuGGMLInt8Kernel, TritonGGMLInt8Kernel


@dataclass(frozen=True)
class W8A16Config(QuantConfig):
    """group_size: input features per scale (32 for GGUF Q8_0); None is one scale per output channel."""

    group_size: int | None = None
    name = "w8a16"

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"w8a16 group_size must be >= 1 or None, got {self.group_size}")


class CpuGroupInt8Kernel(LinearKernel):
    """Our CPU int8 GEMM (kernels/cpu/gemm.cpp): block scales (GGUF Q8_0) or per-channel, any
    float activation dtype. The 49k-row vocabulary projection of the default model: 0.7-1.3 ms at
    one token against 2.1-3.2 ms for the dense fp16 weight it replaces (2 threads, Xeon)."""

    name = "cpu-group-int8"
    keeps_rows = True

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if device.type != "cpu":
            return "CPU only"
        return cpu_gemm.supports(out_features, in_features, config.group_size or in_features)

    def pack(self, tensors):
        return cpu_gemm.pack_int8(tensors["qweight"], tensors["scales"])

    def apply(self, x, packed):
        return cpu_gemm.gemm(x, packed, self.config.group_size or x.shape[-1])

    def gather_rows(self, packed, rows):
        return cpu_gemm.gather_int8_rows(packed, rows)

    def compiled_layer_operands(self, packed, in_features):
        return [packed["q"], packed["scales"]], self.config.group_size or in_features


class CpuInt8PackKernel(LinearKernel):
    """torch's int8 weight-only CPU kernel; per-channel scales only."""

    name = "cpu-int8pack"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        groups = 1 if config.group_size is None else in_features // config.group_size
        return cpu_bf16_only(device, dtype) or k8.cpu_int8pack_supports(in_features, groups)

    def pack(self, tensors):
        return {
            "qweight": tensors["qweight"].to(self.device).contiguous(),
            "scales": tensors["scales"][:, 0].to(device=self.device, dtype=self.dtype).contiguous(),
        }

    def apply(self, x, packed):
        return k8.w8a16_matmul_cpu(x, packed["qweight"], packed["scales"])


class W8A16Method(QuantLinearMethod):
    kernels = (
        TritonGGMLInt8Kernel,
        CpuGGMLInt8Kernel,
        CpuGroupInt8Kernel,
        CpuInt8PackKernel,
        DequantizedKernel,
    )

    def create_weights(self, in_features, out_features):
        group = self.config.group_size or in_features
        if in_features % group:
            raise ValueError(f"w8a16: in_features {in_features} is not a multiple of group size {group}")
        return {
            "qweight": TensorSpec((out_features, in_features), torch.int8),
            "scales": TensorSpec((out_features, in_features // group), torch.float32),
        }

    def dequantize(self, tensors):
        return k8.dequantize_w8a16_ref(tensors["qweight"], tensors["scales"])
