"""Triton paged decode attention against `paged_attention_ref` with one query per sequence
(query_start = 0..B), under TRITON_INTERPRET=1 without a GPU.

Caches are built here: sequences own a random permutation of block ids (scattered, not
consecutive), block tables are padded with block 0 (owned by another sequence) and one spare
column, and every cache slot no sequence reads (unowned blocks, and the tail of each sequence's
last block) holds NaN, in the scales too for int8 caches: reading through a wrong block, past a
context, or letting a masked position into a dot turns the output into NaN. Contexts are ragged:
1, not multiples of the block size or of the kernel's 64-token tile, and several tiles long so
that forced splits (1, 3, more splits than tiles) cut them differently.

Tolerances (relative to max|reference|, see tolerance.assert_close_rel):
  fp32 q: IEEE fp32 dots; only summation order and exp2 vs exp differ -> 1e-5.
  fp16 q: q and K/V are exact fp16 values, but the probabilities are rounded to fp16 before the PV
          dot and the output to fp16 (2^-11 = 4.9e-4 each); measured <= 6e-4, so 2e-3. A wrong
          token, scale or split weight moves outputs by >= 1e-1. (An fp32 cache read with fp16 q
          also rounds K/V to fp16: measured 3e-4.)
  bf16 q: the same with bf16's 2^-8 -> 2e-2; GPU only, because `tl.dot` on bf16 operands is wrong
          under the interpreter (measured), and the kernel deliberately dots in q's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lowbit.kernels.paged_attention_ref import paged_attention_ref
from lowbit.kernels.triton_support import HAS_TRITON

from .tolerance import assert_close_rel

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:  # the kernel module imports triton
    from lowbit.kernels.triton_decode_attention import (
        MIN_TOKENS_PER_SPLIT,
        default_num_splits,
        paged_decode_attention_triton,
    )

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Ragged: one token; a full block; 37 (< one 64-token tile, not a block multiple); 200 (4 tiles).
LENS = [1, 16, 37, 200]


@dataclass
class Case:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    block_tables: torch.Tensor  # [B, width] int32
    context_lens: torch.Tensor  # [B] int32

    def scales(self) -> dict:
        return {"k_scale": self.k_scale, "v_scale": self.v_scale}


def build_case(
    lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, cache_dtype, seed: int, device="cpu"
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(lens), max(needed) + 1, dtype=torch.int32)
    read = torch.zeros(num_blocks * block_size, dtype=torch.bool)  # slots some sequence reads
    start = 0
    for b, (n, blocks) in enumerate(zip(lens, needed, strict=True)):
        block_tables[b, :blocks] = perm[start : start + blocks]
        start += blocks
        positions = torch.arange(n)
        read[block_tables[b, positions // block_size].long() * block_size + positions % block_size] = True
    assert any((block_tables[b, 1:n] - block_tables[b, : n - 1] != 1).any() for b, n in enumerate(needed))

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    unread = ~read.view(num_blocks, block_size)
    if cache_dtype == torch.int8:
        k_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        k_scale = torch.rand(shape[:-1], generator=gen) * 0.02 + 1e-3  # |K| up to ~2.7
        v_scale = torch.rand(shape[:-1], generator=gen) * 0.02 + 1e-3
        k_scale[unread] = float("nan")
        v_scale[unread] = float("nan")
    else:
        k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
        v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
        k_cache[unread] = float("nan")
        v_cache[unread] = float("nan")
        k_scale = v_scale = None
    tensors = [k_cache, v_cache, k_scale, v_scale, block_tables, torch.tensor(lens, dtype=torch.int32)]
    return Case(*[None if t is None else t.to(device) for t in tensors])


def random_q(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, seed: int, device="cpu"):
    """q [B, H, D] as the model hands it over: a non-contiguous view into a fused qkv buffer."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q = qkv[:, :num_heads]
    assert not q.is_contiguous()
    return q


