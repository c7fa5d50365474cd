"""W8A16: int8 weights with per-channel or per-block scales, 16-bit activations.
Layout: kernels/w8a16_matmul.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import cpu_ops
from lowbit.kernels import w8a16_matmul as k8

from .base import DequantizedKernel, LinearKernel, QuantConfig, QuantLinearMethod, TensorSpec, cpu_bf16_only


@dataclass(frozen=True)
class W8A16Config(QuantConfig):
    """group_size: input features per scale (32 for GGUF Q8_0); None is one scale per output channel."""

    group_size: int | None = None
    name = "w8a16"

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"w8a16 group_size must be >= 1 or None, got {self.group_size}")


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


class CpuQ8Kernel(LinearKernel):
    """GGUF Q8_0-style weights (group 32) through the fused CPU op `q8_linear`: activations quantized
    to int8 per 32 inputs and integer dot products (AVX512-VNNI where present), as llama.cpp runs
    Q8_0. Streams the int8 weight (half an fp16 copy's bytes) and, at small M, never materialises
    a dense weight: the vocabulary projection of the default model is Q8_0. Not used in float32
    mode, which keeps exact dequantized weights. Many rows at once (prefill, scoring) dequantize
    a chunk of rows at a time instead."""

    name = "cpu-q8"
    MAX_ROWS = 32  # beyond this a dense matmul over dequantized chunks is faster
    ROWS_PER_CHUNK = 4096

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if device.type != "cpu" or dtype == torch.float32:
            return "CPU bf16/fp16 only"
        if config.group_size != k8.Q8_GROUP:
            return f"group size {k8.Q8_GROUP} only"
        if cpu_ops.load() is None:
            return "fused CPU ops unavailable"
        return None

    def pack(self, tensors):
        qweight = tensors["qweight"].contiguous()
        scales = tensors["scales"].float().contiguous()
        return {"qweight": qweight, "scales": scales, "correction": k8.q8_correction(qweight, scales)}

    def apply(self, x, packed):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.MAX_ROWS:
            y = cpu_ops.load().q8_linear(x2, packed["qweight"], packed["scales"], packed["correction"])
        else:
            y = torch.cat([
                torch.nn.functional.linear(x2, k8.dequantize_w8a16_ref(q, s).to(x.dtype))
                for q, s in zip(packed["qweight"].split(self.ROWS_PER_CHUNK),
                                packed["scales"].split(self.ROWS_PER_CHUNK), strict=True)
            ], dim=-1)  # fmt: skip
        return y.to(self.dtype).reshape(*x.shape[:-1], -1)


class W8A16Method(QuantLinearMethod):
    kernels = (CpuQ8Kernel, CpuInt8PackKernel, DequantizedKernel)

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
