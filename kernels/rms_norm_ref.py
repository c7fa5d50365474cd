"""Residual add + RMSNorm + cast, the reference of the three norm backends (runtime/backends/norm.py):
the torch backend runs it as it is; kernels/triton_rms_norm.py and add_rms_norm in
kernels/cpu/norm_rotary.cpp are tested against it.

Layouts (rows are tokens):
  x        [T, hidden]  fp16 / bf16 / fp32   this layer's output, added to the residual stream
  residual [T, hidden]  fp32 or None         the residual stream; updated in place (residual += x)
  weight   [hidden]     fp32
  -> (normed [T, hidden] out_dtype, residual [T, hidden] fp32)
Without a residual (the model's first norm) the returned residual is a new fp32 tensor equal to
x.float(). The sum is done in fp32, normed = residual * rsqrt(mean(residual^2) + eps) * weight in
fp32, cast once to out_dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec; updates `residual` in place like the kernels."""
    residual = x.float() if residual is None else residual.add_(x)
    normed = F.rms_norm(residual, (residual.shape[-1],), weight, eps)
    return normed.to(out_dtype), residual
