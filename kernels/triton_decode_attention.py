"""Triton paged decode attention: one query token per sequence, split-K over the context.

Layouts (the same as kernels/paged_attention_ref.py, whose `paged_attention_ref` is the spec):
  q             [B, H, D]  fp16 / bf16 / fp32, any strides; out [B, H, D] in q's dtype
  k/v_cache     [num_blocks, block_size, Hkv, D]  fp16 / bf16 / fp32, or int8 with
  k/v_scale     [num_blocks, block_size, Hkv] fp32 (x = code * scale, per token and head)
  block_tables  [B, max_blocks] int32 (int64 accepted): row b lists sequence b's blocks in order
  context_lens  [B] int32 (int64 accepted) tensor: cached tokens of b, this step's included
GQA: query head h reads kv head h // (H // Hkv). D need not be a power of two (80, 96, ...): it is
padded to the next power of two with masked loads.

Work split. Grid (B, Hkv, num_splits). One program takes every query head of one kv-head group, so
each K/V tile is read from memory once per kv head, not once per query head. The group is padded to
16 rows and both products are `tl.dot`s (tensor cores, fp32 accumulation): decode is bound by the
K/V bytes, and a [16, D] x [D, 64] MMA costs next to nothing even when 15 of 16 rows are padding,
while an elementwise [G, N, D] product plus reduction needs G * N * D registers and CUDA-core FMAs
that grow with the group. Split s of sequence b covers an equal share of *that sequence's* tiles
(balanced for ragged batches) and runs an online softmax (fp32, exp2 domain). With one split the
program normalises and writes `out` itself; with several it writes (max, sum of exp, un-normalised
acc) to fp32 scratch and `_reduce_kernel` (grid (B, H)) combines them. Tiles are BLOCK_N tokens
gathered through the block table token by token, so any block_size and scattered blocks work;
positions at or past context_len are masked, and a context of 0 gives an output of 0 (as the
reference does), so padded batch rows of a CUDA graph stay finite. A sliding `window` (> 0) starts
the walk at the tile holding position context_len - window and masks the positions before it;
`softcap` (> 0, Gemma 2) maps each scaled score to softcap * tanh(score / softcap) before the
softmax (in the exp2 domain: the cap is scaled by log2(e) with the scores).

Dtypes. Both dots run in q's dtype: K/V tiles (fp caches of another dtype, or int8 codes, which are
exact in fp16/bf16) are converted to it after the load. int8 scales are applied outside the dots:
the K scale multiplies each token's score column, the V scale each probability column before the
PV dot, so nothing is dequantized into memory. fp32 q uses IEEE fp32 dots (no TF32) since fp32 is
the exact reference mode. Tolerance story: fp32 agrees with the reference to ~1e-6; fp16/bf16 round
q/K/V (already in that dtype), the probabilities (before the PV dot) and the output to the 16-bit
dtype, so errors are a few 16-bit ulps of max|out|. Under TRITON_INTERPRET=1 a `tl.dot` on bf16 is
wrong (a measured interpreter limitation), so bf16 is covered by GPU-only tests.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .kv_store_ref import check_kv_scales
from .triton_soft_cap import soft_cap
from .triton_support import check_window_and_cap, next_power_of_2

Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
INDEX_DTYPES = (torch.int32, torch.int64)
LOG2E = 1.4426950408889634
# `tl.dot` needs every dimension >= 16: the group of query heads is padded to this many rows.
MIN_DOT = 16
# Split heuristic (to be tuned on GPU): aim for this many programs per SM, but give each split
# at least MIN_TOKENS_PER_SPLIT tokens of the longest possible context, and at most MAX_SPLITS.
PROGRAMS_PER_SM = 2
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# SM count assumed where there is no CUDA device (the interpreter): keeps default splits small.
CPU_SM_COUNT = 4


@triton.jit
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd,
    k_cache_ptr, stride_kb, stride_ks, stride_kh, stride_kd,
    v_cache_ptr, stride_vb, stride_vs, stride_vh, stride_vd,
    k_scale_ptr, stride_ksb, stride_kss, stride_ksh,
    v_scale_ptr, stride_vsb, stride_vss, stride_vsh,
    block_tables_ptr, stride_btb, stride_btn,
    context_lens_ptr,
    out_ptr, stride_ob, stride_oh, stride_od,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    qk_scale, num_heads, head_dim, max_blocks, num_splits, window, cap,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr, QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WINDOWED: tl.constexpr, CAPPED: tl.constexpr,
):  # fmt: skip
    """Program (b, kv head, split): the group's heads over the split's share of b's tiles.
    DIRECT (one split): normalise into `out`. Else partials [B, H, num_splits] (m, l) and
    [B, H, num_splits, D] (acc), contiguous fp32. num_splits is a runtime argument so that
    batch-size buckets with different splits share one compiled kernel."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + b).to(tl.int32)
    # Only the tiles that hold at least one cached token: each has a finite max, so the online
    # softmax never computes exp(-inf - -inf). Tokens past the table's width are never read.
    context_len = tl.minimum(context_len, max_blocks * BLOCK_SIZE)
    first = 0  # the first position the query reads
    if WINDOWED:
        first = tl.maximum(context_len - window, 0)
    first_tile = first // BLOCK_N
    num_tiles = tl.cdiv(context_len, BLOCK_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    rows = tl.arange(0, BLOCK_G)  # [BLOCK_G] query heads of the group, padded
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    heads = kv_head * GROUP + rows  # [BLOCK_G]
    row_ok = rows < GROUP
    dim_ok = dims < head_dim
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # un-normalised output
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        pos_ok = (pos < context_len) & (pos >= first)
        block = tl.load(
            block_tables_ptr + b * stride_btb + (pos // BLOCK_SIZE) * stride_btn, mask=pos_ok, other=0
        ).to(tl.int64)  # [BLOCK_N]
        offset = pos % BLOCK_SIZE
        kv_mask = pos_ok[:, None] & dim_ok[None, :]  # [BLOCK_N, BLOCK_D]
        k_ptrs = k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks
        k_ptrs = k_ptrs + kv_head * stride_kh + dims[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=kv_mask, other=0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N] fp32
        if QUANTIZED:
            k_sc = tl.load(
                k_scale_ptr + block * stride_ksb + offset * stride_kss + kv_head * stride_ksh,
                mask=pos_ok,
                other=0.0,
            )  # [BLOCK_N]
            s = s * (k_sc * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if CAPPED:
            s = soft_cap(s, cap)
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_G], finite: the tile has a token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_G, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs
        v_ptrs = v_ptrs + kv_head * stride_vh + dims[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=kv_mask, other=0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        if QUANTIZED:
            v_sc = tl.load(
                v_scale_ptr + block * stride_vsb + offset * stride_vss + kv_head * stride_vsh,
                mask=pos_ok,
                other=0.0,
            )  # [BLOCK_N]
            p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if DIRECT:
        # An empty context (l = 0) gives 0, like the reference's softmax over no keys.
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        part = (b * num_heads + heads) * num_splits + split  # [BLOCK_G] row of (b, head, split)
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        acc_ptrs = part_acc_ptr + part[:, None] * head_dim + dims[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr,
    out_ptr, stride_ob, stride_oh, stride_od,
    num_heads, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (b, head): combine the splits' (m, l, acc) into the normalised output."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    split_ok = splits < num_splits
    dim_ok = dims < head_dim
    part = (b * num_heads + head) * num_splits + splits  # [BLOCK_S]
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))  # [BLOCK_S]
    l_s = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * head_dim + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    m_max = tl.max(m, axis=0)
    # Empty splits (and an empty context) hold m = -inf: weigh them 0 without exp(-inf - -inf).
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)  # [BLOCK_S]
    total = tl.sum(l_s * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0)  # [BLOCK_D]
    out = tl.where(total > 0, out / tl.maximum(total, 1e-30), 0.0)
    o_ptrs = out_ptr + b * stride_ob + head * stride_oh + dims * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence from shapes only (no host sync, so CUDA graphs can capture it): enough
    programs to fill the GPU at small batch, none at large batch, never splits of under
    MIN_TOKENS_PER_SPLIT tokens. `max_context` is the block tables' width in tokens, an upper
    bound on every context. The constants are guesses, to be tuned on GPU."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), max(1, batch * num_kv_heads))
    useful = triton.cdiv(max(1, max_context), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def _check_caches(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            "k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one shape and dtype, got "
            f"{k_cache.dtype} {tuple(k_cache.shape)} and {v_cache.dtype} {tuple(v_cache.shape)}"
        )
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {k_cache.dtype}")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} does not match the cache's {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} are not a multiple of kv heads {num_kv_heads}")
    check_kv_scales(k_cache, k_scale, v_scale)


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    num_splits: int | None,
) -> None:
    if q.dim() != 3 or q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be [B, H, D] of one of {Q_DTYPES}, got {q.dtype} {tuple(q.shape)}")
    _check_caches(q, k_cache, v_cache, k_scale, v_scale)
    batch = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"block_tables must be int32 [B={batch}, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if context_lens.dim() != 1 or context_lens.shape[0] != batch or context_lens.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"context_lens must be an int32 tensor [B={batch}], got {context_lens.dtype} "
            f"{tuple(context_lens.shape)}"
        )
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    tensors = [q, k_cache, v_cache, block_tables, context_lens]
    tensors += [s for s in (k_scale, v_scale) if s is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"q, caches, scales, block_tables and context_lens must share one device: {devices}")


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [B, H, D] (one query per sequence, the last of its context) -> out [B, H, D] in q's
    dtype; matches `paged_attention_ref` with query_start = 0..B. `num_splits` None picks
    `default_num_splits` from the shapes."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale, num_splits)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    check_window_and_cap(window, softcap)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, D]
    if batch == 0:
        return out
    if num_splits is None:
        longest = max_blocks * block_size if window <= 0 else min(max_blocks * block_size, window)
        num_splits = default_num_splits(batch, num_kv_heads, longest, q.device)
    quantized = k_cache.dtype == torch.int8
    # fp caches pass the caches as stand-ins for the unused scale pointers (QUANTIZED=False).
    k_sc = k_scale if quantized else k_cache
    v_sc = v_scale if quantized else v_cache
    group = num_heads // num_kv_heads
    block_d = max(MIN_DOT, next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32  # [16, D] q, [N, D] K and V tiles stay in registers
    if num_splits == 1:
        part_m = part_l = part_acc = out  # unused: the split kernel writes `out` directly
    else:
        part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, *q.stride(),
        k_cache, *k_cache.stride(),
        v_cache, *v_cache.stride(),
        k_sc, *k_sc.stride()[:3],
        v_sc, *v_sc.stride()[:3],
        block_tables, *block_tables.stride(),
        context_lens,
        out, *out.stride(),
        part_m, part_l, part_acc,
        float(scale) * LOG2E, num_heads, head_dim, max_blocks, num_splits, window, float(softcap) * LOG2E,
        GROUP=group, BLOCK_G=max(MIN_DOT, next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, DIRECT=num_splits == 1, QUANTIZED=quantized,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # 16-bit: the default (ignored)
        WINDOWED=window > 0, CAPPED=softcap > 0,
        # Two stages keep the pipelined K/V tiles within shared memory even for fp32 caches at D=256.
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_m, part_l, part_acc,
            out, *out.stride(),
            num_heads, head_dim, num_splits,
            BLOCK_S=next_power_of_2(num_splits), BLOCK_D=next_power_of_2(head_dim),
            num_warps=4,
        )  # fmt: skip
    return out
