"""Paged attention: the reference against contiguous causal SDPA computed here, and the CPU decode /
prefill paths and the runtime dispatcher against the reference, on fp and int8 caches, with and
without a sliding window and a logit soft-cap (Mistral's / Gemma's).

Sequences are written into caches through scattered block tables (a random permutation of block
ids), padded with block 0, and every cache slot no sequence owns holds large garbage, so reading
through the wrong block or past a context shows up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.kv_store_ref import kv_store_ref
from lowbit.kernels.paged_attention_ref import (
    decode_attention_cpu,
    paged_attention_ref,
    prefill_attention_cpu,
)
from lowbit.runtime.backends.attention import AttentionSpec, CompiledCPUAttention, TorchAttention
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.layers.attention_metadata import AttentionMetadata

NUM_KV_HEADS, HEAD_DIM = 2, 16
SEQ_LENS = [1, 5, 17, 40]
# Everything below computes in fp32: the paths must agree with the reference up to summation order.
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
# int8 K/V (per token and head, error <= amax / 254 per element) against fp attention on the
# original unit-variance K/V: the largest error measured over 80 random cases of these shapes was
# 2.6e-2, so 5e-2 absolute; reading a wrong token or scale moves outputs by ~1e-1 to 1.
INT8_VS_FP_TOL = {"rtol": 0.0, "atol": 5e-2}


@dataclass
class Paged:
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D], fp32, contiguous: the ground truth
    values: list[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    block_tables: torch.Tensor  # [B, width] int32, padded with 0

    def cache(self) -> LayerKVCache:
        return LayerKVCache(self.k_cache, self.v_cache, self.k_scale, self.v_scale)


def build_paged(
    seq_lens, block_size: int, seed: int, cache_dtype=torch.float32, extra_width: int = 1
) -> Paged:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    values = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed) + extra_width
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for b, needed in enumerate(blocks_needed):
        block_tables[b, :needed] = torch.tensor(perm[start : start + needed], dtype=torch.int32)
        start += needed
    # The tables really are scattered: some multi-block sequence does not own consecutive blocks.
    assert any(
        (block_tables[b, 1:n] - block_tables[b, : n - 1] != 1).any()
        for b, n in enumerate(blocks_needed)
        if n > 1
    ) or block_size >= max(seq_lens)

    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    if cache_dtype == torch.int8:
        k_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        k_scale = torch.rand(shape[:-1], generator=gen) * 10
        v_scale = torch.rand(shape[:-1], generator=gen) * 10
        slots = torch.cat(
            [
                block_tables[b, torch.arange(n) // block_size].long() * block_size
                + torch.arange(n) % block_size
                for b, n in enumerate(seq_lens)
            ]
        )
        kv_store_ref(torch.cat(keys), torch.cat(values), k_cache, v_cache, slots, k_scale, v_scale)
    else:
        k_cache = (torch.randn(shape, generator=gen) * 100).to(cache_dtype)
        v_cache = (torch.randn(shape, generator=gen) * 100).to(cache_dtype)
        k_scale = v_scale = None
        # Written here element by element, independently of kv_store.
        for b, n in enumerate(seq_lens):
            for i in range(n):
                block = int(block_tables[b, i // block_size])
                k_cache[block, i % block_size] = keys[b][i]
                v_cache[block, i % block_size] = values[b][i]
        keys = [k.to(cache_dtype).float() for k in keys]
        values = [v.to(cache_dtype).float() for v in values]
    return Paged(keys, values, k_cache, v_cache, k_scale, v_scale, block_tables)


def sdpa_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Contiguous causal attention, queries = the last Tq of the C keys. q [Tq, H, D], k/v [C, Hkv, D].
    window > 0: query i (position C - Tq + i) reads only the `window` newest keys up to it, as
    transformers' sliding_window_overlay (kv_idx > q_idx - window); softcap > 0: Gemma 2's
    softcap * tanh(scores / softcap), written out."""
    query_len, num_heads, _ = q.shape
    context_len = k.shape[0]
    group = num_heads // k.shape[1]
    kh = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, C, D]; head h reads h // group
    vh = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    qh = q.float().transpose(0, 1)
    ones = torch.ones(query_len, context_len)
    allowed = ones.tril(diagonal=context_len - query_len).bool()
    if window:
        allowed &= ones.triu(diagonal=context_len - query_len - window + 1).bool()
    if not softcap:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    else:
        scores = qh @ kh.transpose(1, 2) * (scale or q.shape[-1] ** -0.5)
        scores = softcap * torch.tanh(scores / softcap)
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vh
    return out.transpose(0, 1)


