"""RMSNorm over the fp32 residual stream, with the residual add fused in."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.runtime.backends.norm import NormBackend

from .linear import FusedLinear


class RMSNorm(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        eps: float,
        device: torch.device,
        out_dtype: torch.dtype,
        backend: NormBackend,
    ):
        super().__init__()
        # fp32 weight: the residual stream stays fp32 and only the norm's output is cast down.
        self.weight = nn.Parameter(weight.to(device=device, dtype=torch.float32), requires_grad=False)
        self.eps = eps
        self.out_dtype = out_dtype
        self.backend = backend  # the model's norm backend (runtime/backends/norm.py)
        self.quantize_output = False
        self._norm = backend.add_rms_norm

    def fuse_quantization(self, consumer: FusedLinear) -> None:
        """Emit int8 rows + per-token scales instead of normed values when the one kernel reading
        this norm's output takes them (Triton W8A8): norm and quantization then share a pass."""
        kernels = [part.packed.kernel for part in consumer.parts]
        self.quantize_output = (
            self.backend.quantizes and len(kernels) == 1 and kernels[0].takes_quantized_input
        )
        self._norm = self.backend.add_rms_norm_quant if self.quantize_output else self.backend.add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] (any dtype), residual [T, hidden] fp32 or None.
        Returns (normed [T, hidden] in out_dtype, or int8 rows + scales where the output is
        quantized; new residual fp32 = x + residual)."""
        return self._norm(x, residual, self.weight, self.eps, self.out_dtype)

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step
