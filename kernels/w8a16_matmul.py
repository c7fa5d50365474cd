"""W8A16 matmul: y[M, N] = x[M, K] @ dequant(W)[N, K].T, int8 weights with group-wise scales.

Canonical layout:
  qweight int8 [N, K]
  scales  fp32 [N, K/G]   w[n, k] = qweight[n, k] * scales[n, k // G]; G = K is per-channel
GGUF Q8_0 is G = 32; RTN W8A16 from a safetensors model is per-channel.

CPU path: torch's `_weight_int8pack_mm` (per-channel scales only; scales in the activation dtype).
It crashes in bf16 when K is not a multiple of 16, hence `cpu_int8pack_supports`.
Reference: `w8a16_matmul_ref` (fp32 dequantize + matmul).
"""

from __future__ import annotations

import torch


def dequantize_w8a16_ref(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] weights from the canonical layout; the group size follows from the shapes."""
    group_size = qweight.shape[1] // scales.shape[1]
    return qweight.float() * scales.float().repeat_interleave(group_size, dim=1)


def w8a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec: dequantize to fp32, matmul in fp32, return in x's dtype."""
    return (x.float() @ dequantize_w8a16_ref(qweight, scales).T).to(x.dtype)


def cpu_int8pack_supports(in_features: int, num_groups: int) -> str | None:
    """None if torch's CPU int8pack kernel takes this weight, else why not."""
    if num_groups != 1:
        return "int8pack takes per-channel scales only"
    if in_features % 16:
        return f"in_features {in_features} not a multiple of 16"
    return None


def w8a16_matmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K]; qweight int8 [N, K]; scales [N] in x's dtype -> [..., N]."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scales)
    return y.reshape(*lead, y.shape[-1])
