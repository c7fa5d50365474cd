"""KV store: new keys/values land exactly at their slots (fp caches) or are quantized per
(token, head) with a symmetric scale = amax / 127 (int8 caches). Caches come from `allocate_kv_cache`."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.kv_store_ref import kv_store_ref
from lowbit.runtime.kv_cache import KVCacheSpec, allocate_kv_cache

CPU = torch.device("cpu")
BLOCK_SIZE, NUM_BLOCKS, HEADS, HEAD_DIM = 4, 6, 2, 8
SENTINEL = 7.0  # fp caches start filled with this, so stray writes show up


def make_cache(dtype: str):
    spec = KVCacheSpec(dtype, BLOCK_SIZE, NUM_BLOCKS, 1, HEADS, HEAD_DIM)
    (cache,) = allocate_kv_cache(spec, CPU)
    assert cache.k.shape == (NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    if not spec.quantized:
        cache.k.fill_(SENTINEL)
        cache.v.fill_(-SENTINEL)
    return cache


def random_kv(tokens: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen) * 3
    value = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen)
    return key.to(dtype), value.to(dtype)


# Scattered slots over several blocks, including the last slot of the pool and slot 0.
SLOTS = [13, 0, 23, 5, 9, 22]
PADDED_SLOTS = [13, -1, 0, 22, -1, 5]  # leaves the last slot (23) free


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fp_store_writes_exactly_at_slots(dtype):
    cache = make_cache(dtype)
    key, value = random_kv(len(SLOTS), 0, cache.k.dtype)
    kv_store_ref(key, value, cache.k, cache.v, torch.tensor(SLOTS))
    flat_k, flat_v = cache.k.view(-1, HEADS, HEAD_DIM), cache.v.view(-1, HEADS, HEAD_DIM)
    for t, slot in enumerate(SLOTS):
        assert torch.equal(flat_k[slot], key[t])
        assert torch.equal(flat_v[slot], value[t])
        # slot = block * block_size + offset
        assert torch.equal(cache.k[slot // BLOCK_SIZE, slot % BLOCK_SIZE], key[t])
    untouched = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in SLOTS]
    assert bool((flat_k[untouched] == SENTINEL).all()) and bool((flat_v[untouched] == -SENTINEL).all())


def test_fp_store_casts_to_cache_dtype():
    cache = make_cache("bfloat16")
    key, value = random_kv(len(SLOTS), 1, torch.float32)
    kv_store_ref(key, value, cache.k, cache.v, torch.tensor(SLOTS))
    flat_k = cache.k.view(-1, HEADS, HEAD_DIM)
    for t, slot in enumerate(SLOTS):
        assert torch.equal(flat_k[slot], key[t].to(torch.bfloat16))


def test_fp_store_skips_padding_slots():
    cache = make_cache("float32")
    key, value = random_kv(len(PADDED_SLOTS), 2)
    kv_store_ref(key, value, cache.k, cache.v, torch.tensor(PADDED_SLOTS))
    flat_k, flat_v = cache.k.view(-1, HEADS, HEAD_DIM), cache.v.view(-1, HEADS, HEAD_DIM)
    written = [s for s in PADDED_SLOTS if s >= 0]
    for t, slot in enumerate(PADDED_SLOTS):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[t]) and torch.equal(flat_v[slot], value[t])
    untouched = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in written]
    assert NUM_BLOCKS * BLOCK_SIZE - 1 in untouched  # a -1 must not wrap around to the last slot
    assert bool((flat_k[untouched] == SENTINEL).all()) and bool((flat_v[untouched] == -SENTINEL).all())


def check_int8_slot(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    """q int8 [H, D], scale fp32 [H] for the original x [H, D], checked head by head."""
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    for h in range(x.shape[0]):
        row = [float(v) for v in x[h].float()]
        amax = max(abs(v) for v in row)
        expected_scale = amax / 127.0
        s = float(scale[h])
        assert s == pytest.approx(expected_scale, rel=1e-6)
        assert int(q[h].abs().max()) == 127  # the largest element uses the full range
        for d, v in enumerate(row):
            assert abs(int(q[h, d]) * s - v) <= s / 2 * (1 + 1e-5)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_int8_store_quantizes_per_token_and_head(input_dtype):
    cache = make_cache("int8")
    key, value = random_kv(len(PADDED_SLOTS), 3, input_dtype)
    key[1, 0] *= 100  # heads of very different magnitudes: each must get its own scale
    value[2, 1] *= 1e-3
    kv_store_ref(key, value, cache.k, cache.v, torch.tensor(PADDED_SLOTS), cache.k_scale, cache.v_scale)
    flat = {n: t.view(NUM_BLOCKS * BLOCK_SIZE, *t.shape[2:]) for n, t in vars(cache).items()}
    for t, slot in enumerate(PADDED_SLOTS):
        if slot >= 0:
            check_int8_slot(flat["k"][slot], flat["k_scale"][slot], key[t])
            check_int8_slot(flat["v"][slot], flat["v_scale"][slot], value[t])
    untouched = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in PADDED_SLOTS]
    for name in ("k", "v", "k_scale", "v_scale"):
        assert bool((flat[name][untouched] == 0).all()), name


def test_int8_store_all_zero_head_has_finite_scale():
    cache = make_cache("int8")
    key, value = random_kv(2, 4)
    key[0, 1] = 0.0
    value[1] = 0.0
    kv_store_ref(key, value, cache.k, cache.v, torch.tensor([3, 17]), cache.k_scale, cache.v_scale)
    flat_k, flat_v = cache.k.view(-1, HEADS, HEAD_DIM), cache.v.view(-1, HEADS, HEAD_DIM)
    k_scale, v_scale = cache.k_scale.view(-1, HEADS), cache.v_scale.view(-1, HEADS)
    for s in (k_scale[3, 1], v_scale[17, 0], v_scale[17, 1]):
        assert torch.isfinite(s) and float(s) > 0
    assert bool((flat_k[3, 1] == 0).all()) and bool((flat_v[17] == 0).all())
    dequantized = flat_v[17].float() * v_scale[17, :, None]
    assert bool(torch.isfinite(dequantized).all()) and bool((dequantized == 0).all())
    check_int8_slot(flat_k[3, :1], k_scale[3, :1], key[0, :1])  # the other head is unaffected


def test_int8_store_needs_scales():
    cache = make_cache("int8")
    key, value = random_kv(1, 5)
    with pytest.raises(ValueError, match="k_scale"):
        kv_store_ref(key, value, cache.k, cache.v, torch.tensor([0]))
