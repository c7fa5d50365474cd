"""The compiled CPU ops (kernels/cpu/norm_rotary.cpp, kernels/cpu/attention.cpp) against torch
references: add_rms_norm against `F.rms_norm` of the summed residual, paged_decode_attention against
`paged_attention_ref` and contiguous SDPA, on scattered block tables, GQA, ragged lengths and
fp32/bf16/fp16/int8 caches; paged_prefill_attention against the same two, for whole prompts and
chunks over a cached prefix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.cpu import extension
from lowbit.kernels.paged_attention_ref import paged_attention_ref

from .test_paged_attention import FP32_TOL, HEAD_DIM, build_paged, random_q, sdpa_reference

ops = extension.load()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler: the eager path is used instead")
# bf16 output rounding: one bf16 ulp of values near 4 is 1.6e-2.
NORM_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1e-2, "atol": 2e-2}}


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_add_rms_norm_matches_torch(x_dtype, out_dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    n = 576
    x = (torch.randn(rows, n, generator=gen) * 3).to(x_dtype)
    residual = torch.randn(rows, n, generator=gen) * 20
    weight = torch.randn(n, generator=gen)
    expected_residual = residual + x.float()
    expected = F.rms_norm(expected_residual, (n,), weight, 1e-5).to(out_dtype)
    out = ops.add_rms_norm(x, residual, weight, 1e-5, out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(residual, expected_residual, rtol=1e-6, atol=1e-5)  # updated in place
    torch.testing.assert_close(out.float(), expected.float(), **NORM_TOL[out_dtype])


def test_add_rms_norm_rejects_a_non_fp32_residual():
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5,
                         torch.float32)  # fmt: skip


PLAIN = (0, 0.0)  # (window, softcap): full attention, no cap
CACHE_TOL = {
    torch.float32: FP32_TOL,
    torch.bfloat16: FP32_TOL,  # the reference reads the same bf16 values, so only summation order differs
    torch.float16: FP32_TOL,
    torch.int8: {"rtol": 1e-4, "atol": 1e-4},  # scales applied per score/probability vs dequantized
}


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_paged_decode_attention_matches_the_reference(cache_dtype, block_size, group):
    seq_lens = [1, 5, 17, 40]
    paged = build_paged(seq_lens, block_size, seed=block_size + group, cache_dtype=cache_dtype)
    q = random_q(len(seq_lens), group, seed=3)  # one query per sequence: [B, H, D]
    scale = 1 / math.sqrt(HEAD_DIM)
    out = ops.paged_decode_attention(
        q, paged.k_cache, paged.v_cache, paged.k_scale, paged.v_scale, paged.block_tables,
        torch.tensor(seq_lens, dtype=torch.int32), scale, *PLAIN,
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == torch.float32
    starts = list(range(len(seq_lens) + 1))
    ref = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables, starts, seq_lens, scale,
        paged.k_scale, paged.v_scale,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, **CACHE_TOL[cache_dtype])
    if cache_dtype != torch.int8:  # an independent check on the contiguous ground truth
        for b in range(len(seq_lens)):
            expected = sdpa_reference(q[b : b + 1], paged.keys[b], paged.values[b], scale)
            torch.testing.assert_close(out[b : b + 1], expected, **FP32_TOL)


def _decode_case(seq_lens: list[int], group: int, head_dim: int, block_size: int, cache_dtype, seed: int):
    """Sequences' K/V written with kv_store_ref into one pool of shuffled blocks (padding entries -1)."""
    from lowbit.kernels.kv_store_ref import kv_store_ref

    gen = torch.Generator().manual_seed(seed)
    kv_heads, width = 2, max(-(-n // block_size) for n in seq_lens)
    total = sum(-(-n // block_size) for n in seq_lens)
    shape = (total + 2, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    scales = [torch.zeros(shape[:3]) for _ in range(2)] if cache_dtype == torch.int8 else [None, None]
    owners = torch.randperm(total + 2, generator=gen)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    contiguous = []
    for b, n in enumerate(seq_lens):
        used = -(-n // block_size)
        tables[b, :used], owners = owners[:used].to(torch.int32), owners[used:]
        keys = torch.randn(n, kv_heads, head_dim, generator=gen) * 2
        values = torch.randn(n, kv_heads, head_dim, generator=gen)
        positions = torch.arange(n)
        slots = tables[b].long()[positions // block_size] * block_size + positions % block_size
        kv_store_ref(keys, values, k_cache, v_cache, slots, *scales, padded=False)
        contiguous.append((k_cache.flatten(0, 1)[slots].float(), v_cache.flatten(0, 1)[slots].float()))
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)
    return q, k_cache, v_cache, scales, tables, contiguous


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(
    ("head_dim", "group", "block_size"), [(64, 3, 16), (80, 5, 16), (16, 9, 7), (24, 2, 16), (128, 4, 32)]
)
def test_paged_decode_attention_long_contexts(cache_dtype, head_dim, group, block_size):
    """Contexts of 1 to 700 keys: one and several 128-key segments merged, segments that end inside a
    block, 4-key score groups with 1-3 keys left over; head_dim 64/128 (vector), 80 (4 + 1 lane
    chunks), 16 (one chunk), 24 (scalar); 1-4 query heads per pass and more than 8 per kv head."""
    seq_lens = [700, 1, 129, 256, 3, 383]
    q, k_cache, v_cache, (k_scale, v_scale), tables, contiguous = _decode_case(
        seq_lens, group, head_dim, block_size, cache_dtype, seed=head_dim + group
    )
    scale = 1 / math.sqrt(head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = ops.paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale, tables, lens, scale, *PLAIN)
    starts, table = list(range(len(seq_lens) + 1)), tables.clamp(min=0)
    ref = paged_attention_ref(q, k_cache, v_cache, table, starts, seq_lens, scale, k_scale, v_scale)
    torch.testing.assert_close(out, ref, **CACHE_TOL[cache_dtype])
    if cache_dtype != torch.int8:  # an independent check on the contiguous cached values
        for b, (k, v) in enumerate(contiguous):
            torch.testing.assert_close(out[b : b + 1], sdpa_reference(q[b : b + 1], k, v, scale), **FP32_TOL)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("window", "softcap"), [(200, 0.0), (7, 0.0), (0, 2.0), (130, 2.0)])
def test_paged_decode_attention_window_and_softcap(cache_dtype, window, softcap):
    """Mistral's / Gemma's window (keys from a start that is not a segment or block boundary, and
    contexts shorter than it) and Gemma 2's logit cap, over 1-700 keys."""
    seq_lens = [700, 1, 129, 256, 3, 383]
    q, k_cache, v_cache, (k_scale, v_scale), tables, contiguous = _decode_case(
        seq_lens, 3, 64, 16, cache_dtype, seed=window
    )
    scale, lens = 0.125, torch.tensor(seq_lens, dtype=torch.int32)
    out = ops.paged_decode_attention(
        q, k_cache, v_cache, k_scale, v_scale, tables, lens, scale, window, softcap
    )
    starts, table = list(range(len(seq_lens) + 1)), tables.clamp(min=0)
    ref = paged_attention_ref(
        q, k_cache, v_cache, table, starts, seq_lens, scale, k_scale, v_scale, window, softcap
    )
    torch.testing.assert_close(out, ref, **CACHE_TOL[cache_dtype])
    if cache_dtype != torch.int8:
        for b, (k, v) in enumerate(contiguous):
            expected = sdpa_reference(q[b : b + 1], k, v, scale, window, softcap)
            torch.testing.assert_close(out[b : b + 1], expected, **FP32_TOL)


def test_paged_decode_attention_errors():
    paged = build_paged([4], 4, seed=0)
    q = random_q(1, 1, seed=0)
    lens = torch.tensor([4], dtype=torch.int32)
    too_narrow = paged.block_tables[:, :0]
    with pytest.raises(RuntimeError, match="block table"):
        ops.paged_decode_attention(q, paged.k_cache, paged.v_cache, None, None, too_narrow, lens, 1.0, *PLAIN)
    int8 = build_paged([4], 4, seed=0, cache_dtype=torch.int8)
    with pytest.raises(RuntimeError, match="k_scale"):
        ops.paged_decode_attention(
            q, int8.k_cache, int8.v_cache, None, None, int8.block_tables, lens, 1.0, *PLAIN
        )
    out_of_range = paged.block_tables + paged.k_cache.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode_attention(
            q, paged.k_cache, paged.v_cache, None, None, out_of_range, lens, 1.0, *PLAIN
        )
    caches = (paged.k_cache, paged.v_cache, None, None, paged.block_tables)
    with pytest.raises(RuntimeError, match=">= 0"):
        ops.paged_decode_attention(q, *caches, -lens, 1.0, *PLAIN)
    empty = ops.paged_decode_attention(q, *caches, lens * 0, 1.0, *PLAIN)
    assert torch.equal(empty, torch.zeros_like(q))  # no keys: zeros (a softmax over nothing is NaN)


def _prefill_case(context_len: int, group: int, head_dim: int, block_size: int, cache_dtype, seed: int):
    """One sequence's K/V written with kv_store_ref into scattered blocks; q for every position."""
    from lowbit.kernels.kv_store_ref import kv_store_ref

    gen = torch.Generator().manual_seed(seed)
    kv_heads = 2
    keys = torch.randn(context_len, kv_heads, head_dim, generator=gen) * 2
    values = torch.randn(context_len, kv_heads, head_dim, generator=gen)
    blocks = -(-context_len // block_size)
    table = torch.randperm(blocks + 3, generator=gen)[:blocks].to(torch.int32)  # 3 blocks nobody owns
    shape = (blocks + 3, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    scales = [torch.zeros(shape[:3]) for _ in range(2)] if cache_dtype == torch.int8 else [None, None]
    positions = torch.arange(context_len)
    slots = table.long()[positions // block_size] * block_size + positions % block_size
    kv_store_ref(keys, values, k_cache, v_cache, slots, *scales, padded=False)
    q = torch.randn(context_len, kv_heads * group, head_dim, generator=gen)
    return q, k_cache, v_cache, scales, table


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(("head_dim", "group", "block_size"), [(64, 3, 16), (80, 1, 5), (16, 2, 4)])
@pytest.mark.parametrize("query_len", [200, 37, 1])
def test_paged_prefill_attention_matches_the_reference(cache_dtype, head_dim, group, block_size, query_len):
    """A whole 200-token prompt (13 query tiles, 4-block score groups) and its last 37 / last 1 tokens
    over a cached prefix; head_dim 64 (vector path), 80 (vector + remainder) and 16 (remainder)."""
    context_len = 200
    q, k_cache, v_cache, (k_scale, v_scale), table = _prefill_case(
        context_len, group, head_dim, block_size, cache_dtype, seed=head_dim + query_len
    )
    q = q[context_len - query_len :]
    if query_len == 37:  # any float q is taken (and computed in fp32)
        q = q.to(torch.bfloat16)
    scale = 1 / math.sqrt(head_dim)
    out = ops.paged_prefill_attention(
        q, k_cache, v_cache, k_scale, v_scale, table, context_len, scale, *PLAIN
    )
    assert out.shape == q.shape and out.dtype == torch.float32
    ref = paged_attention_ref(
        q, k_cache, v_cache, table[None], [0, query_len], [context_len], scale, k_scale, v_scale
    )
    torch.testing.assert_close(out, ref, **CACHE_TOL[cache_dtype])
    if cache_dtype != torch.int8:  # an independent check: SDPA on the contiguous cached values
        positions = torch.arange(context_len)
        slots = table.long()[positions // block_size] * block_size + positions % block_size
        k = k_cache.flatten(0, 1)[slots].float()
        v = v_cache.flatten(0, 1)[slots].float()
        torch.testing.assert_close(out, sdpa_reference(q, k, v, scale), **FP32_TOL)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize(("window", "softcap"), [(50, 0.0), (5, 0.0), (0, 2.0), (37, 2.0)])
@pytest.mark.parametrize("query_len", [200, 37, 1])
def test_paged_prefill_attention_window_and_softcap(cache_dtype, window, softcap, query_len):
    """Each query row reads its own window: rows whose window starts inside a 16-key score block,
    a chunk whose first query's window starts past key 0 (only those keys are gathered)."""
    context_len = 200
    q, k_cache, v_cache, (k_scale, v_scale), table = _prefill_case(
        context_len, 3, 64, 16, cache_dtype, seed=window + query_len
    )
    q = q[context_len - query_len :]
    scale = 0.125
    out = ops.paged_prefill_attention(
        q, k_cache, v_cache, k_scale, v_scale, table, context_len, scale, window, softcap
    )
    ref = paged_attention_ref(
        q,
        k_cache,
        v_cache,
        table[None],
        [0, query_len],
        [context_len],
        scale,
        k_scale,
        v_scale,
        window,
        softcap,
    )
    torch.testing.assert_close(out, ref, **CACHE_TOL[cache_dtype])
    if cache_dtype != torch.int8:
        positions = torch.arange(context_len)
        slots = table.long()[positions // 16] * 16 + positions % 16
        k, v = k_cache.flatten(0, 1)[slots].float(), v_cache.flatten(0, 1)[slots].float()
        torch.testing.assert_close(out, sdpa_reference(q, k, v, scale, window, softcap), **FP32_TOL)


def test_paged_prefill_attention_errors():
    q, k_cache, v_cache, _, table = _prefill_case(20, 1, 16, 4, torch.float32, seed=0)
    args = (None, None)
    with pytest.raises(RuntimeError, match="block table"):
        ops.paged_prefill_attention(q, k_cache, v_cache, *args, table[:2], 20, 1.0, *PLAIN)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_prefill_attention(q, k_cache, v_cache, *args, table + 100, 20, 1.0, *PLAIN)
    padded = torch.cat((table, torch.tensor([-1, 10**6], dtype=table.dtype)))  # padding is not read
    torch.testing.assert_close(
        ops.paged_prefill_attention(q, k_cache, v_cache, *args, padded, 20, 1.0, *PLAIN),
        ops.paged_prefill_attention(q, k_cache, v_cache, *args, table, 20, 1.0, *PLAIN),
    )
    with pytest.raises(RuntimeError, match="cover the queries"):
        ops.paged_prefill_attention(q, k_cache, v_cache, *args, table, 10, 1.0, *PLAIN)
    int8 = _prefill_case(20, 1, 16, 4, torch.int8, seed=0)
    with pytest.raises(RuntimeError, match="k_scale"):
        ops.paged_prefill_attention(int8[0], int8[1], int8[2], *args, int8[4], 20, 1.0, *PLAIN)


def _rotary_case(tokens: int, in_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    heads = (torch.randn(tokens, 9 + 2 * 3, 64, generator=gen) * 4).to(in_dtype)  # 9 q heads, 3 kv heads
    angles = torch.rand(tokens, 32, generator=gen) * 100
    cos = torch.cat((angles, angles), dim=-1).cos()[:, None, :]  # [T, 1, D], rotate_half layout
    sin = torch.cat((angles, angles), dim=-1).sin()[:, None, :]
    return heads, cos, sin


# fp32 rotation may fuse multiply-adds differently from torch (1 ulp), which can flip the rounding
# of a stored bf16/fp16 value (1 ulp of the cache dtype) or an int8 code (1 step of the scale).
STORE_TOL = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-5},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_rotary_kv_store_matches_apply_rotary_and_kv_store(in_dtype, cache_dtype):
    from lowbit.kernels.kv_store_ref import kv_store_ref
    from lowbit.runtime.layers.rotary import apply_rotary

    heads, cos, sin = _rotary_case(5, in_dtype, seed=1)
    slots = torch.tensor([7, -1, 0, 12, 3])  # scattered, with one padding slot
    shape = (4, 4, 3, 64)
    caches = [torch.zeros(shape, dtype=cache_dtype) for _ in range(4)]
    scales = [torch.zeros(shape[:-1]) for _ in range(4)] if cache_dtype == torch.int8 else [None] * 4

    q_ref, k_ref = apply_rotary(heads[:, :12], cos, sin).split([9, 3], dim=1)
    kv_store_ref(k_ref, heads[:, 12:], caches[0], caches[1], slots, scales[0], scales[1])
    q = ops.rotary_kv_store(heads, cos, sin, 9, 3, caches[2], caches[3], slots, scales[2], scales[3])

    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-5)
    if cache_dtype == torch.int8:
        for ref, got, ref_scale, got_scale in ((caches[0], caches[2], scales[0], scales[2]),
                                               (caches[1], caches[3], scales[1], scales[3])):  # fmt: skip
            torch.testing.assert_close(got_scale, ref_scale, rtol=1e-6, atol=0)
            assert (got.int() - ref.int()).abs().max() <= 1
            assert (got != ref).float().mean() < 0.01
    else:
        torch.testing.assert_close(caches[2].float(), caches[0].float(), **STORE_TOL[cache_dtype])
        torch.testing.assert_close(caches[3].float(), caches[1].float(), **STORE_TOL[cache_dtype])
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert not caches[2].flatten(0, 1)[untouched].any()  # the padding token wrote nothing


def test_rotary_kv_store_errors():
    heads, cos, sin = _rotary_case(2, torch.float32, seed=0)
    cache = torch.zeros(2, 4, 3, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="k_scale"):
        ops.rotary_kv_store(heads, cos, sin, 9, 3, cache, cache.clone(), torch.tensor([0, 1]), None, None)
    with pytest.raises(RuntimeError, match="heads"):
        ops.rotary_kv_store(heads, cos, sin, 8, 3, cache, cache.clone(), torch.tensor([0, 1]), None, None)