def random_q(tokens: int, group: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, NUM_KV_HEADS * group, HEAD_DIM, generator=gen)


def starts(query_lens) -> list[int]:
    out = [0]
    for n in query_lens:
        out.append(out[-1] + n)
    return out


def test_sdpa_reference_hand_computed():
    """The test's own reference on a case small enough to do by hand: one head, D = 1, keys 0."""
    q = torch.zeros(2, 1, 1)
    k = torch.zeros(3, 1, 1)
    v = torch.tensor([1.0, 2.0, 6.0]).view(3, 1, 1)
    # Equal scores: query 0 (position 1) averages v[0..1], query 1 (position 2) averages v[0..2].
    assert torch.allclose(sdpa_reference(q, k, v, None).flatten(), torch.tensor([1.5, 3.0]))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_ref_matches_contiguous_sdpa(block_size, group, scale):
    paged = build_paged(SEQ_LENS, block_size, seed=block_size * 10 + group)
    query_lens = [1, 3, 17, 6]  # the 17-token sequence is a full prefill
    query_start = starts(query_lens)
    q = random_q(query_start[-1], group, seed=group)
    out = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables, query_start, SEQ_LENS, scale
    )
    assert out.dtype == torch.float32 and out.shape == q.shape
    for b in range(len(SEQ_LENS)):
        s, e = query_start[b], query_start[b + 1]
        expected = sdpa_reference(q[s:e], paged.keys[b], paged.values[b], scale)
        torch.testing.assert_close(out[s:e], expected, **FP32_TOL)


