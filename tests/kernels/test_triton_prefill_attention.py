"""Triton varlen prefill attention against `paged_attention_ref`, on fp and int8 paged caches.

Every batch mixes decode rows (query length 1), chunks over cached prefixes whose lengths are not
multiples of the block size, and a whole prompt; block tables are a random permutation of block ids
(scattered, padded with block 0). Every cache slot no sequence owns holds NaN (its scale is NaN for
int8 caches), so a read of the wrong block, a position past the context or a masked-off tail that
leaks into the output shows up as NaN, not as a small numeric difference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA every test runs on the GPU. bf16 is only tested on the GPU: the kernel
feeds bf16 operands to tl.dot (tensor cores), and tl.dot on bf16 gives garbage under the interpreter
(a Triton interpreter limitation, measured); fp16 exercises the same 16-bit code path here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lowbit.kernels.kv_store_ref import kv_store_ref
from lowbit.kernels.paged_attention_ref import paged_attention_ref
from lowbit.kernels.triton_support import HAS_TRITON

from .tolerance import TOL, assert_close_rel

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
if HAS_TRITON:
    from lowbit.kernels.triton_prefill_attention import prefill_attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Relative to the largest |reference output| (assert_close_rel). The reference is fp32 on the same
# (already rounded) q and cache values, so the kernel's error is its own rounding:
# - fp32: summation order and exp2 vs exp; measured <= 3e-7 relative here.
# - fp16: probabilities (and int8-dequantized V) rounded to fp16 before PV, output rounded to fp16
#   (unit roundoff 2^-11 ~ 4.9e-4); measured <= 4e-4. Reading one wrong key moves outputs by ~1e-1.
# - bf16 (GPU only): the same roundings at bf16's 2^-9 ~ 2e-3 unit roundoff.
RTOL = {torch.float32: TOL[torch.float32], torch.float16: 2e-3, torch.bfloat16: TOL[torch.bfloat16]}

# A decode row deep in its context, a chunk over a 13-token prefix, a whole prompt, a decode row at
# position 0, and a 33-token chunk over a 117-token prefix (full key tiles before the diagonal).
QUERY_LENS = [1, 7, 33, 1, 33]
CONTEXT_LENS = [40, 20, 33, 1, 150]


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None  # [num_blocks, block_size, Hkv] for int8 caches
    v_scale: torch.Tensor | None
    block_tables: torch.Tensor  # [B, width] int32
    query_start: list[int]
    context_lens: list[int]
    scale: float
    window: int = 0
    softcap: float = 0.0

    def run(self, max_query_len: int | None = None) -> torch.Tensor:
        longest = max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))
        return prefill_attention_triton(
            self.q, self.k_cache, self.v_cache, self.block_tables,
            torch.tensor(self.query_start, dtype=torch.int32, device=DEVICE),
            torch.tensor(self.context_lens, dtype=torch.int32, device=DEVICE),
            longest if max_query_len is None else max_query_len, self.scale,
            self.k_scale, self.v_scale, window=self.window, softcap=self.softcap,
        )  # fmt: skip

    def reference(self) -> torch.Tensor:
        return paged_attention_ref(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start, self.context_lens,
            self.scale, self.k_scale, self.v_scale, self.window, self.softcap,
        )  # fmt: skip


def build_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 64,
    page_size: int = 16,
    q_dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Batch:
    """Random K/V written through `kv_store_ref` (quantizing for int8) at scattered blocks."""
    cache_dtype = q_dtype if cache_dtype is None else cache_dtype
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // page_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(context_lens), max(blocks_needed) + 1, dtype=torch.int32)
    first = 0
    for b, needed in enumerate(blocks_needed):
        block_tables[b, :needed] = perm[first : first + needed].int()
        first += needed

    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    if cache_dtype == torch.int8:
        k_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        v_cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        k_scale = torch.full(shape[:-1], float("nan"))
        v_scale = torch.full(shape[:-1], float("nan"))
    else:
        k_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        v_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
        k_scale = v_scale = None
    positions = [torch.arange(n) for n in context_lens]
    slots = torch.cat(
        [
            block_tables[b, pos // page_size].long() * page_size + pos % page_size
            for b, pos in enumerate(positions)
        ]
    )
    tokens = slots.shape[0]
    keys = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    values = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    kv_store_ref(keys, values, k_cache, v_cache, slots, k_scale, v_scale)

    query_start = [0]
    for n in query_lens:
        query_start.append(query_start[-1] + n)
    # q as the engine passes it: a strided view of the fused [T, H + 2 Hkv, D] qkv buffer.
    qkv = torch.randn(query_start[-1], num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q = qkv.to(q_dtype).to(DEVICE)[:, :num_heads]

    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(DEVICE)

    return Batch(
        q, dev(k_cache), dev(v_cache), dev(k_scale), dev(v_scale), dev(block_tables),
        query_start, list(context_lens), head_dim**-0.5,
    )  # fmt: skip


def check(batch: Batch, rtol: float, max_query_len: int | None = None) -> None:
    out = batch.run(max_query_len)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype and out.device == batch.q.device
    assert not out.isnan().any(), "NaN: the kernel read a cache slot no sequence owns"
    assert_close_rel(out.cpu(), batch.reference().cpu(), rtol)


def test_batch_builder_scatters_blocks_and_poisons_unowned_slots():
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3)
    tables = batch.block_tables.cpu()
    rows = [tables[b, : -(-n // 16)] for b, n in enumerate(CONTEXT_LENS)]
    assert any((row[1:] - row[:-1] != 1).any() for row in rows if len(row) > 1)
    owned = sum(CONTEXT_LENS) * 3 * 64
    assert int((~batch.k_cache.isnan()).sum()) == owned


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
def test_ragged_batch_matches_ref(q_dtype, num_heads, num_kv_heads):
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, num_heads, num_kv_heads, q_dtype=q_dtype, seed=num_heads)
    check(batch, RTOL[q_dtype])


@pytest.mark.parametrize("page_size", [5, 128])
def test_other_block_sizes(page_size):
    """5: key tiles span many blocks at odd offsets; 128: a key tile is part of one block."""
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3, page_size=page_size, q_dtype=torch.float16)
    check(batch, RTOL[torch.float16])


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_int8_cache_matches_ref(q_dtype):
    """Scales per token and head: K's on the scores, V's on the V tile (dequantized to q's dtype)."""
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3, q_dtype=q_dtype, cache_dtype=torch.int8, seed=5)
    check(batch, RTOL[q_dtype])


