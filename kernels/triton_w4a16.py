"""Fused W4A16 GEMM in Triton: y[..., N] = x[..., K] @ dequant(W)[N, K].T, int4 dequantized in registers.

Input: the canonical layout of kernels/w4a16_matmul.py (qweight uint8 [N, K/2] low nibble first along
K, scales / mins fp32 [N, K/G], w = q * scale + min), optionally with act-order `perm` [K]: stored
column k multiplies x[..., perm[k]] (runtime/quant/w4a16.py). `pack_w4a16_triton` turns it, once at
load, into the layout below.

Packed layout (what the kernels read):
  qweight int32 [K128 / 8, N]  K128 = K rounded up to a multiple of 128, padding nibbles are 0.
                               Input columns come in blocks of 128; word r (0..15) of block b holds
                               columns 128 b + 16 j + r in nibble j (bits 4j..4j+3), j = 0..7.
  scales  dtype [K/G, N]       dtype = the activation dtype the weight is packed for.
  mins    dtype [K/G, N]
  perm    int32 [K]            act-order only: stored column k reads x[..., perm[k]].
Why: N is the contiguous dim, so every weight, scale and min load coalesces along N. Nibble plane j
of a 16-word tile covers 16 *consecutive* input columns, so the matching x slice is one contiguous
[BLOCK_M, 16] load, the plane is directly a K=16 `tl.dot` operand (8 dots per 128 columns), and
with G % 16 == 0 a plane lies in one group: its scale and min are one [BLOCK_N] row. Other even G
take a per-element group gather (correct, slower). Scales in the activation dtype halve their bytes
(at G = 32 fp32 scale + min cost half as much memory traffic as the weights themselves); it is the
rounding GPTQ/AWQ checkpoints and torch's tinygemm already apply.

Kernels (all dequantize as w = q * scale + min in fp32 registers):
  - `_w4a16_matmul_kernel` with BLOCK_M == 1: GEMV for M == 1, pure FMA (no tensor cores), fp32
    accumulation in a [16, BLOCK_N] tile reduced once at the end; split-K across programs.
  - `_w4a16_matmul_kernel` with BLOCK_M >= 16: the weight plane is cast to the activation dtype and
    fed to `tl.dot` (tensor cores in fp16/bf16; fp32 runs "ieee", the exact reference mode) with an
    fp32 accumulator. M <= 16 uses BLOCK_M = 16 plus split-K ("gemv" launcher); larger M uses
    bigger tiles ("gemm" launcher). Split-K partials are fp32 [SPLIT, M, N] summed by torch
    (deterministic, no atomics).
  - `_w4a16_dequantize_kernel`: packed -> dense weights in the activation dtype, written into a
    [K, N] buffer (coalesced stores) returned as its [N, K] transpose view; for M above
    DENSE_M_THRESHOLD the dispatcher dequantizes (in original column order, so x needs no gather)
    and calls torch.matmul (cuBLAS), so a large batch is never slower than fp16 plus one dequant.

Reference: `w4a16_matmul_ref` / `dequantize_w4a16_ref` (fp32) on the canonical tensors, with x[..., perm]
for act-order. Tolerance story: fp32 packing matches the reference up to summation order (1e-5
relative); 16-bit packing rounds scales and mins to the activation dtype (relative 2^-11 fp16,
2^-8 bf16), the dot path also rounds each dequantized weight to that dtype, and the output is
rounded to it; the tests state their bounds per dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_support import split_k_plan
from .w4a16_matmul import unpack_int4

PACK_BLOCK = 128  # input columns per interleave block (16 int32 words x 8 nibbles); the kernels' BLOCK_K
WORDS_PER_BLOCK = PACK_BLOCK // 8
GEMV_MAX_M = 16
# Above this many rows the dispatcher dequantizes to a dense temporary and calls torch.matmul. A guess
# (no GPU to measure on yet): the fused tiles re-dequantize every weight once per BLOCK_M rows, the
# dense path pays one N x K dequantize per call; tune on GPU with benchmarks/kernels.py.
DENSE_M_THRESHOLD = 256
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- Triton kernels ------------------------------------------------------------------------------------


@triton.jit
def _nibble_plane(words, j: tl.constexpr):
    """int32 [R, BN] words -> fp32 [R, BN] values of nibble j."""
    # OR-ing the nibble into the mantissa of 2^23 (0x4B000000) gives exactly 2^23 + q: integer logic
    # instead of an int->float conversion, which runs at a fraction of FMA throughput on NVIDIA GPUs.
    bits = ((words >> (4 * j)) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _plane_scale_min(s_ptr, mn_ptr, col0, cols, rn, n_mask, K, N, GROUP_SIZE: tl.constexpr):
    """Scale and min (fp32) for the plane of stored columns cols = col0 + [0, 16): [1, BN] or [16, BN]."""
    if GROUP_SIZE % 16 == 0:
        # col0 is a multiple of 16, so the plane's 16 columns share one group: one row each. A plane
        # past K (padding) reads the last group instead of masking; its x columns are masked to 0.
        g = tl.minimum(col0, K - 1) // GROUP_SIZE
        s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        return s[None, :], mn[None, :]
    else:
        offs = (cols // GROUP_SIZE)[:, None] * N + rn[None, :]  # [16, BN]
        mask = (cols < K)[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return s, mn


@triton.jit
def _w4a16_matmul_kernel(
    x_ptr,  # [M, K] activations, any strides
    qw_ptr,  # int32 [K128 / 8, N] contiguous
    s_ptr,  # [K / G, N] contiguous
    mn_ptr,  # [K / G, N] contiguous
    perm_ptr,  # int32 [K] (unused without HAS_PERM)
    out_ptr,  # [SPLIT, M, N]: fp32 partials, or the output itself when SPLIT == 1
    M,
    N,
    K,
    blocks_per_split,
    stride_xm,
    stride_xk,
    stride_os,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1: FMA GEMV, one x row per program; >= 16: tl.dot tiles
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest-varying: neighbouring programs share a weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rr = tl.arange(0, 16)  # [16] word row inside a block == column offset inside a plane
    n_mask = rn < N
    block_start = pid_k * blocks_per_split
    block_end = tl.minimum(block_start + blocks_per_split, tl.cdiv(K, 128))
    if BLOCK_M == 1:
        rm = pid_m + tl.arange(0, 1)  # [1]
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)  # reduced over rows once, after the loop
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_mask = rm < M

    for blk in range(block_start, block_end):
        wrow = blk * 16 + rr  # [16]; padding words exist up to K128, so only N needs a mask
        words = tl.load(qw_ptr + wrow[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0)  # [16, BN]
        for j in tl.static_range(8):
            col0 = blk * 128 + j * 16
            cols = col0 + rr  # [16] stored column of each plane row
            k_mask = cols < K
            xcols = tl.load(perm_ptr + cols, mask=k_mask, other=0) if HAS_PERM else cols  # x's columns
            s, mn = _plane_scale_min(s_ptr, mn_ptr, col0, cols, rn, n_mask, K, N, GROUP_SIZE)
            w = _nibble_plane(words, j) * s + mn  # [16, BN] fp32
            if BLOCK_M == 1:
                xj = tl.load(x_ptr + pid_m * stride_xm + xcols * stride_xk, mask=k_mask, other=0.0)  # [16]
                acc += xj.to(tl.float32)[:, None] * w
            else:
                x_offs = rm[:, None] * stride_xm + xcols[None, :] * stride_xk  # [BM, 16]
                xj = tl.load(x_ptr + x_offs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                # "ieee" only matters for fp32 (exact reference mode); 16-bit dots use tensor cores.
                acc = tl.dot(xj, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")

    result = tl.sum(acc, axis=0)[None, :] if BLOCK_M == 1 else acc  # [BM, BN]
    out_offs = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptr + out_offs, result.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4a16_dequantize_kernel(
    qw_ptr,  # int32 [K128 / 8, N] contiguous
    s_ptr,  # [K / G, N] contiguous
    mn_ptr,  # [K / G, N] contiguous
    perm_ptr,  # int32 [K] (unused without UNPERMUTE)
    out_ptr,  # logical [N, K]
    N,
    K,
    stride_on,
    stride_ok,
    GROUP_SIZE: tl.constexpr,
    UNPERMUTE: tl.constexpr,  # write stored column k at column perm[k] (original input order)
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rr = tl.arange(0, 16)
    n_mask = rn < N
    words = tl.load(qw_ptr + (blk * 16 + rr)[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0)
    for j in tl.static_range(8):
        col0 = blk * 128 + j * 16
        cols = col0 + rr  # [16]
        k_mask = cols < K
        dest = tl.load(perm_ptr + cols, mask=k_mask, other=0) if UNPERMUTE else cols  # output columns
        s, mn = _plane_scale_min(s_ptr, mn_ptr, col0, cols, rn, n_mask, K, N, GROUP_SIZE)
        w = _nibble_plane(words, j) * s + mn  # [16, BN]
        # int64: N * K of a vocabulary projection can pass 2^31.
        offs = dest.to(tl.int64)[:, None] * stride_ok + rn.to(tl.int64)[None, :] * stride_on
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


# --- packing (once, at load) ------------------------------------------------------------------------


def pack_w4a16_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    perm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Canonical W4A16 tensors -> the packed layout of this file's header, on qweight's device."""
    _check_group_size(group_size)
    if dtype not in ACT_DTYPES:
        raise ValueError(f"w4a16 triton: dtype must be one of {ACT_DTYPES}, got {dtype}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(
            f"w4a16 triton: qweight must be uint8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k == 0:
        raise ValueError("w4a16 triton: qweight has no input features (shape [N, 0])")
    if k % group_size:
        raise ValueError(f"w4a16 triton: in_features {k} is not a multiple of group_size {group_size}")
    for name, t in (("scales", scales), ("mins", mins)):
        if t.shape != (n, k // group_size) or not t.is_floating_point():
            raise ValueError(
                f"w4a16 triton: {name} must be float [N, K/G] = [{n}, {k // group_size}], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != qweight.device:
            raise ValueError(f"w4a16 triton: {name} is on {t.device}, qweight on {qweight.device}")
    if sys.byteorder != "little":
        raise ValueError("w4a16 triton: packing reinterprets bytes as int32 and needs a little-endian host")

    # Reorder columns so that word r of block b lists columns 128 b + 16 j + r for j = 0..7; then the
    # canonical byte packing (low nibble first) read as little-endian int32 puts column j in nibble j.
    q = unpack_int4(qweight.contiguous())  # uint8 [N, K]
    k128 = triton.cdiv(k, PACK_BLOCK) * PACK_BLOCK
    q = F.pad(q, (0, k128 - k))  # [N, K128]
    q = q.reshape(n, k128 // PACK_BLOCK, 8, WORDS_PER_BLOCK).transpose(2, 3).reshape(n, k128)
    low, high = q[:, 0::2], q[:, 1::2]
    words = (low | (high << 4)).contiguous().view(torch.int32)  # [N, K128 / 8]
    packed = {
        "qweight": words.T.contiguous(),  # [K128 / 8, N]
        "scales": scales.T.to(dtype).contiguous(),  # [K / G, N]
        "mins": mins.T.to(dtype).contiguous(),  # [K / G, N]
    }
    if perm is not None:
        packed["perm"] = _check_perm(perm, k, qweight.device).to(torch.int32).contiguous()
    return packed


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"w4a16 triton: group_size must be an even int >= 2, got {group_size!r}")


def _check_perm(perm: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    if perm.dim() != 1 or perm.shape[0] != k:
        raise ValueError(f"w4a16 triton: perm must have shape [K] = [{k}], got {tuple(perm.shape)}")
    if perm.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"w4a16 triton: perm must be int32 or int64, got {perm.dtype}")
    if perm.device != device:
        raise ValueError(f"w4a16 triton: perm is on {perm.device}, the weights on {device}")
    if not torch.equal(perm.sort().values.long(), torch.arange(k, device=device)):
        raise ValueError(f"w4a16 triton: perm is not a permutation of 0..{k - 1}")
    return perm


# --- launchers -----------------------------------------------------------------------------------------


def _packed_shape(packed: Mapping[str, torch.Tensor], group_size: int) -> tuple[int, int]:
    """Validate the packed tensors; return (N, K)."""
    _check_group_size(group_size)
    for name in ("qweight", "scales", "mins"):
        if name not in packed:
            raise ValueError(f"w4a16 triton: packed weight lacks {name!r} (use pack_w4a16_triton)")
    qweight, scales, mins = packed["qweight"], packed["scales"], packed["mins"]
    if scales.dim() != 2 or scales.dtype not in ACT_DTYPES:
        raise ValueError(
            f"w4a16 triton: scales must be [K/G, N] in one of {ACT_DTYPES}, got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    n_groups, n = scales.shape
    if n_groups == 0:
        raise ValueError("w4a16 triton: the packed weight has no input features (scales [0, N])")
    k = n_groups * group_size
    words = triton.cdiv(k, PACK_BLOCK) * WORDS_PER_BLOCK
    if mins.shape != scales.shape or mins.dtype != scales.dtype:
        raise ValueError(
            f"w4a16 triton: mins {mins.dtype} {tuple(mins.shape)} must match scales "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if qweight.dtype != torch.int32 or qweight.shape != (words, n):
        raise ValueError(
            f"w4a16 triton: qweight must be int32 [{words}, {n}] for K = {n_groups} groups x group_size "
            f"{group_size} = {k}, got {qweight.dtype} {tuple(qweight.shape)} (wrong group_size?)"
        )
    for name in ("qweight", "scales", "mins", "perm"):
        t = packed.get(name)
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"w4a16 triton: packed {name} must be contiguous (use pack_w4a16_triton)")
        if t.device != qweight.device:
            raise ValueError(f"w4a16 triton: packed {name} is on {t.device}, qweight on {qweight.device}")
    perm = packed.get("perm")
    if perm is not None and (perm.dtype != torch.int32 or perm.shape != (k,)):
        raise ValueError(f"w4a16 triton: perm must be int32 [{k}], got {perm.dtype} {tuple(perm.shape)}")
    return n, k


def _check_x(x: torch.Tensor, packed: Mapping[str, torch.Tensor], k: int, group_size: int) -> int:
    """Validate x against the packed weight; return M (rows of x)."""
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"w4a16 triton: x dtype must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.dtype != packed["scales"].dtype:
        raise ValueError(
            f"w4a16 triton: x is {x.dtype} but the weight was packed for {packed['scales'].dtype}"
        )
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"w4a16 triton: x last dim must be in_features K = {k} ({packed['scales'].shape[0]} groups x "
            f"group_size {group_size}), got x of shape {tuple(x.shape)}"
        )
    if x.device != packed["qweight"].device:
        raise ValueError(f"w4a16 triton: x is on {x.device}, the weight on {packed['qweight'].device}")
    return x.numel() // k


def _check_block(name: str, value: int) -> None:
    if value < 16 or value != triton.next_power_of_2(value):
        raise ValueError(f"w4a16 triton: {name} must be a power of two >= 16, got {value}")


def _launch(
    x: torch.Tensor,
    packed: Mapping[str, torch.Tensor],
    group_size: int,
    n: int,
    k: int,
    block_m: int,  # 1: FMA GEMV over one row per program; else a tl.dot tile height
    block_n: int,
    split_k: int | None,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K], a view whenever possible (its strides go to the kernel)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    k_blocks = triton.cdiv(k, PACK_BLOCK)
    grid_m = m if block_m == 1 else triton.cdiv(m, block_m)
    grid_n = triton.cdiv(n, block_n)
    splits, per_split = split_k_plan(grid_m * grid_n, k_blocks, x.device, split_k)
    # One split writes the output directly; several write fp32 partials that torch sums in order.
    out_dtype = x.dtype if splits == 1 else torch.float32
    out = torch.empty(splits, m, n, dtype=out_dtype, device=x.device)  # [SPLIT, M, N]
    perm = packed.get("perm")
    _w4a16_matmul_kernel[(grid_m, grid_n, splits)](
        x2,
        packed["qweight"],
        packed["scales"],
        packed["mins"],
        perm if perm is not None else packed["qweight"],  # a dummy pointer without act-order
        out,
        m,
        n,
        k,
        per_split,
        x2.stride(0),
        x2.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        GROUP_SIZE=group_size,
        HAS_PERM=perm is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    y = out[0] if splits == 1 else out.sum(0).to(x.dtype)  # [M, N]
    return y.reshape(*lead, n)


def _gemv(x, packed, group_size, n, k, m, split_k):
    if m == 1:
        return _launch(x, packed, group_size, n, k, 1, 128, split_k, num_warps=4, num_stages=4)
    return _launch(x, packed, group_size, n, k, 16, 64, split_k, num_warps=4, num_stages=4)


def _gemm(x, packed, group_size, n, k, m, block_m, block_n, split_k):
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_n is None:
        block_n = 128 if block_m >= 64 else 64
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    return _launch(x, packed, group_size, n, k, block_m, block_n, split_k, num_warps, num_stages=3)


def w4a16_gemv_triton(
    x: torch.Tensor, packed: Mapping[str, torch.Tensor], group_size: int, *, split_k: int | None = None
) -> torch.Tensor:
    """Small-batch path, M <= 16 rows: FMA GEMV for M == 1, 16-row tl.dot tiles otherwise, split-K over
    the input dim to fill the GPU (split_k: None picks, else at most that many splits).
    x [..., K] -> [..., N] in x's dtype."""
    n, k = _packed_shape(packed, group_size)
    m = _check_x(x, packed, k, group_size)
    if m > GEMV_MAX_M:
        raise ValueError(f"w4a16 triton: the gemv path takes at most {GEMV_MAX_M} rows, got {m}")
    return _gemv(x, packed, group_size, n, k, m, split_k)


def w4a16_gemm_triton(
    x: torch.Tensor,
    packed: Mapping[str, torch.Tensor],
    group_size: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Tiled path: tl.dot tiles [block_m, 128] x [128, block_n] (powers of two >= 16; None picks).
    x [..., K] -> [..., N] in x's dtype."""
    n, k = _packed_shape(packed, group_size)
    m = _check_x(x, packed, k, group_size)
    return _gemm(x, packed, group_size, n, k, m, block_m, block_n, split_k)


def dequantize_w4a16_triton(
    packed: Mapping[str, torch.Tensor], group_size: int, *, unpermute: bool = False
) -> torch.Tensor:
    """Dense weights [N, K] in the packed activation dtype, stored column order (the reference's);
    with unpermute=True and act-order, original input order (column perm[k] holds stored column k),
    so that x @ w.T needs no gather. The result is the transpose view of a contiguous [K, N] buffer."""
    n, k = _packed_shape(packed, group_size)
    perm = packed.get("perm")
    scales = packed["scales"]
    out_t = torch.empty(k, n, dtype=scales.dtype, device=scales.device)  # [K, N]
    if n and k:
        block_n = 64
        _w4a16_dequantize_kernel[(triton.cdiv(k, PACK_BLOCK), triton.cdiv(n, block_n))](
            packed["qweight"],
            scales,
            packed["mins"],
            perm if perm is not None else packed["qweight"],
            out_t,
            n,
            k,
            out_t.stride(1),
            out_t.stride(0),
            GROUP_SIZE=group_size,
            UNPERMUTE=unpermute and perm is not None,
            BLOCK_N=block_n,
            num_warps=4,
        )
    return out_t.T  # [N, K]


def w4a16_matmul_triton(x: torch.Tensor, packed: Mapping[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32, the dtype the weight was packed for) -> [..., N] in x's dtype.
    M <= 16: gemv/split-K; M <= DENSE_M_THRESHOLD: fused tiles; above: dequantize + torch.matmul."""
    n, k = _packed_shape(packed, group_size)
    m = _check_x(x, packed, k, group_size)
    if m <= GEMV_MAX_M:
        return _gemv(x, packed, group_size, n, k, m, None)
    if m <= DENSE_M_THRESHOLD:
        return _gemm(x, packed, group_size, n, k, m, None, None, None)
    w = dequantize_w4a16_triton(packed, group_size, unpermute=True)  # [N, K], original column order
    return torch.matmul(x, w.T)  # w.T is the contiguous [K, N] buffer
