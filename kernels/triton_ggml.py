"""Fused Triton GEMM on GGUF (ggml) blocks: y[..., N] = x[..., K] @ dequant(W)[N, K].T, each block
decoded in registers from the file's own bytes.

Weight: the canonical layout of kernels/ggml_blocks_ref.py, uint8 [N, row_bytes], row n a run of
K / QK blocks of BYTES bytes (the byte layout of every type is in kernels/cpu/ggml_blocks.cpp). No
repack: the resident weight is the file's tensor bytes, a row gather (embedding table, q/k
permutation) stays a row copy, and one kernel source serves all twelve types.

How a block is decoded: `_block_weights` turns one block of BLOCK_N rows into fp32 weights
[NSUB, SUB, BLOCK_N] (K-major: sub-block, element in sub-block, output row), each element from the
byte offsets and shifts of its position, each sub-block's scale and min once per sub-block, then
reshaped to [QK, BLOCK_N] in input order. So the matching activations are one contiguous [QK]
(or [BLOCK_M, QK]) load and the tile is directly a `tl.dot` operand. IQ4 code values come from a
16-entry table in global memory (Triton has no register gather). The arithmetic is gguf-py's: per
sub-block s = d * sc and m = dmin * mn in fp32, then w = s * q - m (Q4_1 / Q5_1: d * q + m).

Kernels:
  - `_ggml_matmul_kernel` with BLOCK_M == 1: GEMV for M == 1, FMA, fp32 accumulation; split-K over
    blocks across programs (fp32 partials summed by torch: deterministic, no atomics).
  - `_ggml_matmul_kernel` with BLOCK_M >= 16: the tile is cast to the activation dtype and fed to
    `tl.dot` (tensor cores in fp16/bf16; fp32 runs "ieee", the exact reference mode), fp32 acc.
  - `_ggml_dequantize_kernel`: blocks -> dense weights [K, N] (coalesced along N), returned as the
    [N, K] transpose view; above DENSE_M_THRESHOLD rows the dispatcher dequantizes once and calls
    torch.matmul (cuBLAS), so a long prompt is never slower than a dense weight plus one decode.

Why this and not a repacked layout: rows of blocks are what llama.cpp's own CUDA kernels read
(mmvq), and one block per row per step keeps every type in one small decoder. The byte loads are
scattered within a block (each byte read by the 2-8 elements it feeds, from L1), so this is the
simple correct kernel, not a tuned one: it has not been measured on a GPU (none was lent).

Reference: `dequantize_ref` / `ggml_matmul_ref` (gguf-py's dequantizer, fp64 matmul). Under the
interpreter, and on a GPU where it is compiled without FP fusion, the dequantize kernel equals gguf-py
bit for bit in fp32 (same roundings); the matmul kernel lets the compiler contract s * q - m into one
FMA (a last-bit difference per weight, far inside the matmul's summation error).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES

from . import ggml_blocks_ref
from .triton_support import split_k_plan

# The types this kernel decodes (all of them); the code of each is its gguf.GGMLQuantizationType value.
TYPES = ggml_blocks_ref.TYPES
# Elements per sub-block sharing one scale (and min): the decoder's inner tile dimension.
SUB = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16}
GEMV_MAX_M = 16
# Above this many rows: dequantize once + torch.matmul (as kernels/triton_w4a16.py; a guess, no GPU
# to measure on yet).
DENSE_M_THRESHOLD = 256
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4 codebook


# --- decoding one block (per type) ------------------------------------------------------------------


@triton.jit
def _u8(p):
    return tl.load(p).to(tl.int32)


@triton.jit
def _f16(p):
    """fp32 value of the little-endian fp16 at byte pointer p (any alignment)."""
    bits = (tl.load(p + 1).to(tl.uint16) << 8) | tl.load(p).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble32(qs, e):
    """Element e (0..31) of a 32-block whose 16 bytes qs hold e < 16 low, e >= 16 high."""
    return (_u8(qs + (e % 16)) >> (4 * (e // 16))) & 15


@triton.jit
def _bit(p, e):
    """Bit e of the little-endian bit field at byte pointer p."""
    return (_u8(p + e // 8) >> (e % 8)) & 1


@triton.jit
def _kscale_min(sc, j):
    """K-quants' 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (get_scale_min)."""
    low = j < 4
    b_j = _u8(sc + j)
    b_j4 = _u8(sc + j + 4)
    b_jm4 = _u8(sc + tl.maximum(j - 4, 0))
    scale = tl.where(low, b_j & 63, (b_j4 & 15) | ((b_jm4 >> 6) << 4))
    mn = tl.where(low, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4))
    return scale.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _block_weights(p, j, i, kv_ptr, QTYPE: tl.constexpr, SUBLEN: tl.constexpr):
    """fp32 weights [NSUB, SUBLEN, BN] of one block per row: p [1, 1, BN] byte pointers to the
    blocks, j [NSUB, 1, 1] sub-block index, i [1, SUBLEN, 1] element in the sub-block."""
    e = j * SUBLEN + i  # [NSUB, SUBLEN, 1] element in the block
    if QTYPE == 2:  # Q4_0, 18 B: f16 d | qs[16]
        return _f16(p) * (_nibble32(p + 2, e) - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1, 20 B: f16 d, f16 m | qs[16]
        return _f16(p) * _nibble32(p + 4, e).to(tl.float32) + _f16(p + 2)
    elif QTYPE == 6:  # Q5_0, 22 B: f16 d | u32 qh | qs[16]
        q = (_nibble32(p + 6, e) | (_bit(p + 2, e) << 4)) - 16
        return _f16(p) * q.to(tl.float32)
    elif QTYPE == 7:  # Q5_1, 24 B: f16 d, f16 m | u32 qh | qs[16]
        q = _nibble32(p + 8, e) | (_bit(p + 4, e) << 4)
        return _f16(p) * q.to(tl.float32) + _f16(p + 2)
    elif QTYPE == 8:  # Q8_0, 34 B: f16 d | i8 qs[32]
        return _f16(p) * tl.load(p + 2 + e).to(tl.int8, bitcast=True).to(tl.float32)
    elif QTYPE == 20:  # IQ4_NL, 18 B: f16 d | qs[16] indices into KVALUES
        return _f16(p) * tl.load(kv_ptr + _nibble32(p + 2, e)).to(tl.float32)
    elif QTYPE == 10:  # Q2_K, 84 B: sc[16] | qs[64] | f16 d, f16 dmin; sub-blocks of 16
        h, t, r = e // 128, (e // 32) % 4, e % 32
        q = (_u8(p + 16 + 32 * h + r) >> (2 * t)) & 3
        sc = _u8(p + j)  # [NSUB, 1, BN]
        s = _f16(p + 80) * (sc & 15).to(tl.float32)
        m = _f16(p + 82) * (sc >> 4).to(tl.float32)
        return s * q.to(tl.float32) - m
    elif QTYPE == 11:  # Q3_K, 110 B: hmask[32] | qs[64] | sc[12] | f16 d; sub-blocks of 16
        h, t, r = e // 128, (e // 32) % 4, e % 32
        low = (_u8(p + 32 + 32 * h + r) >> (2 * t)) & 3
        q = low - 4 * (1 - ((_u8(p + r) >> (4 * h + t)) & 1))
        lo = (_u8(p + 96 + j % 8) >> (4 * (j // 8))) & 15
        hi = (_u8(p + 104 + j % 4) >> (2 * (j // 4))) & 3
        s = _f16(p + 108) * ((lo | (hi << 4)) - 32).to(tl.float32)
        return s * q.to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K 144 B / Q5_K 176 B: f16 d, f16 dmin | sc[12] | (qh[32]) | qs[128]
        c, t, r = e // 64, (e // 32) % 2, e % 32
        if QTYPE == 12:
            q = (_u8(p + 16 + 32 * c + r) >> (4 * t)) & 15
        else:
            q = ((_u8(p + 48 + 32 * c + r) >> (4 * t)) & 15) | (((_u8(p + 16 + r) >> (2 * c + t)) & 1) << 4)
        sc, mn = _kscale_min(p + 4, j)
        s = _f16(p) * sc
        m = _f16(p + 2) * mn
        return s * q.to(tl.float32) - m
    elif QTYPE == 14:  # Q6_K, 210 B: ql[128] | qh[64] | i8 sc[16] | f16 d; sub-blocks of 16
        h, r = e // 128, e % 128
        lo = (_u8(p + 64 * h + r % 64) >> (4 * (r // 64))) & 15
        hi = (_u8(p + 128 + 32 * h + r % 32) >> (2 * (r // 32))) & 3
        sc = tl.load(p + 192 + j).to(tl.int8, bitcast=True).to(tl.float32)
        return (_f16(p + 208) * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)
    else:  # IQ4_XS (23), 136 B: f16 d | u16 sh | sl[4] | qs[128]
        t, r = (e // 16) % 2, e % 16
        q = tl.load(kv_ptr + ((_u8(p + 8 + 16 * j + r) >> (4 * t)) & 15)).to(tl.float32)
        lo = (_u8(p + 4 + j // 2) >> (4 * (j % 2))) & 15
        hi = (_u8(p + 2 + j // 4) >> (2 * (j % 4))) & 3
        return (_f16(p) * ((lo | (hi << 4)) - 32).to(tl.float32)) * q


@triton.jit
def _tile(
    w_ptr,
    kv_ptr,
    row_off,
    blk,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    SUBLEN: tl.constexpr,
    BYTES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """fp32 [QK, BLOCK_N]: block `blk` of the rows at byte offsets row_off [BLOCK_N], input order."""
    p = (w_ptr + row_off + blk * BYTES)[None, None, :]  # [1, 1, BN]
    j = tl.arange(0, QK // SUBLEN)[:, None, None]
    i = tl.arange(0, SUBLEN)[None, :, None]
    w = _block_weights(p, j, i, kv_ptr, QTYPE, SUBLEN)  # [NSUB, SUBLEN, BN]
    return tl.reshape(w, (QK, BLOCK_N))


# --- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _ggml_matmul_kernel(
    x_ptr,  # [M, K] activations, any strides
    w_ptr,  # uint8 [N, row_bytes] contiguous
    kv_ptr,  # int8 [16] IQ4 codebook
    out_ptr,  # [SPLIT, M, N]: fp32 partials, or the output itself when SPLIT == 1
    M,
    N,
    row_bytes,
    blocks_per_split,
    n_blocks,
    stride_xm,
    stride_xk,
    stride_os,
    stride_om,
    stride_on,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    SUBLEN: tl.constexpr,
    BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1: FMA GEMV, one x row per program; >= 16: tl.dot tiles
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest-varying: neighbouring programs share a weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = rn < N
    # Rows past N decode the last row instead of masking every byte load; their outputs are dropped.
    row_off = tl.minimum(rn, N - 1).to(tl.int64) * row_bytes  # [BN]; int64: a vocabulary table passes 2^31
    kk = tl.arange(0, QK)
    block_start = pid_k * blocks_per_split
    block_end = tl.minimum(block_start + blocks_per_split, n_blocks)
    if BLOCK_M == 1:
        rm = pid_m + tl.arange(0, 1)  # [1]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_mask = rm < M

    for blk in range(block_start, block_end):
        w = _tile(w_ptr, kv_ptr, row_off, blk, QTYPE, QK, SUBLEN, BYTES, BLOCK_N)  # [QK, BN] fp32
        cols = blk * QK + kk  # [QK]; K is a whole number of blocks, so no K mask
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + pid_m * stride_xm + cols * stride_xk).to(tl.float32)  # [QK]
            acc += tl.sum(xk[:, None] * w, axis=0)
        else:
            x_offs = rm[:, None] * stride_xm + cols[None, :] * stride_xk  # [BM, QK]
            xt = tl.load(x_ptr + x_offs, mask=m_mask[:, None], other=0.0)
            # "ieee" only matters for fp32 (exact reference mode); 16-bit dots use tensor cores.
            acc = tl.dot(xt, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")

    result = acc[None, :] if BLOCK_M == 1 else acc  # [BM, BN]
    out_offs = pid_k * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptr + out_offs, result.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ggml_dequantize_kernel(
    w_ptr,  # uint8 [N, row_bytes] contiguous
    kv_ptr,  # int8 [16]
    out_ptr,  # [K, N] contiguous
    N,
    row_bytes,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    SUBLEN: tl.constexpr,
    BYTES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = rn < N
    row_off = tl.minimum(rn, N - 1).to(tl.int64) * row_bytes
    w = _tile(w_ptr, kv_ptr, row_off, blk, QTYPE, QK, SUBLEN, BYTES, BLOCK_N)  # [QK, BN]
    cols = (blk * QK + tl.arange(0, QK)).to(tl.int64)
    offs = cols[:, None] * N + rn[None, :]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])


# --- launchers --------------------------------------------------------------------------------------


@functools.cache
def _kvalues(device: torch.device) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.int8, device=device)


def _layout(qtype: str) -> tuple[int, int, int, int]:
    """(type code, QK, sub-block length, bytes per block) of a supported type."""
    if qtype not in TYPES:
        raise ValueError(f"ggml triton: type {qtype!r} is not supported (supported: {', '.join(TYPES)})")
    code = ggml_blocks_ref.qtype(qtype)
    qk, nbytes = GGML_QUANT_SIZES[code]
    return code.value, qk, SUB.get(qtype, 32), nbytes


def _check_blocks(blocks: torch.Tensor, qtype: str) -> tuple[int, int]:
    """Validate the weight; return (N, K)."""
    _, qk, _, nbytes = _layout(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(
            f"ggml triton: blocks must be uint8 [N, row_bytes], got {blocks.dtype} {tuple(blocks.shape)}"
        )
    if blocks.shape[1] == 0 or blocks.shape[1] % nbytes:
        raise ValueError(
            f"ggml triton: a {qtype} row must be a positive whole number of {nbytes}-byte blocks, "
            f"got {blocks.shape[1]} bytes"
        )
    if not blocks.is_contiguous():
        raise ValueError("ggml triton: blocks must be contiguous")
    return blocks.shape[0], blocks.shape[1] // nbytes * qk


def _check_x(x: torch.Tensor, blocks: torch.Tensor, k: int, qtype: str) -> None:
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"ggml triton: x dtype must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"ggml triton: x last dim must be in_features K = {k} ({qtype} rows), got {tuple(x.shape)}"
        )
    if x.device != blocks.device:
        raise ValueError(f"ggml triton: x is on {x.device}, the weight on {blocks.device}")


def _launch(x2, blocks, qtype, n, k, block_m, block_n, split_k, num_warps) -> torch.Tensor:
    """x2 [M, K] -> [M, N] in x2's dtype."""
    code, qk, sublen, nbytes = _layout(qtype)
    m = x2.shape[0]
    n_blocks = k // qk
    grid_m = m if block_m == 1 else triton.cdiv(m, block_m)
    grid_n = triton.cdiv(n, block_n)
    splits, per_split = split_k_plan(grid_m * grid_n, n_blocks, x2.device, split_k)
    # One split writes the output directly; several write fp32 partials that torch sums in order.
    out = torch.empty(splits, m, n, dtype=x2.dtype if splits == 1 else torch.float32, device=x2.device)
    _ggml_matmul_kernel[(grid_m, grid_n, splits)](
        x2,
        blocks,
        _kvalues(blocks.device),
        out,
        m,
        n,
        blocks.shape[1],
        per_split,
        n_blocks,
        x2.stride(0),
        x2.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        QTYPE=code,
        QK=qk,
        SUBLEN=sublen,
        BYTES=nbytes,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out[0] if splits == 1 else out.sum(0).to(x2.dtype)


def ggml_matmul_triton(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str,
    *,
    block_m: int | None = None,
    split_k: int | None = None,
    dense_threshold: int = DENSE_M_THRESHOLD,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ dequant(blocks).T -> [..., N] in x's dtype.

    M == 1: FMA GEMV; M <= dense_threshold: fused tl.dot tiles (block_m: a power of two >= 16, None
    picks); above: dequantize + torch.matmul. split_k: None picks (enough programs to fill the GPU),
    else at most that many splits of the blocks."""
    n, k = _check_blocks(blocks, qtype)
    _check_x(x, blocks, k, qtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K], a view whenever possible (its strides go to the kernel)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    if m > dense_threshold:
        y = torch.matmul(x2, dequantize_ggml_triton(blocks, qtype, x.dtype).T)  # .T: the [K, N] buffer
        return y.reshape(*lead, n)
    qk = _layout(qtype)[1]
    if m == 1 and block_m is None:
        # Tile [QK, BN] kept near 4-8k fp32 elements per program.
        y = _launch(x2, blocks, qtype, n, k, 1, 32 if qk == 256 else 128, split_k, num_warps=4)
    else:
        block_m = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
        if block_m < 16 or block_m != triton.next_power_of_2(block_m):
            raise ValueError(f"ggml triton: block_m must be a power of two >= 16, got {block_m}")
        y = _launch(x2, blocks, qtype, n, k, block_m, 32 if qk == 256 else 64, split_k, num_warps=4)
    return y.reshape(*lead, n)


def dequantize_ggml_triton(
    blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense weights [N, K] in `dtype`: the transpose view of a contiguous [K, N] buffer."""
    n, k = _check_blocks(blocks, qtype)
    code, qk, sublen, nbytes = _layout(qtype)
    out_t = torch.empty(k, n, dtype=dtype, device=blocks.device)  # [K, N]
    if n:
        block_n = 32 if qk == 256 else 64
        _ggml_dequantize_kernel[(k // qk, triton.cdiv(n, block_n))](
            blocks,
            _kvalues(blocks.device),
            out_t,
            n,
            blocks.shape[1],
            QTYPE=code,
            QK=qk,
            SUBLEN=sublen,
            BYTES=nbytes,
            BLOCK_N=block_n,
            num_warps=4,
            # s * q - m rounded twice, as gguf-py computes it (a contracted FMA would differ in the
            # last bit): this is the weights' reference meaning (embedding rows, the dense path).
            enable_fp_fusion=False,
        )
    return out_t.T  # [N, K]
