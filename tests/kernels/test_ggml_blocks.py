"""GGUF block types on CPU (kernels/cpu/ggml_blocks.cpp) on real tensors written by llama.cpp's own
quantizer (tests/data/gguf/llama3: every type in the 12 presets of a tiny Llama 3).

- dequantize: equal to gguf-py's `gguf.quants.dequantize` bit for bit (llama.cpp's Python port).
- GEMM: against fp64 dequantize-then-matmul, on the blocked path and the dense path at every row
  count, odd output counts and inner sizes of one block up to the whole row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.kernels.cpu import extension
from lowbit.kernels.cpu import ggml as cpu_ggml
from lowbit.kernels.ggml_blocks_ref import dequantize_ref, ggml_matmul_ref, in_features, int8_activations_ref

from .ggml_fixtures import cut_cases, tensors_of

pytestmark = pytest.mark.skipif(
    extension.load() is None, reason="no C++ compiler: the torch kernels are used instead"
)
ROWS = [1, 2, 7, 8, 16, 64, 300]


def test_fixtures_cover_every_type():
    """Guard: the tests below see every type the kernels claim (more than one tensor each)."""
    assert {name: len(tensors_of(name)) >= 2 for name in cpu_ggml.TYPES} == dict.fromkeys(
        cpu_ggml.TYPES, True
    )


@pytest.mark.parametrize("name", cpu_ggml.TYPES)
def test_dequantize_equals_gguf_bit_for_bit(name):
    for where, blocks in tensors_of(name):
        got = cpu_ggml.dequantize(blocks, in_features(name, blocks.shape[1]), name).numpy()
        expected = dequantize_ref(blocks, name).numpy()
        assert got.shape == expected.shape, where
        if not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
            np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=where)


PATHS = [pytest.param(False, id="avx2"), pytest.param(True, id="portable")]


def _int8_rounding_bound(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
    """Worst case of rounding each activation to the nearest multiple of its block's scale
    (amax / 127; blocks of the weight type's size, 32 or 256): half a scale step times sum |w|
    over the block, summed over blocks. [M, N]"""
    block = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    steps = x.reshape(x.shape[0], -1, block).abs().amax(-1) / 127  # [M, K/block]
    half_step = (steps / 2).repeat_interleave(block, dim=1)  # [M, K]
    return half_step.double() @ w.abs().double().T


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("arithmetic", ["fp32", "int8"])
@pytest.mark.parametrize("name", cpu_ggml.TYPES)
def test_blocked_gemm_matches_dequantize_then_matmul(name, arithmetic, portable):
    gen = torch.Generator().manual_seed(7)
    for blocks, what in cut_cases(name):
        k, w = in_features(name, blocks.shape[1]), dequantize_ref(blocks, name)
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            x[0, :32] *= 50  # one large block: its scale must not leak into the others
            int8 = arithmetic == "int8"
            got = cpu_ggml.gemm(x, blocks, name, dense=False, int8_activations=int8, portable=portable)
            assert got.dtype == torch.float32 and got.shape == (m, blocks.shape[0])
            # int8 arithmetic: exact integer dot products of the activations as rounded by the
            # spec (llama.cpp's Q8_0 / Q8_K), so the reference takes those rounded activations.
            seen = int8_activations_ref(x, name) if int8 else x.double()
            expected = ggml_matmul_ref(seen, blocks, name)
            # fp32 products and sums in another order: relative to the size of the terms summed.
            terms = seen.abs() @ w.abs().double().T
            bound = 1e-5 * (terms + terms.max() * 1e-3)
            err = (got.double() - expected).abs()
            assert (err <= bound).all(), f"{what} M={m}: max error {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", cpu_ggml.TYPES)
def test_dense_gemm_and_default_dispatch(name, dtype):
    """From DENSE_ROWS rows (16-bit: DENSE_ROWS_INT8), or forced, the weight is dequantized and
    multiplied in fp32; below, 16-bit rows take the int8 arithmetic. bf16 output rounding (2^-9)
    bounds both."""
    gen = torch.Generator().manual_seed(11)
    blocks, what = cut_cases(name)[-1]
    k, w = in_features(name, blocks.shape[1]), dequantize_ref(blocks, name)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        for dense in (True, None):
            got = cpu_ggml.gemm(x, blocks, name, dense=dense)
            assert got.dtype == dtype and got.shape == (m, blocks.shape[0])
            expected = ggml_matmul_ref(x.float(), blocks, name)
            terms = x.float().abs().double() @ w.abs().double().T
            bound = 1e-5 * (terms + terms.max() * 1e-3)
            if dtype == torch.bfloat16:
                bound = bound + expected.abs() * 2**-8
                if not dense and m < cpu_ggml.DENSE_ROWS_INT8:
                    bound = bound + _int8_rounding_bound(x.float(), w, name) * (1 + 1e-4)
            err = (got.double() - expected).abs()
            assert (err <= bound).all(), f"{what} M={m} dense={dense}: max error {err.max():.3g}"


def test_gemm_leading_dims_and_row_order():
    """[..., K] inputs keep their leading dims; output column n is weight row n."""
    blocks = tensors_of("Q4_K")[0][1][:48]
    k = in_features("Q4_K", blocks.shape[1])
    x = torch.randn(2, 3, k)
    got = cpu_ggml.gemm(x, blocks, "Q4_K")
    assert got.shape == (2, 3, 48)
    flipped = cpu_ggml.gemm(x, blocks.flip(0).contiguous(), "Q4_K")
    torch.testing.assert_close(flipped, got.flip(-1), rtol=0, atol=0)


def test_wrong_row_bytes_is_refused():
    blocks = tensors_of("Q6_K")[0][1]
    with pytest.raises(RuntimeError, match="does not hold"):
        cpu_ggml.gemm(torch.randn(1, 512), blocks, "Q6_K")


@pytest.mark.parametrize("name", ["Q6_K", "IQ4_NL", "Q5_1"])
def test_embedding_rows_gathered_from_the_packed_table(name):
    """A tied table: the embedding reads its rows from the vocabulary projection's packed blocks
    (no copy of its own) and they equal gguf-py's dequantized rows."""
    from lowbit.runtime.layers.embedding import Embedding
    from lowbit.runtime.layers.linear import Linear
    from lowbit.runtime.quant import GGMLConfig, QuantizedWeight

    blocks = tensors_of(name)[0][1]
    table = QuantizedWeight(
        GGMLConfig(name), blocks.shape[0], in_features(name, blocks.shape[1]), {"blocks": blocks}
    )
    cpu = torch.device("cpu")
    embedding, head = Embedding(table, cpu), Linear(table, cpu, torch.float32)
    embedding.share(head.packed)
    assert embedding.nbytes() == 0 and head.packed.nbytes() == blocks.numel()
    ids = torch.tensor([3, 0, blocks.shape[0] - 1, 3])
    expected = dequantize_ref(blocks, name)[ids]
    assert torch.equal(embedding(ids), expected)


@pytest.mark.parametrize("dense", [False, True])
def test_no_rows_gives_no_rows(dense):
    blocks = tensors_of("Q8_0")[0][1]
    got = cpu_ggml.gemm(torch.empty(0, in_features("Q8_0", blocks.shape[1])), blocks, "Q8_0", dense=dense)
    assert got.shape == (0, blocks.shape[0])
