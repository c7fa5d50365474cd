"""W4A16 matmul: y[M, N] = x[M, K] @ dequant(W)[N, K].T, group-wise int4 weights.

Canonical layout (what every loader produces, whatever the file format was):
  qweight uint8 [N, K/2]  element k of row n is nibble k % 2 of byte k // 2, low nibble first
  scales  fp32  [N, K/G]  w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G],  q in [0, 15]
  mins    fp32  [N, K/G]
One affine form covers GGUF Q4_0 (min = -8 d), Q4_1 (min = m) and GPTQ/AWQ (min = -zero * scale).

CPU path: torch's tinygemm int4pack (`_weight_int4pack_mm_for_cpu`). It computes
w = (q - 8) * scale + zero, so zero = min + 8 * scale, stored as scales_and_zeros [K/G, N, 2] in
the activation dtype. It needs N % 16 == 0 and G in {32, 64, 128, 256}; fast only for bf16.
Reference: `w4a16_matmul_ref` (fp32 dequantize + matmul).
"""

from __future__ import annotations

import torch

CPU_GROUP_SIZES = (32, 64, 128, 256)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in [0, 15] -> uint8 [N, K/2], low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values in [0, 15]."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_w4a16_ref(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """fp32 [N, K] weights from the canonical layout."""
    q = unpack_int4(qweight).float()  # [N, K]
    scale = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    low = mins.float().repeat_interleave(group_size, dim=1)  # [N, K]
    return q * scale + low


def w4a16_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The spec: dequantize to fp32, matmul in fp32, return in x's dtype."""
    w = dequantize_w4a16_ref(qweight, scales, mins, group_size)  # [N, K]
    return (x.float() @ w.T).to(x.dtype)


def cpu_int4pack_supports(out_features: int, in_features: int, group_size: int) -> str | None:
    """None if tinygemm's CPU kernel takes this shape, else why not."""
    if group_size not in CPU_GROUP_SIZES:
        return f"group size {group_size} not in {CPU_GROUP_SIZES}"
    if in_features % group_size:
        return f"in_features {in_features} not a multiple of group size {group_size}"
    if out_features % 16:
        return f"out_features {out_features} not a multiple of 16"
    return None


def pack_w4a16_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical layout -> (tinygemm packed weight [N, K/2], scales_and_zeros [K/G, N, 2])."""
    q = unpack_int4(qweight).to(torch.int32)  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = mins.float() + 8.0 * scales.float()  # [N, K/G]
    scales_and_zeros = torch.stack((scales.float().T, zeros.T), dim=-1)  # [K/G, N, 2]
    return packed, scales_and_zeros.to(dtype).contiguous()


def w4a16_matmul_cpu(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [..., K] in the dtype of scales_and_zeros -> [..., N]."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, x.shape[-1]), packed, group_size, scales_and_zeros
    )
    return y.reshape(*lead, y.shape[-1])
