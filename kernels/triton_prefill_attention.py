"""Varlen causal prefill attention over the paged KV cache (Triton), cached prefixes included.

Layouts (any strides: the launcher passes them; nothing is made contiguous)
  q            [T, H, D]  fp16 / bf16 / fp32  the step's query tokens, sequences one after another
  k/v_cache    [num_blocks, block_size, Hkv, D]  fp32 / fp16 / bf16, or int8 with k/v_scale
  k/v_scale    [num_blocks, block_size, Hkv] fp32 for int8 caches (one scale per token and head), else None
  block_tables [B, max_blocks] int32: row b lists sequence b's cache blocks in order (padding ignored)
  query_start  [B + 1] int32 tensor on q's device: sequence b owns q[query_start[b]:query_start[b + 1]]
  context_lens [B] int32 tensor on q's device: cached tokens of b, this step's included
  -> out [T, H, D] in q's dtype
The queries of sequence b sit at absolute positions context_len - query_len ... context_len - 1 (their
K/V are already in the cache) and attend causally to every cached position <= their own. GQA: query
head h reads kv head h // (H // Hkv). A sequence of query length 1 (a decode row mixed into the batch)
is just a short sequence; query length 0 writes nothing. Any head_dim (padded to a power of two >= 16
in registers, masked) and any block_size (a constexpr: one compiled variant per block size).

Index tensors, not host lists: the engine builds them once per step and every layer reuses them, and
the launch needs no host->device copy or device sync (so it can sit inside a CUDA graph). The contract
T == query_start[-1], 0 <= query_len <= max_query_len, query_len <= context_len and
context_len <= max_blocks * block_size is therefore checked only when the tensors live on the CPU
(the interpreter, where reading them is free); on CUDA it is the caller's promise. `max_query_len`
(a host int) sizes the grid; a larger value than needed only launches tiles that do nothing.

Kernel (flash-attention style). One program per (query tile, sequence, kv head). The tile's BLOCK_M
rows are BLOCK_Q query tokens x the GROUP query heads that share the kv head (row r: token r // GROUP,
head kv_head * GROUP + r % GROUP), so each K/V tile is loaded once for the whole group and a decode
row fills GROUP rows instead of one. Keys are walked in tiles of BLOCK_N positions; each key's cache
slot is gathered through the block table (block = position // block_size), so a tile may span several
cache blocks or part of one. Keys [0, full_end) are visible to every row of the tile (a cached prefix
and the part of this chunk before the tile's first query): no mask. Keys [full_end, last query
position] get the causal mask by absolute position; later keys are never read. Softmax is online in
fp32 (base 2, the scale folded into one multiply); QK^T and PV are tl.dot in q's dtype (tensor cores
for fp16/bf16; fp32 q uses input_precision="ieee", the exact reference mode, not tf32) with fp32
accumulation. K and V tiles are cast to q's dtype before the dots (a no-op when the cache dtype is q's).
int8 caches: the int8 values go through the dot as q's dtype (exact: |x| <= 127); the K scale
multiplies each key's score column in fp32 after QK^T; the V scale dequantizes the V tile
(v * scale, in fp32, then cast to q's dtype) before PV, so the probabilities never shrink toward
fp16's subnormals.

Sliding window (`window` > 0: row at position p reads keys (p - window, p]) and soft-cap (`softcap`
> 0: scores -> softcap * tanh(score / softcap), Gemma 2) are both constexpr-gated, so a model without
them runs the kernel as before. With a window the tile's keys are three ranges: [lo, full_lo) that
only some rows see (masked by window), [full_lo, full_end) that every row sees (no predicates), and
the causal range as above; keys before the first row's window are never read.

Reference: `paged_attention_ref.paged_attention_ref` (fp32). Tolerance story: fp32 q agrees up to fp32
summation order and exp2 vs exp (<= 3e-7 relative measured); fp16/bf16 q differ by the rounding of the
probabilities (and int8-dequantized V) to q's dtype before PV and of the output to q's dtype: a few
units of q's epsilon relative to the largest |output|.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_store_ref import check_kv_scales
from .triton_soft_cap import soft_cap
from .triton_support import check_window_and_cap, next_power_of_2

Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
LOG2E = 1.4426950408889634
# Finite start for the running max: a row whose keys are all masked so far keeps exp2(-inf - m) = 0
# and alpha = 1 instead of the NaN that -inf - -inf gives.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _load(ptrs, mask, MASK: tl.constexpr):
    """Masked (zero fill) only when MASK: full tiles load without predicates."""
    if MASK:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, q_pos, lo, hi,
    bt_row, k_base, v_base, ks_base, vs_base, qk_scale, window, cap,
    stride_btn, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
    stride_ksb, stride_kst, stride_vsb, stride_vst,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WINDOWED: tl.constexpr, CAPPED: tl.constexpr,
):  # fmt: skip
    """Fold keys [lo, hi) into the running (acc, m_i, l_i) and return them. MASKED: mask keys >= hi
    and apply causality (the diagonal) and the window; else every key in range is visible to every
    row and hi - lo is a multiple of BLOCK_N (no predicates on keys)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = dims < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute positions
        key_ok = keys < hi
        block = _load(bt_row + (keys // PAGE_SIZE) * stride_btn, key_ok, MASKED)  # [BLOCK_N] cache blocks
        # int64: block * stride may pass 2^31 in a large cache
        block = block.to(tl.int64)
        offset = keys % PAGE_SIZE

        k_ptrs = k_base + (block * stride_kb + offset * stride_kt)[None, :] + dims[:, None] * stride_kd
        k = _load(k_ptrs, key_ok[None, :] & d_ok[:, None], MASKED or PAD_D)  # [BLOCK_D, BLOCK_N], K^T
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if QUANTIZED:
            k_scale = _load(ks_base + block * stride_ksb + offset * stride_kst, key_ok, MASKED)
            s = s * (k_scale * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if CAPPED:
            s = soft_cap(s, cap)
        if MASKED:
            visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
            if WINDOWED:
                visible = visible & (keys[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_ptrs = v_base + (block * stride_vb + offset * stride_vt)[:, None] + dims[None, :] * stride_vd
        v = _load(v_ptrs, key_ok[:, None] & d_ok[None, :], MASKED or PAD_D)  # [BLOCK_N, BLOCK_D]
        if QUANTIZED:
            v_scale = _load(vs_base + block * stride_vsb + offset * stride_vst, key_ok, MASKED)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        else:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, qstart_ptr, ctx_ptr, out_ptr,
    qk_scale, window, cap,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOWED: tl.constexpr, CAPPED: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(qstart_ptr + seq)
    query_len = tl.load(qstart_ptr + seq + 1) - q_begin
    context_len = tl.load(ctx_ptr + seq)
    history = context_len - query_len  # cached tokens before this step's first query

    first_tok = tile * BLOCK_Q  # the tile's first query token, within the sequence
    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    tok = first_tok + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < query_len)
    q_pos = history + tok  # absolute position of each row's query

    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = dims < HEAD_DIM
    io_ok = row_ok[:, None] & d_ok[None, :]  # [BLOCK_M, BLOCK_D]
    token = (q_begin + tok).to(tl.int64)
    q_ptrs = q_ptr + (token * stride_qt + head * stride_qh)[:, None] + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_ok, other=0.0)  # [BLOCK_M, BLOCK_D]

    # Key ranges, from the tile's first and last query positions. A tile past the sequence's queries
    # (the grid is sized by the longest sequence) gets empty ranges and stores nothing.
    tile_ok = first_tok < query_len
    last_tok = tl.minimum(first_tok + BLOCK_Q, query_len) - 1
    full_end = tl.where(tile_ok, (history + first_tok + 1) // BLOCK_N * BLOCK_N, 0)
    kv_end = tl.where(tile_ok, history + last_tok + 1, 0)
    lo = 0  # the first key any row reads, rounded down to a tile
    full_lo = 0  # the first key every row reads, rounded up to a tile (at most full_end)
    if WINDOWED:
        lo = tl.maximum(history + first_tok - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(history + last_tok - window + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, full_end)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    ks_base = ks_ptr + kv_head * stride_ksh
    vs_base = vs_ptr + kv_head * stride_vsh
    if WINDOWED:
        acc, m_i, l_i = _attend_keys(
            acc, m_i, l_i, q, q_pos, lo, full_lo, bt_row, k_base, v_base, ks_base, vs_base, qk_scale,
            window, cap, stride_btn, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
            stride_ksb, stride_kst, stride_vsb, stride_vst,
            HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, QUANTIZED, True, DOT_PRECISION, WINDOWED, CAPPED,
        )  # fmt: skip
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_pos, full_lo, full_end, bt_row, k_base, v_base, ks_base, vs_base, qk_scale,
        window, cap, stride_btn, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
        stride_ksb, stride_kst, stride_vsb, stride_vst,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, QUANTIZED, False, DOT_PRECISION, WINDOWED, CAPPED,
    )  # fmt: skip
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q_pos, full_end, kv_end, bt_row, k_base, v_base, ks_base, vs_base, qk_scale,
        window, cap, stride_btn, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
        stride_ksb, stride_kst, stride_vsb, stride_vst,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, QUANTIZED, True, DOT_PRECISION, WINDOWED, CAPPED,
    )  # fmt: skip

    # Rows that saw no key (only rows that are not stored) keep l_i = 0: divide by 1 instead.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + (token * stride_ot + head * stride_oh)[:, None] + dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_ok)


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")


def _validate(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and devices: everything checkable without reading device memory."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    _, num_heads, head_dim = q.shape
    if head_dim == 0:
        raise ValueError("q has head_dim 0")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must share one dtype of float32, float16, bfloat16, int8; "
            f"got {k_cache.dtype} and {v_cache.dtype}"
        )
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads are not a multiple of the cache's {num_kv_heads} kv heads")
    check_kv_scales(k_cache, k_scale, v_scale)
    if context_lens.dim() != 1 or context_lens.dtype != torch.int32:
        raise ValueError(
            f"context_lens must be a 1-D int32 tensor [B], "
            f"got {context_lens.dtype} {list(context_lens.shape)}"
        )
    batch = context_lens.shape[0]
    if query_start.dim() != 1 or query_start.dtype != torch.int32:
        raise ValueError(
            f"query_start must be a 1-D int32 tensor [B + 1], "
            f"got {query_start.dtype} {list(query_start.shape)}"
        )
    if query_start.shape[0] != batch + 1:
        raise ValueError(
            f"query_start has {query_start.shape[0]} entries, context_lens {batch}: need B + 1 = {batch + 1}"
        )
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be a 2-D int32 tensor [B, max_blocks], "
            f"got {block_tables.dtype} {list(block_tables.shape)}"
        )
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, context_lens {batch} sequences")
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a host int >= 0, got {max_query_len!r}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("query_start", query_start), ("context_lens", context_lens)):  # fmt: skip
        _check_device(name, t, q.device)


def _validate_values(
    tokens: int,
    num_blocks: int,
    page_size: int,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
) -> None:
    """The contract on the index values; only called for CPU tensors (on CUDA it would cost a sync)."""
    qs = query_start.tolist()
    if qs[-1] != tokens:
        raise ValueError(f"query_start[-1] = {qs[-1]} but q has {tokens} tokens")
    for b, context_len in enumerate(context_lens.tolist()):
        query_len = qs[b + 1] - qs[b]
        if qs[b] < 0 or query_len < 0:
            raise ValueError(f"query_start must be non-decreasing from >= 0, got {qs}")
        if query_len > max_query_len:
            raise ValueError(f"sequence {b} has {query_len} query tokens > max_query_len {max_query_len}")
        if query_len > context_len:
            raise ValueError(f"sequence {b} has {query_len} query tokens but context_len {context_len}")
        used = -(-context_len // page_size)
        if used > block_tables.shape[1]:
            raise ValueError(
                f"sequence {b}: context_len {context_len} needs {used} blocks, block_tables has "
                f"{block_tables.shape[1]} columns"
            )
        blocks = block_tables[b, :used]
        if used and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
            raise ValueError(f"sequence {b}: block ids {blocks.tolist()} outside [0, {num_blocks})")


def _tile_config(max_query_len: int, group: int, head_dim: int, dtype: torch.dtype) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). tl.dot needs every dim >= 16.

    Sized from ptxas register counts of sm_90 builds (16-byte aligned strides): fp16/bf16 at D = 64
    with 64 x 64 tiles and 4 warps uses ~128 registers, D = 128 needs 8 warps to stay under ~180
    without spills. fp32 (IEEE dots on FMA units, the exact reference mode) holds both dot operands
    in registers, so its tiles are smaller.
    """
    block_d = max(16, next_power_of_2(head_dim))
    max_m = 32 if dtype == torch.float32 else 64
    # Few rows for decode-heavy batches: a tile holds at most max_query_len * group useful rows.
    block_m = min(max_m, max(16, next_power_of_2(max_query_len * group)))
    block_m = max(block_m, next_power_of_2(group))  # at least one token's whole group per tile
    if dtype == torch.float32:
        block_n, num_warps = (32 if block_d <= 64 else 16), 8
    else:
        block_n, num_warps = 64, (4 if block_d <= 64 else 8)
    return block_m, block_n, block_d, num_warps


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of every sequence's query chunk over its paged cache -> [T, H, D] in q's dtype."""
    _validate(q, k_cache, v_cache, block_tables, query_start, context_lens, max_query_len, k_scale, v_scale)
    check_window_and_cap(window, softcap)
    tokens, num_heads, head_dim = q.shape
    num_blocks, page_size, num_kv_heads, _ = k_cache.shape
    if not q.is_cuda:
        _validate_values(
            tokens, num_blocks, page_size, block_tables, query_start, context_lens, max_query_len
        )
    out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)  # [T, H, D]
    batch = context_lens.shape[0]
    if tokens == 0 or batch == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    block_m, block_n, block_d, num_warps = _tile_config(max_query_len, group, head_dim, q.dtype)
    block_q = block_m // group  # query tokens per tile
    quantized = k_cache.dtype == torch.int8
    # Non-int8 caches have no scales: the kernel never touches these pointers (QUANTIZED is constexpr).
    ks = k_scale if quantized else k_cache
    vs = v_scale if quantized else v_cache
    ks_strides = k_scale.stride() if quantized else (0, 0, 0)
    vs_strides = v_scale.stride() if quantized else (0, 0, 0)
    # input_precision only matters for fp32 operands: IEEE keeps fp32 the exact mode (tf32 would round
    # q and K to 10 mantissa bits); fp16/bf16 dots ignore it.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, ks, vs, block_tables, query_start, context_lens, out,
        float(scale) * LOG2E, window, float(softcap) * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *ks_strides, *vs_strides,
        *block_tables.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        QUANTIZED=quantized, DOT_PRECISION=precision, WINDOWED=window > 0, CAPPED=softcap > 0,
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    return out
