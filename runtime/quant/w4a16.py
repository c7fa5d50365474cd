"""W4A16: group-wise asymmetric int4 weights, 16-bit activations. Layout: kernels/w4a16_matmul.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import w4a16_matmul as k4
from lowbit.kernels.cpu import gemm as cpu_gemm

from .base import (
    DequantizedKernel,
    LinearKernel,
    QuantConfig,
    QuantLinearMethod,
    TensorSpec,
    TritonKernel,
    cpu_bf16_only,
)
from .ggml import CpuGGMLInt4Kernel


@dataclass(frozen=True)
class W4A16Config(QuantConfig):
    """group_size: input features sharing one scale and min (32 for GGUF Q4_0/Q4_1).
    act_order: GPTQ's desc_act. The canonical tensors then hold the input columns in the order
    `perm` gives (groups are contiguous in that order), and kernels read x[..., perm]."""

    group_size: int = 128
    act_order: bool = False
    name = "w4a16"

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"w4a16 group_size must be an even number >= 2, got {self.group_size}")


class CpuGroupInt4Kernel(LinearKernel):
    """Our CPU int4 GEMM (kernels/cpu/gemm.cpp): keeps the checkpoint's groups, any float
    activation dtype, bf16 dot products when activations are bf16."""

    name = "cpu-group-int4"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if device.type != "cpu":
            return "CPU only"
        return cpu_gemm.supports(out_features, in_features, config.group_size)

    def pack(self, tensors):
        out = cpu_gemm.pack_int4(tensors["qweight"], tensors["scales"], tensors["mins"])
        if self.config.act_order:
            out["perm"] = tensors["perm"]
        return out

    def apply(self, x, packed):
        if self.config.act_order:
            x = x.index_select(-1, packed["perm"])
        return cpu_gemm.gemm(x, packed, self.config.group_size)

    def compiled_layer_operands(self, packed, in_features):
        if self.config.act_order:  # the compiled layer reads x in its own order
            return None
        return [packed["q"], packed["scales"], packed["mins"]], self.config.group_size


class CpuInt4PackKernel(LinearKernel):
    """torch's tinygemm int4 CPU kernel (fast with bf16 activations)."""

    name = "cpu-int4pack"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        return cpu_bf16_only(device, dtype) or k4.cpu_int4pack_supports(
            out_features, in_features, config.group_size
        )

    def pack(self, tensors):
        packed, scales_and_zeros = k4.pack_w4a16_cpu(
            tensors["qweight"], tensors["scales"], tensors["mins"], self.dtype
        )
        out = {"qweight": packed, "scales_and_zeros": scales_and_zeros}
        if self.config.act_order:
            out["perm"] = tensors["perm"].to(self.device)
        return out

    def apply(self, x, packed):
        if self.config.act_order:
            x = x.index_select(-1, packed["perm"])
        return k4.w4a16_matmul_cpu(x, packed["qweight"], packed["scales_and_zeros"], self.config.group_size)


class TritonW4A16Kernel(TritonKernel):
    """Fused Triton dequant-GEMM (GEMV/split-K at small M, tiled above, dequantize + cuBLAS at
    large M); act-order reads x through `perm` inside the kernel."""

    name = "triton-w4a16"
    module = "triton_w4a16"

    def pack(self, tensors):
        on_device = {name: t.to(self.device) for name, t in tensors.items()}
        return self.ops.pack_w4a16_triton(
            on_device["qweight"], on_device["scales"], on_device["mins"], self.config.group_size,
            self.dtype, on_device.get("perm"),
        )  # fmt: skip

    def apply(self, x, packed):
        return self.ops.w4a16_matmul_triton(x, packed, self.config.group_size)


class W4A16Method(QuantLinearMethod):
    kernels = (TritonW4A16Kernel, CpuGGMLInt4Kernel, CpuGroupInt4Kernel, CpuInt4PackKernel, DequantizedKernel)

    def create_weights(self, in_features, out_features):
        group = self.config.group_size
        if in_features % group:
            raise ValueError(f"w4a16: in_features {in_features} is not a multiple of group size {group}")
        groups = in_features // group
        specs = {
            "qweight": TensorSpec((out_features, in_features // 2), torch.uint8),
            "scales": TensorSpec((out_features, groups), torch.float32),
            "mins": TensorSpec((out_features, groups), torch.float32),
        }
        if self.config.act_order:
            specs["perm"] = TensorSpec((in_features,), torch.int64)
        return specs

    def dequantize(self, tensors):
        """fp32 [N, K] in the original column order."""
        w = k4.dequantize_w4a16_ref(
            tensors["qweight"], tensors["scales"], tensors["mins"], self.config.group_size
        )
        if not self.config.act_order:
            return w
        unpermuted = torch.empty_like(w)
        unpermuted[:, tensors["perm"]] = w  # column j of the stored form is input feature perm[j]
        return unpermuted
