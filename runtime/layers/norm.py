"""RMSNorm over the fp32 residual stream, with the residual add fused in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import cpu_ops
from lowbit.kernels.triton_support import use_triton
from lowbit.runtime.quant.w8a8 import QuantizedActivation

from .linear import FusedLinear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, device: torch.device, out_dtype: torch.dtype):
        super().__init__()
        # fp32 weight: the residual stream stays fp32 and only the norm's output is cast down.
        self.weight = nn.Parameter(weight.to(device=device, dtype=torch.float32), requires_grad=False)
        self.eps = eps
        self.out_dtype = out_dtype
        self.triton_norm = self.triton_norm_quant = None
        if use_triton(device):  # imported only here: a CPU engine never loads Triton
            from lowbit.kernels.triton_act_quant import rms_norm_quant_triton
            from lowbit.kernels.triton_rms_norm import add_rms_norm_triton

            self.triton_norm = add_rms_norm_triton
            self.triton_norm_quant = rms_norm_quant_triton
        self.quantize_output = False

    def fuse_quantization(self, consumer: FusedLinear) -> None:
        """Emit int8 rows + per-token scales instead of normed values when the one kernel reading
        this norm's output takes them (Triton W8A8): norm and quantization then share a pass."""
        kernels = [part.packed.kernel for part in consumer.parts]
        self.quantize_output = (
            self.triton_norm_quant is not None and len(kernels) == 1 and kernels[0].takes_quantized_input
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] (any dtype), residual [T, hidden] fp32 or None.
        Returns (normed [T, hidden] in out_dtype, new residual fp32 = x + residual)."""
        if self.quantize_output:
            xq, scale, residual = self.triton_norm_quant(x, self.weight, self.eps, residual)
            return QuantizedActivation(xq, scale), residual
        if self.triton_norm is not None:
            return self.triton_norm(x, residual, self.weight, self.eps, self.out_dtype)
        if residual is None:
            residual = x.float()
        elif (ops := cpu_ops.load()) is not None and residual.is_cpu and x.dim() == 2:
            # In place: the residual is this step's own fp32 buffer. One op for add, norm and cast.
            return ops.add_rms_norm(x, residual, self.weight, self.eps, self.out_dtype), residual
        else:
            residual = residual.add_(x)
        normed = F.rms_norm(residual, (residual.shape[-1],), self.weight, self.eps)
        return normed.to(self.out_dtype), residual

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step