@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads", "q_dtype"),
    [(128, 4, 1, torch.float16), (40, 3, 3, torch.float32), (8, 2, 1, torch.float16)],
    ids=["d128", "d40-padded", "d8-padded"],
)
def test_head_dims(head_dim, num_heads, num_kv_heads, q_dtype):
    batch = build_batch([1, 20], [30, 70], num_heads, num_kv_heads, head_dim=head_dim, q_dtype=q_dtype)
    check(batch, RTOL[q_dtype])


def test_decode_only_and_empty_sequences_and_oversized_grid():
    """All query lengths <= 1 (one with none: nothing to write), and a max_query_len far above the
    longest query: the extra tiles must neither write nor disturb the rows that exist."""
    batch = build_batch([1, 0, 1, 1], [129, 3, 16, 17], 9, 3, q_dtype=torch.float16, seed=3)
    assert batch.q.shape[0] == 3
    check(batch, RTOL[torch.float16])
    check(batch, RTOL[torch.float16], max_query_len=50)


def test_cache_dtype_may_differ_from_q():
    """fp32 q over a bf16 cache: K/V are cast to q's dtype in the kernel (exact here), no bf16 dot."""
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3, q_dtype=torch.float32, cache_dtype=torch.bfloat16)
    check(batch, RTOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (bf16 tl.dot is broken in the interpreter)"
)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8], ids=["bf16-cache", "int8-cache"])
def test_bf16_on_gpu(cache_dtype):
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3, q_dtype=torch.bfloat16, cache_dtype=cache_dtype)
    check(batch, RTOL[torch.bfloat16])


