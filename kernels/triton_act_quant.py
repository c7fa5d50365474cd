"""Per-token dynamic int8 activation quantization in Triton, alone and fused behind RMSNorm.

Layouts (row-major views; strides are passed, rows need not be contiguous):
  x         [M, K] fp16 / bf16 / fp32 (`quantize_per_token_triton` also takes [..., K])
  xq        int8 [M, K] (new, contiguous)          x[m, k] ~ xq[m, k] * scale[m]
  scale     fp32 [M, 1] (new)                      scale = max(max|x[m, :]| / 127, 1e-10)
  weight    fp32 [K]       RMSNorm weight (SmoothQuant may already have divided it by s)
  residual  fp32 [M, K]    the residual stream; updated in place: residual += x
  smooth    fp32 [K]       optional explicit SmoothQuant divisor, applied after the norm

References: `quantize_per_token_ref` (kernels/w8a8_matmul.py) and `rms_norm_quant_ref` (below).

Tolerance story. `quantize_per_token_triton` matches the reference bit for bit, ties included: the
row max is exact, both divisions use `tl.div_rn` (IEEE round-to-nearest; the plain `/` may lower to
an approximate division on NVIDIA), and `round_half_even` (kernels/triton_int8.py) reproduces
torch.round. The fused norm kernel sums squares in a different order and uses the hardware rsqrt, so
its normed values differ from torch's by a few ulp: the scale agrees to ~1e-6 relative and a code
may differ by one where the normed value sits within a few ulp of a rounding boundary. The residual
update (fp32 + x upcast) is exact.

One program per row. A row that fits in one block (K <= _MAX_BLOCK_K) is read once and kept in
registers; a longer row is walked in blocks (amax pass, then quantize pass), and the fused kernel
recomputes residual + x in every pass instead of re-reading what it wrote, so the in-place update
never reads its own output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_int8 import round_half_even
from lowbit.kernels.triton_support import next_power_of_2
from lowbit.kernels.w8a8_matmul import quantize_per_token_ref

# A row up to this long stays in registers (one load per element). Tests lower it to reach the
# looped path with small shapes. To be tuned on GPU together with _num_warps.
_MAX_BLOCK_K = 8192
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _scale_from_amax(amax):
    # 127 = INT8_MAX and 1e-10 = the floor for an all-zero row, as in quantize_per_token_ref.
    return tl.maximum(tl.div_rn(amax, 127.0), 1e-10)


@triton.jit
def _quantize(v, scale):
    q = round_half_even(tl.div_rn(v, scale))
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _quant_per_token_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    BLOCK_K: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if SINGLE_TILE:
        mask = cols < K
        x = tl.load(x_row + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        scale = _scale_from_amax(tl.max(tl.abs(x), axis=0))
        tl.store(q_row + cols, _quantize(x, scale), mask=mask)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + (k0 + cols) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale_from_amax(tl.max(amax, axis=0))
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + (k0 + cols) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, _quantize(x, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _load_residual_sum(x_row, r_row, offs, mask, stride_xk, stride_rk, HAS_RESIDUAL: tl.constexpr):
    """residual + x in fp32 (or x alone when there is no residual yet)."""
    r = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(r_row + offs * stride_rk, mask=mask, other=0.0)
    return r


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    smooth_ptr,
    q_ptr,
    scale_ptr,
    K,
    eps,
    stride_xm,
    stride_xk,
    stride_rm,
    stride_rk,
    stride_qm,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    r_row = res_ptr + row * stride_rm  # read (if HAS_RESIDUAL) and written: residual_out
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if SINGLE_TILE:
        mask = cols < K
        r = _load_residual_sum(x_row, r_row, cols, mask, stride_xk, stride_rk, HAS_RESIDUAL)  # [BLOCK_K]
        tl.store(r_row + cols * stride_rk, r, mask=mask)
        rstd = tl.rsqrt(tl.sum(r * r, axis=0) / K + eps)
        y = r * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0)
        if HAS_SMOOTH:
            y = tl.div_rn(y, tl.load(smooth_ptr + cols, mask=mask, other=1.0))
        scale = _scale_from_amax(tl.max(tl.abs(y), axis=0))
        tl.store(q_row + cols, _quantize(y, scale), mask=mask)
    else:
        # Pass 1: sum of squares. Pass 2: amax of the normed row. Pass 3: store residual and codes.
        # Every pass recomputes residual + x from the inputs: with an in-place residual, reading
        # back what an earlier pass stored would rely on the store being visible to other threads.
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            r = _load_residual_sum(x_row, r_row, k0 + cols, mask, stride_xk, stride_rk, HAS_RESIDUAL)
            sq += r * r
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            r = _load_residual_sum(x_row, r_row, k0 + cols, mask, stride_xk, stride_rk, HAS_RESIDUAL)
            y = r * rstd * tl.load(w_ptr + k0 + cols, mask=mask, other=0.0)
            if HAS_SMOOTH:
                y = tl.div_rn(y, tl.load(smooth_ptr + k0 + cols, mask=mask, other=1.0))
            amax = tl.maximum(amax, tl.abs(y))
        scale = _scale_from_amax(tl.max(amax, axis=0))
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            r = _load_residual_sum(x_row, r_row, k0 + cols, mask, stride_xk, stride_rk, HAS_RESIDUAL)
            y = r * rstd * tl.load(w_ptr + k0 + cols, mask=mask, other=0.0)
            if HAS_SMOOTH:
                y = tl.div_rn(y, tl.load(smooth_ptr + k0 + cols, mask=mask, other=1.0))
            # Same block, same offsets: this program read these residual elements just above.
            tl.store(r_row + (k0 + cols) * stride_rk, r, mask=mask)
            tl.store(q_row + k0 + cols, _quantize(y, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


# ---------------------------------------------------------------------------------------------
# Launchers


def _block_k(K: int) -> tuple[int, bool]:
    """(BLOCK_K, whether one block covers the row)."""
    block = min(next_power_of_2(K), _MAX_BLOCK_K)
    return block, block >= K


def _num_warps(block_k: int) -> int:
    # ~8-16 fp32 values per thread per tensor; to be tuned on GPU.
    return max(1, min(16, block_k // 512))


def _check_float(name: str, fn: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] fp16/bf16/fp32 -> (int8 [..., K], fp32 scale [..., 1]); matches
    `quantize_per_token_ref` exactly."""
    fn = "quantize_per_token_triton"
    _check_float("x", fn, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)  # [M, K]; a view whenever the strides allow
    M = x2.shape[0]
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        block_k, single = _block_k(K)
        _quant_per_token_kernel[(M,)](
            x2,
            xq,
            scale,
            K,
            x2.stride(0),
            x2.stride(1),
            xq.stride(0),
            BLOCK_K=block_k,
            SINGLE_TILE=single,
            num_warps=_num_warps(block_k),
        )
    return xq.reshape(*lead, K), scale.reshape(*lead, 1)


