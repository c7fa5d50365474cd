"""W8A8 GEMM in Triton: int8 activations (per token) x int8 weights (per output channel), int32 accumulation
in tensor cores, both scales (and an optional bias) applied in an fp32 epilogue.

Canonical layout (kernels/w8a8_matmul.py): qweight int8 [N, K], scales fp32 [N, 1].
Packed layout (`pack_w8a8_triton`, once at load):
  qweight int8 [N, K] contiguous   K-major: Hopper's wgmma takes 8-bit operands only with K
                                   contiguous in both A and B, so this is the canonical layout kept as is
  scales  fp32 [N] contiguous
Activations: xq int8 [M, K] (any strides), x_scale fp32 [M, 1], from `quantize_per_token_triton`
(kernels/triton_act_quant.py), which matches `quantize_per_token_ref` bit for bit.
  y[m, n] = (sum_k xq[m, k] * qweight[n, k]) * x_scale[m] * scales[n] (+ bias[n]), fp32, cast to out_dtype

Reference: `w8a8_matmul_ref` (the integer product in float64). Tolerance story: the int32
accumulator is exact; converting it to fp32 (exact below 2^24, else 1 rounding), two fp32 scale
multiplies and the bias add cost a few fp32 ulp, so fp32 output agrees to ~1e-6 relative to the
largest output; fp16/bf16 output adds one final rounding to the output dtype, as the reference does.
bf16 is never fed to tl.dot here, so every dtype is testable under TRITON_INTERPRET=1.

Speed note: Triton software-pipelines the K loop (cp.async, num_stages buffers) only when it can
prove 16-byte alignment, i.e. K, the row strides and the base pointers are multiples of 16; every
real model shape is. Other shapes are computed correctly but without pipelining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_act_quant import quantize_per_token_triton

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class _GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # int8 mma takes K in steps of 32: keep it a multiple of 32
    group_m: int
    num_warps: int
    num_stages: int


# Chosen by M. Starting points from common int8 GEMM configs, NOT measured: to be tuned on GPU
# (H100/H200) against torch._int_mm / cuBLASLt at Llama-3-8B shapes. Decode (small M) is
# weight-bandwidth bound: a thin M tile and a long K step; prefill is compute bound: big tiles.
_SMALL_M = _GemmConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
_MEDIUM_M = _GemmConfig(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4)
_LARGE_M = _GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def _config_for(M: int) -> _GemmConfig:
    if M <= 16:
        return _SMALL_M
    if M <= 64:
        return _MEDIUM_M
    return _LARGE_M


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr,  # int8 [M, K]
    b_ptr,  # int8 [N, K], read as its transpose [K, N] through the strides
    a_scale_ptr,  # fp32 [M] (stride stride_asm)
    b_scale_ptr,  # fp32 [N]
    bias_ptr,  # [N] any float dtype, only read when HAS_BIAS
    c_ptr,  # out_dtype [M, N]
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_asm,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles walk the N tiles together, so B tiles are reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M * K or N * K may pass 2^31 for long prompts or vocabulary projections.
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)  # [BM, BK] int8
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BK, BN] int8
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    a_scale = tl.load(a_scale_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)  # [BM] fp32
    b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BN] fp32
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def pack_w8a8_triton(qweight: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical (qweight int8 [N, K], scales float [N, 1] or [N]) -> {"qweight": int8 [N, K]
    contiguous, "scales": fp32 [N] contiguous}. Done once at load."""
    fn = "pack_w8a8_triton"
    if qweight.dtype != torch.int8:
        raise ValueError(f"{fn}: qweight must be int8, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] == 0 or qweight.shape[1] == 0:
        raise ValueError(f"{fn}: qweight must be [N, K] with N, K > 0, got shape {tuple(qweight.shape)}")
    N = qweight.shape[0]
    if not scales.is_floating_point():
        raise ValueError(f"{fn}: scales must be a float tensor, got {scales.dtype}")
    if tuple(scales.shape) not in ((N, 1), (N,)):
        raise ValueError(f"{fn}: scales must have shape ({N}, 1) or ({N},), got {tuple(scales.shape)}")
    if scales.device != qweight.device:
        raise ValueError(f"{fn}: scales are on {scales.device} but qweight is on {qweight.device}")
    return {
        "qweight": qweight.contiguous(),
        "scales": scales.to(torch.float32).reshape(N).contiguous(),
    }


def _check_gemm_args(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    packed: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> None:
    fn = "w8a8_gemm_triton"
    if "qweight" not in packed or "scales" not in packed:
        raise ValueError(f"{fn}: packed must come from pack_w8a8_triton (keys {sorted(packed)})")
    qweight, w_scales = packed["qweight"], packed["scales"]
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(
            f"{fn}: packed qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    N, K = qweight.shape
    if w_scales.dtype != torch.float32 or tuple(w_scales.shape) != (N,):
        raise ValueError(
            f"{fn}: packed scales must be float32 [{N}], got {w_scales.dtype} {tuple(w_scales.shape)}"
        )
    if xq.dtype != torch.int8:
        raise ValueError(f"{fn}: xq must be int8, got {xq.dtype}")
    if xq.dim() != 2:
        raise ValueError(f"{fn}: xq must be [M, K], got shape {tuple(xq.shape)}")
    M = xq.shape[0]
    if xq.shape[1] != K:
        raise ValueError(f"{fn}: xq has K={xq.shape[1]} columns but the weight has K={K}")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (M, 1):
        raise ValueError(
            f"{fn}: x_scale must be float32 [{M}, 1], got {x_scale.dtype} {tuple(x_scale.shape)}"
        )
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
        raise ValueError(f"{fn}: bias must be a float tensor [{N}], got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"{fn}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    others = [("x_scale", x_scale), ("packed qweight", qweight), ("packed scales", w_scales)]
    if bias is not None:
        others.append(("bias", bias))
    for name, t in others:
        if t.device != xq.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but xq is on {xq.device}")


def w8a8_gemm_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    packed: dict[str, torch.Tensor],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """xq int8 [M, K], x_scale fp32 [M, 1], packed from `pack_w8a8_triton`, bias [N] or None
    -> y [M, N] out_dtype = xq @ qweight.T * x_scale * scales (+ bias)."""
    _check_gemm_args(xq, x_scale, packed, bias, out_dtype)
    qweight, w_scales = packed["qweight"], packed["scales"]
    M, K = xq.shape
    N = qweight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    cfg = _config_for(M)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _w8a8_gemm_kernel[grid](
        xq,
        qweight,
        x_scale,
        w_scales,
        bias if bias is not None else w_scales,  # a valid pointer; never read without HAS_BIAS
        out,
        M,
        N,
        K,
        xq.stride(0),
        xq.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        x_scale.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def w8a8_matmul_triton(
    x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] fp16/bf16/fp32 -> [..., N] in x's dtype: per-token quantization, then the int8 GEMM.
    Matches `w8a8_matmul_ref` (+ bias)."""
    if x.dtype not in _OUT_DTYPES:
        raise ValueError(f"w8a8_matmul_triton: x must be float16, bfloat16 or float32, got {x.dtype}")
    if "qweight" not in packed:
        raise ValueError(
            f"w8a8_matmul_triton: packed must come from pack_w8a8_triton (keys {sorted(packed)})"
        )
    K = packed["qweight"].shape[-1]
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"w8a8_matmul_triton: x has shape {tuple(x.shape)} but the weight has K={K}")
    lead = x.shape[:-1]
    xq, x_scale = quantize_per_token_triton(x.reshape(-1, x.shape[-1]))  # [M, K] int8, [M, 1] fp32
    y = w8a8_gemm_triton(xq, x_scale, packed, bias, out_dtype=x.dtype)  # [M, N]
    return y.reshape(*lead, y.shape[-1])