def test_ref_default_scale_is_inverse_sqrt_head_dim():
    paged = build_paged([9], 4, seed=0)
    q = random_q(2, 2, seed=1)
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, [0, 2], [9])
    torch.testing.assert_close(
        paged_attention_ref(*args), paged_attention_ref(*args, 1 / math.sqrt(HEAD_DIM)), rtol=0, atol=0
    )
    assert not torch.allclose(paged_attention_ref(*args), paged_attention_ref(*args, 1.0), atol=1e-3)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_matches_ref(block_size, group):
    paged = build_paged(SEQ_LENS, block_size, seed=block_size + group)
    q = random_q(len(SEQ_LENS), group, seed=100 + group)
    scale = 1 / math.sqrt(HEAD_DIM)
    out = decode_attention_cpu(
        q, paged.k_cache, paged.v_cache, paged.block_tables, torch.tensor(SEQ_LENS, dtype=torch.int32), scale
    )
    assert out.dtype == torch.float32 and out.shape == q.shape
    ref = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables, starts([1] * len(SEQ_LENS)), SEQ_LENS, scale
    )
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_matches_ref(block_size, group):
    paged = build_paged(SEQ_LENS, block_size, seed=block_size * 3 + group)
    scale = 1 / math.sqrt(HEAD_DIM)
    for b, context_len in enumerate(SEQ_LENS):
        # query_len == context_len (a whole prompt) and query_len < context_len (a cached prefix)
        for query_len in sorted({context_len, max(1, context_len // 2), 1}):
            q = random_q(query_len, group, seed=b * 100 + query_len)
            out = prefill_attention_cpu(
                q, paged.k_cache, paged.v_cache, paged.block_tables[b], context_len, scale
            )
            assert out.dtype == torch.float32 and out.shape == q.shape
            ref = paged_attention_ref(
                q,
                paged.k_cache,
                paged.v_cache,
                paged.block_tables[b : b + 1],
                [0, query_len],
                [context_len],
                scale,
            )
            torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_cache_decode_and_prefill_match_ref(cache_dtype):
    paged = build_paged(SEQ_LENS, 4, seed=7, cache_dtype=cache_dtype)
    scale = 1 / math.sqrt(HEAD_DIM)
    q = random_q(len(SEQ_LENS), 3, seed=8)
    out = decode_attention_cpu(
        q, paged.k_cache, paged.v_cache, paged.block_tables, torch.tensor(SEQ_LENS), scale
    )
    ref = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables, starts([1] * len(SEQ_LENS)), SEQ_LENS, scale
    )
    torch.testing.assert_close(out, ref, **FP32_TOL)
    # keys/values of the ground truth were rounded to the cache dtype, so this is fp32-tight too
    for b in range(len(SEQ_LENS)):
        torch.testing.assert_close(
            ref[b : b + 1], sdpa_reference(q[b : b + 1], paged.keys[b], paged.values[b], scale), **FP32_TOL
        )
    q = random_q(6, 3, seed=9)
    out = prefill_attention_cpu(q, paged.k_cache, paged.v_cache, paged.block_tables[3], 40, scale)
    torch.testing.assert_close(out, sdpa_reference(q, paged.keys[3], paged.values[3], scale), **FP32_TOL)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [1, 16])
def test_int8_cache_decode_and_prefill(block_size, group):
    paged = build_paged(SEQ_LENS, block_size, seed=block_size + 50 * group, cache_dtype=torch.int8)
    scale = 1 / math.sqrt(HEAD_DIM)
    caches = (paged.k_cache, paged.v_cache)
    scales = {"k_scale": paged.k_scale, "v_scale": paged.v_scale}

    q = random_q(len(SEQ_LENS), group, seed=200 + group)
    out = decode_attention_cpu(q, *caches, paged.block_tables, torch.tensor(SEQ_LENS), scale, **scales)
    ref = paged_attention_ref(
        q, *caches, paged.block_tables, starts([1] * len(SEQ_LENS)), SEQ_LENS, scale, **scales
    )
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for b in range(len(SEQ_LENS)):
        expected = sdpa_reference(q[b : b + 1], paged.keys[b], paged.values[b], scale)
        torch.testing.assert_close(ref[b : b + 1], expected, **INT8_VS_FP_TOL)
        torch.testing.assert_close(out[b : b + 1], expected, **INT8_VS_FP_TOL)

    for b, context_len in enumerate(SEQ_LENS):
        for query_len in sorted({context_len, max(1, context_len // 3)}):
            q = random_q(query_len, group, seed=300 + b * 50 + query_len)
            out = prefill_attention_cpu(q, *caches, paged.block_tables[b], context_len, scale, **scales)
            ref = paged_attention_ref(
                q, *caches, paged.block_tables[b : b + 1], [0, query_len], [context_len], scale, **scales
            )
            torch.testing.assert_close(out, ref, **FP32_TOL)
            expected = sdpa_reference(q, paged.keys[b], paged.values[b], scale)
            torch.testing.assert_close(out, expected, **INT8_VS_FP_TOL)


STEPS = {
    # a whole prompt, a chunk over a cached prefix, then 3 decodes
    "mixed": ([17, 40, 1, 5, 23], [17, 6, 1, 1, 1], 2),
    "one-prompt": ([40], [6], 1),  # a chunk over a cached prefix alone: no staging buffer
}


# (window, softcap): none, Mistral's window (shorter than most contexts here), Gemma 2's cap, both.
VARIANTS = [(0, 0.0), (5, 0.0), (0, 1.0), (5, 1.0)]


@pytest.mark.parametrize(("window", "softcap"), VARIANTS)
@pytest.mark.parametrize("backend", [CompiledCPUAttention, TorchAttention], ids=["compiled-ops", "eager"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=["fp32", "int8"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_dispatcher_mixes_prefill_and_decode(block_size, cache_dtype, step, backend, window, softcap):
    cpu = torch.device("cpu")
    if (reason := backend.can_implement(cpu, torch.float32)) is not None:
        pytest.skip(reason)  # no C++ compiler: only the eager path exists
    seq_lens, query_lens, num_prefills = STEPS[step]
    group = 3
    paged = build_paged(seq_lens, block_size, seed=block_size, cache_dtype=cache_dtype)
    query_start = starts(query_lens)
    q = random_q(query_start[-1], group, seed=11)
    meta = AttentionMetadata(
        slot_mapping=torch.full((query_start[-1],), -1, dtype=torch.int64),  # not read by attention
        block_tables=paged.block_tables,
        context_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start=tuple(query_start),
        context_lens_host=tuple(seq_lens),
        num_prefills=num_prefills,
    )
    assert meta.num_prefill_tokens == sum(query_lens[:num_prefills])
    scale = 1 / math.sqrt(HEAD_DIM)
    spec = AttentionSpec(q.shape[1], NUM_KV_HEADS, scale, window, softcap)
    out = backend(cpu, torch.float32).paged_attention(q, paged.cache(), meta, spec)
    assert out.dtype == torch.float32 and out.shape == q.shape
    ref = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables, query_start, seq_lens, scale,
        paged.k_scale, paged.v_scale, window, softcap,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, **FP32_TOL)
    tol = FP32_TOL if cache_dtype == torch.float32 else INT8_VS_FP_TOL
    for b in range(len(seq_lens)):
        s, e = query_start[b], query_start[b + 1]
        expected = sdpa_reference(q[s:e], paged.keys[b], paged.values[b], scale, window, softcap)
        torch.testing.assert_close(out[s:e], expected, **tol)
    if window or softcap:  # guard: the variant changes the answer on these contexts
        full = paged_attention_ref(
            q, paged.k_cache, paged.v_cache, paged.block_tables, query_start, seq_lens, scale,
            paged.k_scale, paged.v_scale,
        )  # fmt: skip
        assert (full - ref).abs().max() > 1e-2


@pytest.mark.parametrize("cached", [0, 5], ids=["whole-prompt", "after-cached-prefix"])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_prefill_in_query_chunks(monkeypatch, rows, cached):
    """Query chunks of `rows` (the last one ragged), each over the keys it can see, for a whole
    prompt and for one whose beginning was in the prefix cache."""
    from lowbit.kernels import paged_attention_ref as module

    paged = build_paged(SEQ_LENS, 4, seed=11 + rows)
    scale = 1 / math.sqrt(HEAD_DIM)
    b, context_len = max(enumerate(SEQ_LENS), key=lambda item: item[1])
    query_len = context_len - cached
    assert query_len > 2 * rows
    q = random_q(query_len, 3, seed=12)
    monkeypatch.setattr(module, "SCORES_BYTES", q.shape[1] * context_len * 4 * rows)
    out = prefill_attention_cpu(q, paged.k_cache, paged.v_cache, paged.block_tables[b], context_len, scale)
    ref = paged_attention_ref(
        q, paged.k_cache, paged.v_cache, paged.block_tables[b : b + 1], [0, query_len], [context_len], scale
    )
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize(("window", "softcap"), VARIANTS[1:])
@pytest.mark.parametrize("query_len", [40, 13, 1])
def test_prefill_chunks_read_only_their_window(monkeypatch, window, softcap, query_len):
    """The eager prefill in query chunks of 3 rows (its score-memory bound made tiny): each chunk
    slices the keys its first query can see, and the window mask is offset to match."""
    import lowbit.kernels.paged_attention_ref as ref_module

    monkeypatch.setattr(ref_module, "SCORES_BYTES", 3 * 3 * NUM_KV_HEADS * 40 * 4)
    paged = build_paged([40], 4, seed=query_len)
    q = random_q(query_len, 3, seed=query_len + 1)
    scale = 1 / math.sqrt(HEAD_DIM)
    out = prefill_attention_cpu(
        q, paged.k_cache, paged.v_cache, paged.block_tables[0], 40, scale, window=window, softcap=softcap
    )
    expected = sdpa_reference(q, paged.keys[0], paged.values[0], scale, window, softcap)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_window_reference_hand_computed():
    """sdpa_reference's window on a case done by hand: equal scores, window 2 averages v[p-1..p]."""
    q, k = torch.zeros(3, 1, 1), torch.zeros(3, 1, 1)
    v = torch.tensor([1.0, 2.0, 6.0]).view(3, 1, 1)
    assert torch.allclose(sdpa_reference(q, k, v, None, window=2).flatten(), torch.tensor([1.0, 1.5, 4.0]))