def _check_rms_norm_quant_args(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, smooth: torch.Tensor | None
) -> None:
    fn = "rms_norm_quant_triton"
    _check_float("x", fn, x)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{fn}: x must be [M, K] with K > 0, got shape {tuple(x.shape)}")
    K = x.shape[1]
    named = [("weight", weight, (K,)), ("smooth", smooth, (K,)), ("residual", residual, tuple(x.shape))]
    for name, t, shape in named:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{fn}: {name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")


def rms_norm_quant_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm (+ SmoothQuant divide) + per-token int8 quantization, one kernel.

    x [M, K] any float dtype; weight [K] fp32; residual [M, K] fp32 (updated in place) or None;
    smooth [K] fp32 or None. Returns (xq int8 [M, K], scale fp32 [M, 1], residual_out fp32 [M, K]),
    residual_out being `residual` itself when given, else a new tensor holding x.float()."""
    _check_rms_norm_quant_args(x, weight, residual, smooth)
    M, K = x.shape
    has_residual = residual is not None
    res = residual if has_residual else torch.empty((M, K), dtype=torch.float32, device=x.device)
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        w = weight.contiguous()
        s = smooth.contiguous() if smooth is not None else w  # never read without HAS_SMOOTH
        block_k, single = _block_k(K)
        _rms_norm_quant_kernel[(M,)](
            x,
            res,
            w,
            s,
            xq,
            scale,
            K,
            float(eps),
            x.stride(0),
            x.stride(1),
            res.stride(0),
            res.stride(1),
            xq.stride(0),
            HAS_RESIDUAL=has_residual,
            HAS_SMOOTH=smooth is not None,
            BLOCK_K=block_k,
            SINGLE_TILE=single,
            num_warps=_num_warps(block_k),
        )
    return xq, scale, res


def rms_norm_quant_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec of `rms_norm_quant_triton`, in plain torch (same in-place residual contract)."""
    residual = x.float() if residual is None else residual.add_(x)  # [M, K] fp32
    rstd = torch.rsqrt(residual.pow(2).mean(dim=-1, keepdim=True) + eps)  # [M, 1]
    normed = residual * rstd * weight
    if smooth is not None:
        normed = normed / smooth
    xq, scale = quantize_per_token_ref(normed)
    return xq, scale, residual
