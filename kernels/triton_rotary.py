"""Rotary position embedding applied in place to the fused q/k/v heads (Triton), HF rotate_half layout.

Layouts (any strides, the launcher passes them):
  heads [T, num_heads_total, D]  fp16 / bf16 / fp32   the fused qkv output viewed as heads:
                                                      q heads, then k heads, then v heads
  cos, sin [T, D] fp32 (or [T, 1, D], as RotaryEmbedding.tables returns them)
D is usually 64 or 128; any even D works (each half is masked up to a power of two).
Heads [:, :num_rotated_heads] (q and k, side by side) are rotated in place; the rest (v) are never
read or written. With x1 = x[:D/2], x2 = x[D/2:] (HF's rotate_half(x) = cat(-x2, x1)):
  out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]
  out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]
computed in fp32 and cast back to heads' dtype. GGUF's interleaved layout is undone by the loader,
so this one layout serves every format.

Reference: `rotary_ref` (the math of runtime.layers.rotary.apply_rotary, cast back, v copied).
Tolerance: fp32 differs from the reference only where the GPU contracts a multiply-add into an FMA
(~1 ulp); 16-bit outputs by at most one ulp of their dtype at a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import next_power_of_2

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Heads per program: 16 heads x 64 pairs of D = 128 is 1024 pairs, 8 per thread at 4 warps.
MAX_BLOCK_HEADS = 16


def rotary_ref(
    heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int
) -> torch.Tensor:
    """The spec, out of place: heads [T, NH, D]; cos, sin [T, D] or [T, 1, D] fp32 -> new [T, NH, D]."""
    cos, sin = cos.reshape(cos.shape[0], 1, cos.shape[-1]), sin.reshape(sin.shape[0], 1, sin.shape[-1])
    x = heads[:, :num_rotated_heads].float()  # [T, R, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = heads.clone()
    out[:, :num_rotated_heads] = (x * cos + rotated * sin).to(heads.dtype)
    return out


@triton.jit
def _rotary_kernel(
    heads_ptr, cos_ptr, sin_ptr,
    num_rotated_heads, half,
    stride_ht, stride_hh, stride_hd, stride_ct, stride_cd, stride_st, stride_sd,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # int64: token * stride may pass 2^31 on large batches
    head_ids = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BH]
    dims = tl.arange(0, BLOCK_HALF)  # [BHALF]: index within each half
    dim_mask = dims < half
    # One table row serves every head of this token.
    cos_row = cos_ptr + token * stride_ct
    sin_row = sin_ptr + token * stride_st
    cos1 = tl.load(cos_row + dims * stride_cd, mask=dim_mask, other=0.0)  # [BHALF] fp32
    cos2 = tl.load(cos_row + (dims + half) * stride_cd, mask=dim_mask, other=0.0)
    sin1 = tl.load(sin_row + dims * stride_sd, mask=dim_mask, other=0.0)
    sin2 = tl.load(sin_row + (dims + half) * stride_sd, mask=dim_mask, other=0.0)

    mask = (head_ids < num_rotated_heads)[:, None] & dim_mask[None, :]  # [BH, BHALF]
    first = heads_ptr + token * stride_ht + head_ids[:, None] * stride_hh + dims[None, :] * stride_hd
    second = first + half * stride_hd
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)  # [BH, BHALF]
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    # Both halves are loaded before either is stored: the program owns these elements, so in place is safe.
    out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(first, out1.to(heads_ptr.dtype.element_ty), mask=mask)
    tl.store(second, out2.to(heads_ptr.dtype.element_ty), mask=mask)


def _table_2d(name: str, table: torch.Tensor, tokens: int, dim: int, device: torch.device) -> torch.Tensor:
    """[T, D] or [T, 1, D] fp32 -> a [T, D] view (no copy), or a ValueError naming what is wrong."""
    if table.dim() == 3 and table.shape[1] == 1:
        table = table[:, 0]
    if table.shape != (tokens, dim):
        raise ValueError(
            f"{name} must be [T, D] = [{tokens}, {dim}] (or [T, 1, D]), got {tuple(table.shape)}"
        )
    if table.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {table.dtype}")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device}, heads on {device}")
    return table


def rotary_triton(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int) -> None:
    """Rotate heads [T, NH, D] [:, :num_rotated_heads] in place; cos, sin fp32 [T, D] or [T, 1, D]."""
    if heads.dim() != 3:
        raise ValueError(f"heads must be [T, num_heads_total, D], got shape {tuple(heads.shape)}")
    if heads.dtype not in FLOAT_DTYPES:
        raise ValueError(f"heads must be float16, bfloat16 or float32, got {heads.dtype}")
    tokens, num_heads, dim = heads.shape
    if dim == 0 or dim % 2:
        raise ValueError(f"head dim D must be even and > 0 (rotate_half splits it in two), got {dim}")
    if not 0 <= num_rotated_heads <= num_heads:
        raise ValueError(f"num_rotated_heads must be in [0, {num_heads}] (heads has {num_heads}), "
                         f"got {num_rotated_heads}")  # fmt: skip
    cos = _table_2d("cos", cos, tokens, dim, heads.device)
    sin = _table_2d("sin", sin, tokens, dim, heads.device)
    if tokens == 0 or num_rotated_heads == 0:
        return
    half = dim // 2
    block_heads = min(next_power_of_2(num_rotated_heads), MAX_BLOCK_HEADS)
    grid = (tokens, triton.cdiv(num_rotated_heads, block_heads))
    _rotary_kernel[grid](
        heads, cos, sin,
        num_rotated_heads, half,
        heads.stride(0), heads.stride(1), heads.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1),
        BLOCK_HEADS=block_heads, BLOCK_HALF=next_power_of_2(half),
        num_warps=4,
    )  # fmt: skip
