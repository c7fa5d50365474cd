"""RMSNorm over the fp32 residual stream, with the residual add fused in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, device: torch.device, out_dtype: torch.dtype):
        super().__init__()
        # fp32 weight: the residual stream stays fp32 and only the norm's output is cast down.
        self.weight = nn.Parameter(weight.to(device=device, dtype=torch.float32), requires_grad=False)
        self.eps = eps
        self.out_dtype = out_dtype

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] (any dtype), residual [T, hidden] fp32 or None.
        Returns (normed [T, hidden] in out_dtype, new residual fp32 = x + residual)."""
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
