"""RMSNorm backends: residual add + RMSNorm over the fp32 residual stream + cast, in one step.

One is chosen per model, first of `NORM_BACKENDS` that can run on the device: `triton`
(kernels/triton_rms_norm.py, and the norm + int8 quantization of kernels/triton_act_quant.py),
`compiled-cpu` (add_rms_norm in kernels/cpu/norm_rotary.cpp) or `torch` (kernels/rms_norm_ref.py,
the reference the others are tested against).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.kernels.rms_norm_ref import add_rms_norm_ref
from lowbit.kernels.triton_support import triton_unavailable
from lowbit.runtime.quant.w8a8 import QuantizedActivation

from .base import CompiledCPU, DeviceBackend


class NormBackend(DeviceBackend):
    """The model's norms, each called with its own weight, eps and output dtype."""

    # True if `add_rms_norm_quant` emits int8 rows + per-token scales for a consumer that takes them.
    quantizes: ClassVar[bool] = False

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """x [T, hidden] (any dtype), residual [T, hidden] fp32 or None (the model's first norm).
        Returns (normed [T, hidden] in out_dtype, new residual fp32 = x + residual); the residual
        may be updated in place (it is the step's own buffer)."""
        raise NotImplementedError

    def add_rms_norm_quant(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype
    ) -> tuple[QuantizedActivation, torch.Tensor]:
        """As add_rms_norm, with the normed rows quantized to int8 per token (only if `quantizes`)."""
        raise NotImplementedError(f"the {self.name} norm does not quantize its output")


class TritonNorm(NormBackend):
    name = "triton"
    quantizes = True

    @classmethod
    def can_implement(cls, device, dtype):
        return triton_unavailable(device)

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        # Imported only once this backend is chosen: a CPU engine never loads Triton.
        from lowbit.kernels.triton_act_quant import rms_norm_quant_triton
        from lowbit.kernels.triton_rms_norm import add_rms_norm_triton

        self.add_rms_norm = add_rms_norm_triton  # the same signature: called with no frame between
        self.norm_quant = rms_norm_quant_triton

    def add_rms_norm_quant(self, x, residual, weight, eps, out_dtype):
        xq, scale, residual = self.norm_quant(x, weight, eps, residual)
        return QuantizedActivation(xq, scale), residual


class CompiledCPUNorm(CompiledCPU, NormBackend):
    name = "compiled-cpu"

    def add_rms_norm(self, x, residual, weight, eps, out_dtype):
        if residual is None or x.dim() != 2:  # the first norm (no residual yet to add to), or not rows
            return add_rms_norm_ref(x, residual, weight, eps, out_dtype)
        # In place: the residual is this step's own fp32 buffer. One op for add, norm and cast.
        return self.ops.add_rms_norm(x, residual, weight, eps, out_dtype), residual


class TorchNorm(NormBackend):
    name = "torch"
    add_rms_norm = staticmethod(add_rms_norm_ref)


# In order of preference: the first that can run on the engine's device is the model's.
NORM_BACKENDS: tuple[type[NormBackend], ...] = (TritonNorm, CompiledCPUNorm, TorchNorm)
