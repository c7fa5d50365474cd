"""W8A8: int8 per-channel weights, int8 per-token dynamic activations (SmoothQuant, RTN W8A8,
compressed-tensors int-quantized). Layout: kernels/w8a8_matmul.py.

There is no dequantized fallback: computing with float activations would be a different scheme
with different numbers; the reference kernel runs anywhere torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import w8a8_matmul as k8

from .base import LinearKernel, QuantConfig, QuantLinearMethod, TensorSpec, TritonKernel


@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    name = "w8a8"


@dataclass(frozen=True, eq=False)
class QuantizedActivation:
    """Activations already quantized per token, by an RMSNorm fused with the quantization (the
    SmoothQuant path: norm -> smooth -> quantize in one pass), for a kernel that
    `takes_quantized_input`: the GEMM then reads int8 rows instead of another pass over x."""

    xq: torch.Tensor  # int8 [T, K]
    scale: torch.Tensor  # fp32 [T, 1]

    @property
    def shape(self) -> torch.Size:
        return self.xq.shape


class CpuIntMmKernel(LinearKernel):
    """Per-token quantization in torch, then torch's exact int8 GEMM (`_int_mm`)."""

    name = "cpu-int-mm"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        return None if device.type == "cpu" else "CPU only"

    def pack(self, tensors):
        return {
            "qweight_t": tensors["qweight"].T.contiguous().to(self.device),
            "scales_row": tensors["scales"].float().T.contiguous().to(self.device),
        }

    def apply(self, x, packed):
        return k8.w8a8_matmul_cpu(x, packed["qweight_t"], packed["scales_row"])


class TritonW8A8Kernel(TritonKernel):
    """Triton per-token activation quantization, then an int8 x int8 Triton GEMM with int32
    accumulation and the scales applied in the epilogue."""

    name = "triton-w8a8"
    module = "triton_w8a8"
    takes_quantized_input = True

    def pack(self, tensors):
        qweight, scales = tensors["qweight"].to(self.device), tensors["scales"].to(self.device)
        return self.ops.pack_w8a8_triton(qweight, scales)

    def apply(self, x, packed):
        if isinstance(x, QuantizedActivation):
            return self.ops.w8a8_gemm_triton(x.xq, x.scale, packed, out_dtype=self.dtype)
        return self.ops.w8a8_matmul_triton(x, packed)


class ReferenceKernel(LinearKernel):
    """The reference itself, on any device (slow: float64)."""

    name = "w8a8-reference"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        return None

    def pack(self, tensors):
        return {name: t.to(self.device) for name, t in tensors.items()}

    def apply(self, x, packed):
        return k8.w8a8_matmul_ref(x, packed["qweight"], packed["scales"])


class W8A8Method(QuantLinearMethod):
    kernels = (TritonW8A8Kernel, CpuIntMmKernel, ReferenceKernel)

    def create_weights(self, in_features, out_features):
        return {
            "qweight": TensorSpec((out_features, in_features), torch.int8),
            "scales": TensorSpec((out_features, 1), torch.float32),
        }

    def dequantize(self, tensors):
        """The weight alone; W8A8's meaning also includes quantizing activations (see the kernel)."""
        return k8.dequantize_w8a8_weight_ref(tensors["qweight"], tensors["scales"])
