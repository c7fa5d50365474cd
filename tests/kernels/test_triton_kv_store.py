"""Triton KV store against `kv_store_ref` (under TRITON_INTERPRET=1 without a GPU).

Both write into copies of the same caches, which start filled with sentinels, so the comparison
covers every slot: written ones must match, -1 (padding) and unused ones must still hold the
sentinel. Keys/values are strided views into a fused [T, H + 2 Hkv, D] qkv buffer, as the model
hands them over. The expected result is bit-exact for every dtype: casts are round-to-nearest-even
and int8 quantization uses IEEE division and round-half-to-even like torch. One exception, only in
the interpreter: its fp32 -> bf16 conversion does not round to nearest even (it differs from torch
by one bf16 ulp on about half of the values; measured), so that one case allows one ulp on CPU and
is exact on GPU.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.kv_store_ref import MIN_SCALE, kv_store_ref
from lowbit.kernels.triton_support import HAS_TRITON
from lowbit.runtime.kv_cache import KVCacheSpec, allocate_kv_cache

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:  # the kernel module imports triton
    from lowbit.kernels.triton_kv_store import kv_store_triton

# The default model's attention: 9 query heads, 3 kv heads; D = 80 is not a power of two.
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 80
BLOCK_SIZE, NUM_BLOCKS = 4, 6
SENTINEL = 7.0  # fp caches start filled with this (int8: codes 99, scales -1)
# Scattered over several blocks; padding (-1) between tokens; slot 0 is written, the last slot
# (23) is not, so a -1 wrapping around to the end of the pool shows up.
SLOTS = [13, -1, 0, 22, -1, 5, 9]


def make_cache(dtype: str, num_kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, device="cpu"):
    spec = KVCacheSpec(dtype, BLOCK_SIZE, NUM_BLOCKS, 1, num_kv_heads, head_dim)
    (cache,) = allocate_kv_cache(spec, torch.device(device))
    if spec.quantized:
        cache.k.fill_(99)
        cache.v.fill_(-99)
        cache.k_scale.fill_(-1.0)
        cache.v_scale.fill_(-1.0)
    else:
        cache.k.fill_(SENTINEL)
        cache.v.fill_(-SENTINEL)
    return cache


def clone_cache(cache) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)]


def fused_kv(tokens: int, dtype: torch.dtype, seed: int, num_kv_heads: int = KV_HEADS, head_dim=HEAD_DIM):
    """key, value [T, Hkv, D]: non-contiguous views into one [T, H + 2 Hkv, D] qkv buffer."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, HEADS + 2 * num_kv_heads, head_dim, generator=gen) * 3).to(dtype)
    key = qkv[:, HEADS : HEADS + num_kv_heads]
    value = qkv[:, HEADS + num_kv_heads :]
    assert tokens == 0 or not (key.is_contiguous() or value.is_contiguous())
    return key, value


def run_both(key, value, cache, slots: torch.Tensor):
    """(triton result, reference result) as [k, v, k_scale, v_scale] from the same start."""
    expected = clone_cache(cache)
    kv_store_ref(key, value, *expected[:2], slots.long(), *expected[2:])  # the reference takes int64
    kv_store_triton(key, value, cache.k, cache.v, slots, cache.k_scale, cache.v_scale)
    return [cache.k, cache.v, cache.k_scale, cache.v_scale], expected


def assert_untouched(cache, slots: list[int]) -> None:
    """Every slot not in `slots` still holds its sentinel."""
    untouched = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in slots]
    assert NUM_BLOCKS * BLOCK_SIZE - 1 in untouched
    if cache.k.dtype == torch.int8:
        sentinels = {"k": 99, "v": -99, "k_scale": -1.0, "v_scale": -1.0}
    else:
        sentinels = {"k": SENTINEL, "v": -SENTINEL}
    for name, sentinel in sentinels.items():
        flat = getattr(cache, name).flatten(0, 1)  # [num_blocks * block_size, ...]
        assert bool((flat[untouched] == sentinel).all()), name