def check(
    case: Case,
    q: torch.Tensor,
    lens: list[int],
    num_splits: int | None,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    scale = 1 / math.sqrt(q.shape[-1])
    out = paged_decode_attention_triton(
        q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, scale, **case.scales(),
        num_splits=num_splits, window=window, softcap=softcap,
    )  # fmt: skip
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = paged_attention_ref(
        q.cpu(), case.k_cache.cpu(), case.v_cache.cpu(), case.block_tables.cpu(), list(range(len(lens) + 1)),
        lens, scale, *[None if s is None else s.cpu() for s in (case.k_scale, case.v_scale)], window, softcap,
    )  # fmt: skip
    assert bool(torch.isfinite(ref).all())
    assert_close_rel(out.cpu(), ref, TOL[q.dtype])


# (cache dtype, q dtype, H, Hkv, D, block_size, splits): GQA 3 (the default model), 4 and 1;
# D = 80 and 96 are not powers of two; block sizes 16, 4 and 32. A bf16 cache is read with fp32 q
# (its dots are fp32, which the interpreter gets right).
CASES = [
    pytest.param(torch.float32, torch.float32, 9, 3, 64, 16, [1, 3], id="fp32-gqa3-d64-bs16"),
    pytest.param(torch.float16, torch.float16, 8, 2, 80, 4, [1, 3], id="fp16-gqa4-d80-bs4"),
    pytest.param(torch.float32, torch.float32, 2, 2, 32, 32, [8], id="fp32-mha-d32-bs32"),
    pytest.param(torch.int8, torch.float16, 9, 3, 64, 16, [1, 3], id="int8-fp16q-gqa3-d64-bs16"),
    pytest.param(torch.int8, torch.float32, 8, 2, 96, 4, [2], id="int8-fp32q-gqa4-d96-bs4"),
    pytest.param(torch.float32, torch.float16, 4, 1, 64, 16, [2], id="fp32cache-fp16q-gqa4"),
    pytest.param(torch.bfloat16, torch.float32, 3, 3, 64, 16, [1], id="bf16cache-fp32q-mha"),
]


@pytest.mark.parametrize(
    ("cache_dtype", "q_dtype", "heads", "kv_heads", "head_dim", "block_size", "splits"), CASES
)
def test_decode_matches_ref(cache_dtype, q_dtype, heads, kv_heads, head_dim, block_size, splits):
    case = build_case(LENS, block_size, kv_heads, head_dim, cache_dtype, seed=heads * head_dim + block_size)
    q = random_q(len(LENS), heads, kv_heads, head_dim, q_dtype, seed=head_dim)
    for num_splits in splits:
        check(case, q, LENS, num_splits)


@pytest.mark.parametrize(("window", "softcap"), [(50, 0.0), (7, 0.0), (0, 1.0), (70, 1.0)])
@pytest.mark.parametrize(
    ("cache_dtype", "q_dtype"),
    [(torch.float32, torch.float32), (torch.int8, torch.float16)],
    ids=["fp32", "int8"],
)
def test_window_and_softcap_match_ref(cache_dtype, q_dtype, window, softcap):
    """Mistral's / Gemma's window (starting inside a 64-token tile, or past the whole context) and
    Gemma 2's cap, with one split and with splits that divide only the windowed tiles."""
    case = build_case(LENS, 16, 3, 64, cache_dtype, seed=window + 1)
    q = random_q(len(LENS), 9, 3, 64, q_dtype, seed=window + 2)
    for num_splits in (1, 3):
        check(case, q, LENS, num_splits, window, softcap)


def test_decode_default_splits_and_empty_context():
    """num_splits=None; a context of 0 (a padded batch row) gives 0 like the reference."""
    lens = [70, 0, 5]
    case = build_case(lens, 16, 3, 64, torch.float16, seed=11)
    q = random_q(len(lens), 9, 3, 64, torch.float16, seed=12)
    for num_splits in (None, 1, 4):
        out = paged_decode_attention_triton(
            q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.125, num_splits=num_splits
        )
        assert bool((out[1] == 0).all()) and bool(torch.isfinite(out).all())
        ref = paged_attention_ref(q, case.k_cache, case.v_cache, case.block_tables, [0, 1, 2, 3], lens, 0.125)
        assert_close_rel(out, ref, TOL[torch.float16])


def test_default_num_splits_heuristic():
    cpu = torch.device("cpu")
    assert default_num_splits(1, 1, 16, cpu) == 1  # one short sequence: nothing to split
    long = default_num_splits(1, 1, 64 * MIN_TOKENS_PER_SPLIT, cpu)
    assert long > 1
    assert default_num_splits(1, 1, (long - 1) * MIN_TOKENS_PER_SPLIT, cpu) <= long - 1  # >= 256 each
    assert default_num_splits(512, 8, 64 * MIN_TOKENS_PER_SPLIT, cpu) == 1  # large batch fills the GPU


def test_bad_inputs_raise():
    case = build_case([5, 9], 4, 2, 16, torch.int8, seed=0)
    q = random_q(2, 4, 2, 16, torch.float32, seed=0)
    args = (case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.25)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_decode_attention_triton(q, *args)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        paged_decode_attention_triton(q[:, :3], *args, **case.scales())
    with pytest.raises(ValueError, match="head_dim 8 does not match"):
        paged_decode_attention_triton(q[..., :8], *args, **case.scales())
    with pytest.raises(ValueError, match=r"block_tables must be int32 \[B=1"):
        paged_decode_attention_triton(q[:1], *args, **case.scales())
    with pytest.raises(ValueError, match="context_lens must be an int32 tensor"):
        paged_decode_attention_triton(q, *args[:3], case.context_lens.float(), 0.25, **case.scales())
    with pytest.raises(ValueError, match="num_splits must be None or an int >= 1"):
        paged_decode_attention_triton(q, *args, **case.scales(), num_splits=0)
    with pytest.raises(ValueError, match=r"k_scale must be float32"):
        paged_decode_attention_triton(q, *args, k_scale=case.k_scale[:1], v_scale=case.v_scale)
    with pytest.raises(ValueError, match="q must be"):
        paged_decode_attention_triton(q.to(torch.int8), *args, **case.scales())
    fp = build_case([5, 9], 4, 2, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="only for int8 caches"):
        paged_decode_attention_triton(q, fp.k_cache, fp.v_cache, *args[2:], **case.scales())
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        paged_decode_attention_triton(q, *args, **case.scales(), window=-1)
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        paged_decode_attention_triton(q, *args, **case.scales(), softcap=float("inf"))


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "cache_dtype", [torch.bfloat16, torch.int8, torch.float16], ids=["bf16", "int8", "fp16"]
)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=["bf16q", "fp16q"])
def test_decode_cuda(cache_dtype, q_dtype):
    """Real tensor-core dots (bf16 included), Llama-like GQA 4 at D = 128, contexts up to 3000."""
    lens = [1, 17, 3000, 700, 64]
    case = build_case(lens, 16, 8, 128, cache_dtype, seed=3, device="cuda")
    q = random_q(len(lens), 32, 8, 128, q_dtype, seed=4, device="cuda")
    for num_splits in (None, 1, 7):
        check(case, q, lens, num_splits)