def _valid_args() -> dict:
    batch = build_batch([1, 7], [9, 20], 4, 2, head_dim=16)
    return {
        "q": batch.q,
        "k_cache": batch.k_cache,
        "v_cache": batch.v_cache,
        "block_tables": batch.block_tables,
        "query_start": torch.tensor(batch.query_start, dtype=torch.int32, device=DEVICE),
        "context_lens": torch.tensor(batch.context_lens, dtype=torch.int32, device=DEVICE),
        "max_query_len": 7,
        "scale": batch.scale,
    }


def _int8_without_scales(a: dict) -> None:
    a["k_cache"], a["v_cache"] = a["k_cache"].to(torch.int8), a["v_cache"].to(torch.int8)


def _scales_on_fp_cache(a: dict) -> None:
    a["k_scale"] = a["v_scale"] = torch.ones(a["k_cache"].shape[:3], device=DEVICE)


BAD_INPUTS = {
    "q-2d": (lambda a: a.update(q=a["q"][:, 0]), r"q must be \[T, H, D\]"),
    "q-int": (lambda a: a.update(q=a["q"].to(torch.int32)), "q must be float16, bfloat16 or float32"),
    "v-shape": (lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), "v_cache shape"),
    "head-dim": (lambda a: a.update(q=a["q"][..., :8]), "cache head_dim 16 != q head_dim 8"),
    "heads": (lambda a: a.update(q=a["q"][:, :3]), "3 heads are not a multiple of the cache's 2 kv heads"),
    "int8-no-scales": (_int8_without_scales, "an int8 KV cache needs k_scale"),
    "scales-fp-cache": (_scales_on_fp_cache, "only for int8 caches"),
    "ctx-int64": (
        lambda a: a.update(context_lens=a["context_lens"].long()),
        "context_lens must be a 1-D int32",
    ),
    "qs-length": (
        lambda a: a.update(query_start=a["query_start"][:2]),
        "query_start has 2 entries, context_lens 2",
    ),
    "tables-rows": (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables has 1 rows"),
    "max-q-tensor": (lambda a: a.update(max_query_len=torch.tensor(7)), "max_query_len must be a host int"),
    "tokens": (lambda a: a.update(q=a["q"][:5]), r"query_start\[-1\] = 8 but q has 5 tokens"),
    "max-q-small": (lambda a: a.update(max_query_len=6), "sequence 1 has 7 query tokens > max_query_len 6"),
    "q-past-ctx": (lambda a: a["context_lens"].fill_(5), "sequence 1 has 7 query tokens but context_len 5"),
    "ctx-past-table": (lambda a: a["context_lens"].fill_(60), "context_len 60 needs 4 blocks"),
    "bad-block": (lambda a: a["block_tables"].fill_(99), "outside"),
}

# Index values, not shapes: checked only for CPU tensors.
VALUE_CHECKS = [BAD_INPUTS[k] for k in ("tokens", "max-q-small", "q-past-ctx", "ctx-past-table", "bad-block")]


@pytest.mark.parametrize("mutate", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(mutate):
    args = _valid_args()
    prefill_attention_triton(**args)  # the unmodified call is fine
    change, message = mutate
    args = _valid_args()
    change(args)
    if DEVICE.type == "cuda" and mutate in VALUE_CHECKS:
        pytest.skip("index values are only checked on CPU tensors (on CUDA it would cost a sync)")
    with pytest.raises(ValueError, match=message):
        prefill_attention_triton(**args)


@pytest.mark.parametrize(("window", "softcap"), [(50, 0.0), (5, 0.0), (40, 1.0), (0, 1.0)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=["fp32", "int8"])
def test_window_and_softcap_match_ref(cache_dtype, window, softcap):
    """Sliding windows (5: shorter than a key tile, rows' windows start in different tiles; 40 and
    50: over the 117-token prefix, so the window-masked, unmasked and causal ranges all occur) and
    Gemma 2's soft-cap, over the mixed batch."""
    batch = build_batch(QUERY_LENS, CONTEXT_LENS, 9, 3, cache_dtype=cache_dtype, seed=window + 3)
    batch.window, batch.softcap = window, softcap
    check(batch, RTOL[torch.float32])