# (cache dtype, key/value dtype): same dtype, down-casts and an up-cast.
FP_CASES = [
    ("float32", torch.float32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("float16", torch.float32),
    ("bfloat16", torch.float32),
    ("float32", torch.bfloat16),
]


@pytest.mark.parametrize(("cache_dtype", "input_dtype"), FP_CASES)
def test_fp_store_matches_ref(cache_dtype, input_dtype):
    cache = make_cache(cache_dtype)
    key, value = fused_kv(len(SLOTS), input_dtype, seed=1)
    actual, expected = run_both(key, value, cache, torch.tensor(SLOTS))
    interpreter_bf16_rounding = input_dtype == torch.float32 and cache_dtype == "bfloat16"
    for a, e in zip(actual[:2], expected[:2], strict=True):
        assert a.dtype == e.dtype
        if interpreter_bf16_rounding and a.device.type == "cpu":
            torch.testing.assert_close(a, e, rtol=2**-7, atol=0)  # one bf16 ulp, see the header
        else:
            assert torch.equal(a, e)
    assert_untouched(cache, SLOTS)


def test_fp_store_int32_slots_and_all_padding():
    cache = make_cache("float16")
    key, value = fused_kv(len(SLOTS), torch.float16, seed=2)
    actual, expected = run_both(key, value, cache, torch.tensor(SLOTS, dtype=torch.int32))
    assert all(torch.equal(a, e) for a, e in zip(actual[:2], expected[:2], strict=True))
    cache = make_cache("float16")
    kv_store_triton(key, value, cache.k, cache.v, torch.full((len(SLOTS),), -1))
    assert_untouched(cache, [])


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_store_codes_and_scales_match_ref(input_dtype):
    cache = make_cache("int8", head_dim=64)
    key, value = fused_kv(len(SLOTS), input_dtype, seed=3, head_dim=64)
    key[0, 1] *= 100  # heads of very different magnitudes: each gets its own scale
    value[2, 0] *= 1e-3
    value[3, 2] = 0.0  # an all-zero head: scale MIN_SCALE, codes 0
    # Exact .5 ties: amax 127 gives scale 1.0 exactly, so x / scale = x; torch.round takes them
    # to even (2.5 -> 2, -3.5 -> -4, 0.5 -> 0), round-half-away would not.
    ties = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5])
    key[5, 2] = ties.repeat(8).to(input_dtype)
    actual, expected = run_both(key, value, cache, torch.tensor(SLOTS))
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)
    assert cache.v_scale.flatten(0, 1)[22, 2] == torch.tensor(MIN_SCALE, dtype=torch.float32)
    assert cache.k.flatten(0, 1)[5, 2, :8].tolist() == [127, 2, -4, 0, 0, 2, 126, -126]
    assert_untouched(cache, SLOTS)


def test_int8_store_many_heads_span_programs():
    """Hkv = 40 at D = 128 takes two programs per token along the heads, the second ragged."""
    cache = make_cache("int8", num_kv_heads=40, head_dim=128)
    key, value = fused_kv(3, torch.float16, seed=4, num_kv_heads=40, head_dim=128)
    slots = torch.tensor([23, -1, 6])
    actual, expected = run_both(key, value, cache, slots)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_empty_step_is_a_no_op():
    cache = make_cache("int8")
    key, value = fused_kv(0, torch.float32, seed=5)
    kv_store_triton(
        key, value, cache.k, cache.v, torch.empty(0, dtype=torch.int64), cache.k_scale, cache.v_scale
    )
    assert_untouched(cache, [])


def test_bad_inputs_raise():
    cache = make_cache("int8")
    fp = make_cache("float32")
    key, value = fused_kv(2, torch.float32, seed=6)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        kv_store_triton(key, value, cache.k, cache.v, slots)
    with pytest.raises(ValueError, match="only for int8 caches"):
        kv_store_triton(key, value, fp.k, fp.v, slots, cache.k_scale, cache.v_scale)
    with pytest.raises(ValueError, match=r"k_scale must be float32 \(6, 4, 3\)"):
        kv_store_triton(key, value, cache.k, cache.v, slots, cache.k_scale.half(), cache.v_scale)
    with pytest.raises(ValueError, match="does not match the cache"):
        kv_store_triton(key[:, :2], value[:, :2], fp.k, fp.v, slots)
    with pytest.raises(ValueError, match="key and value must both be"):
        kv_store_triton(key, value[:1], fp.k, fp.v, slots)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T=2\]"):
        kv_store_triton(key, value, fp.k, fp.v, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping must be int64 or int32"):
        kv_store_triton(key, value, fp.k, fp.v, slots.float())
    with pytest.raises(ValueError, match="one shape and dtype"):
        kv_store_triton(key, value, fp.k, cache.v, slots)
    with pytest.raises(ValueError, match="key/value must share one of"):
        kv_store_triton(key.to(torch.int8), value.to(torch.int8), fp.k, fp.v, slots)


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("cache_dtype", "input_dtype"), [*FP_CASES, ("int8", torch.bfloat16), ("int8", torch.float16)]
)
def test_store_cuda_bit_exact(cache_dtype, input_dtype):
    """On a GPU every case is bit-exact, fp32 -> bf16 included (real round-to-nearest-even)."""
    cache = make_cache(cache_dtype, num_kv_heads=8, head_dim=128, device="cuda")
    key, value = fused_kv(len(SLOTS), input_dtype, seed=7, num_kv_heads=8, head_dim=128)
    actual, expected = run_both(key.cuda(), value.cuda(), cache, torch.tensor(SLOTS, device="cuda"))
    for a, e in zip(actual, expected, strict=True):
        if a is not None:
            assert torch.equal(a, e)
    assert_untouched(cache, SLOTS)
