"""W8A8 matmul: int8 weights (per output channel) x int8 activations (per token, quantized on the
fly), int32 accumulation, scales applied in the epilogue (the SmoothQuant / compressed-tensors
"int-quantized" scheme).

Canonical layout:
  qweight int8 [N, K]   w[n, k] = qweight[n, k] * scales[n, 0]
  scales  fp32 [N, 1]
Activations: x[m, k] ~ xq[m, k] * x_scale[m], x_scale = max|x[m, :]| / 127, xq = round(x / x_scale).
y[m, n] = x_scale[m] * scales[n] * sum_k xq[m, k] * qweight[n, k]

CPU path: `torch._int_mm` (int8 x int8 -> int32, exact). Reference: `w8a8_matmul_ref`, which does
the integer product in float64 (exact: |sum| < 127^2 K << 2^53).
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [..., K], fp32 scale [..., 1]); symmetric, one scale per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-10)
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_w8a8_weight_ref(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()


def w8a8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec, including the activation quantization; returns x's dtype."""
    xq, x_scale = quantize_per_token_ref(x)
    acc = xq.double() @ qweight.double().T  # [..., N], exact integers
    return (acc * x_scale.double() * scales.double().T).to(x.dtype)


def w8a8_matmul_cpu(x: torch.Tensor, qweight_t: torch.Tensor, scales_row: torch.Tensor) -> torch.Tensor:
    """x [..., K]; qweight_t int8 [K, N] (transposed once at load); scales_row fp32 [1, N]."""
    lead = x.shape[:-1]
    xq, x_scale = quantize_per_token_ref(x.reshape(-1, x.shape[-1]))
    acc = torch._int_mm(xq, qweight_t)  # int32 [M, N]
    y = acc.float() * x_scale * scales_row
    return y.to(x.dtype).reshape(*lead, y.shape[-1])
