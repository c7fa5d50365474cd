"""RMSNorm with the residual add fused in (Triton), for the engine's fp32 residual stream.

Layouts (rows are tokens; any strides, the launcher passes them):
  x        [T, hidden]  fp16 / bf16 / fp32   this layer's output, added to the residual stream
  residual [T, hidden]  fp32 or None         the residual stream; updated in place (residual += x)
  weight   [hidden]     fp32
  -> (normed [T, hidden] out_dtype, residual [T, hidden] fp32)
Without a residual (the first layer) the returned residual is a new fp32 tensor equal to x.float().

Semantics are kernels/rms_norm_ref.py's (and kernels/cpu/norm_rotary.cpp add_rms_norm's): the sum is
done in fp32, normed = residual * rsqrt(mean(residual^2) + eps) * weight in fp32, cast once to
out_dtype. Reference: `add_rms_norm_ref` (F.rms_norm). One program per row; a row longer than MAX_BLOCK is
walked in blocks twice (sum of squares, then normalize), recomputing x + residual from the inputs
in the second pass instead of re-reading what the first pass wrote, so no thread ever reads another
thread's store.

Tolerance: the residual equals the reference bit for bit (the same fp32 additions). The normed
output differs only by the order of the fp32 sum of squares and rsqrt's approximation (~1e-6
relative), plus at most one ulp of out_dtype where the fp32 value sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import next_power_of_2

# Largest row held in registers in one block (Llama-70B's hidden is 8192); longer rows loop.
MAX_BLOCK = 8192
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    n_cols, eps,
    stride_xr, stride_xc, stride_rr, stride_rc, stride_w, stride_or, stride_oc,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31 on large batches
    x_row = x_ptr + row * stride_xr
    res_row = res_ptr + row * stride_rr
    out_row = out_ptr + row * stride_or
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_row + cols * stride_rc, mask=mask, other=0.0)
        # Masked lanes hold 0 and add nothing; divide by the true length.
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0)
        tl.store(res_row + cols * stride_rc, x, mask=mask)
        tl.store(out_row + cols * stride_oc, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane partial sums, reduced once
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(res_row + offs * stride_rc, mask=mask, other=0.0)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            # Recompute x + residual from the inputs: the residual is only written below, after this
            # block's own loads, so every element is read before it is overwritten.
            x = tl.load(x_row + offs * stride_xc, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(res_row + offs * stride_rc, mask=mask, other=0.0)
            w = tl.load(w_ptr + offs * stride_w, mask=mask, other=0.0)
            tl.store(res_row + offs * stride_rc, x, mask=mask)
            tl.store(out_row + offs * stride_oc, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _validate(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out_dtype: torch.dtype
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    hidden = x.shape[1]
    if hidden == 0:
        raise ValueError("x has hidden size 0: nothing to normalize")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [hidden] = [{hidden}], got shape {tuple(weight.shape)}")
    if weight.dtype != torch.float32:
        raise ValueError(f"weight must be float32 (the residual stream's dtype), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != torch.float32:
            raise ValueError(f"residual must be float32 (updated in place), got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")


def _num_warps(block: int) -> int:
    # ~8-16 fp32 values per thread per live tensor: enough in flight to hide latency, few spills.
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    *,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, hidden]; residual [T, hidden] fp32 (updated in place and returned) or None (a new fp32
    tensor = x.float() is returned); weight [hidden] fp32 -> (normed [T, hidden] out_dtype, residual).
    `block_size` (a power of two) overrides the row block, for tests of the multi-block path."""
    _validate(x, residual, weight, out_dtype)
    rows, hidden = x.shape
    has_residual = residual is not None
    if residual is None:
        residual = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # [T, hidden]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # [T, hidden]
    if block_size is None:
        block_size = min(next_power_of_2(hidden), MAX_BLOCK)
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if rows == 0:
        return out, residual
    _add_rms_norm_kernel[(rows,)](
        x, residual, weight, out,
        hidden, float(eps),
        x.stride(0), x.stride(1), residual.stride(0), residual.stride(1), weight.stride(0),
        out.stride(0), out.stride(1),
        HAS_RESIDUAL=has_residual, BLOCK=block_size, ONE_BLOCK=block_size >= hidden,
        num_warps=_num_warps(block_size),
    )  # fmt: skip
    return out, residual
