"""Fused Triton GEMM on GGUF blocks (kernels/triton_ggml.py) on real tensors written by llama.cpp's
own quantizer (tests/data/gguf/llama3), against gguf-py's dequantizer (`dequantize_ref`) and fp64
dequantize-then-matmul (`ggml_matmul_ref`).

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors. bf16 is
covered where no `tl.dot` runs (M == 1 and the dequantize kernel): the interpreter computes bf16
dots wrongly (tests/kernels/test_triton_w4a16.py). Every kernel also compiles for sm_90 in
tests/kernels/test_triton_sm90_compile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.kernels.ggml_blocks_ref import dequantize_ref, ggml_matmul_ref, in_features
from lowbit.kernels.triton_support import HAS_TRITON

from .ggml_fixtures import cut_cases, tensors_of

if HAS_TRITON:  # the kernel module imports triton
    from lowbit.kernels import triton_ggml as tg

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = tg.TYPES if HAS_TRITON else ()
# 1: FMA GEMV; 2..16: 16-row dots; 64: 64-row tiles; 300: dequantize + torch.matmul.
ROWS = [1, 2, 7, 16, 64, 300]
# Output rounding of a 16-bit dtype (the interpreter truncates: a whole unit of the last place),
# and, on the dot paths, each weight rounded to the dtype before the dot.
UNIT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def test_fixtures_cover_every_type():
    assert {name: len(tensors_of(name)) >= 2 for name in TYPES} == dict.fromkeys(TYPES, True)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_bit_for_bit(name):
    """fp32: gguf-py's values to the bit, on the first 64 rows of three fixture tensors of the type
    (the interpreter is slow); 16-bit (one tensor): those values rounded once."""
    for where, blocks in tensors_of(name)[:3]:
        blocks = blocks[:64].contiguous()
        expected = dequantize_ref(blocks, name)
        got = tg.dequantize_ggml_triton(blocks.to(DEVICE), name).cpu()
        assert got.shape == expected.shape, where
        np.testing.assert_array_equal(
            got.numpy().view(np.uint32), expected.numpy().view(np.uint32), err_msg=where
        )
    got = tg.dequantize_ggml_triton(blocks.to(DEVICE), name, torch.float16).cpu()
    assert got.dtype == torch.float16 and torch.equal(got, expected.half()), where
    got = tg.dequantize_ggml_triton(blocks.to(DEVICE), name, torch.bfloat16).cpu()
    if torch.cuda.is_available():
        assert torch.equal(got, expected.bfloat16()), where
    else:  # the interpreter converts to bf16 by truncation: within one unit of the last place
        assert ((got.float() - expected).abs() <= expected.abs() * 2**-7).all(), where


def _bound(
    x: torch.Tensor, w: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, m: int
) -> torch.Tensor:
    """fp32 products and sums in another order (relative to the size of the terms summed), plus, in
    16-bit, the output's rounding and, where a dot runs, each weight's."""
    terms = x.abs().double() @ w.abs().double().T
    bound = 1e-5 * (terms + terms.max() * 1e-3)
    if dtype != torch.float32:
        bound = bound + expected.abs() * UNIT[dtype]
        if m > 1:
            bound = bound + terms * UNIT[dtype]
    return bound


def _check(got, x, blocks, name, dtype, what):
    m = x.shape[0]
    assert got.dtype == dtype and got.shape == (m, blocks.shape[0]), what
    w = dequantize_ref(blocks, name)
    expected = ggml_matmul_ref(x.float(), blocks, name)
    err = (got.cpu().double() - expected).abs()
    bound = _bound(x.float(), w, expected, dtype, m)
    assert (err <= bound).all(), f"{what} M={m} {dtype}: max error {err.max():.3g}"


@pytest.mark.parametrize("name", TYPES)
def test_matmul_every_row_count_fp32(name):
    gen = torch.Generator().manual_seed(7)
    cases = cut_cases(name)
    for blocks, what in cases:
        k = in_features(name, blocks.shape[1])
        # Every row count on the whole row; the GEMV and one tile on the cuts at block boundaries.
        for m in ROWS if blocks is cases[-1][0] else [1]:
            x = torch.randn(m, k, generator=gen)
            x[0, :32] *= 50  # one large block
            _check(
                tg.ggml_matmul_triton(x.to(DEVICE), blocks.to(DEVICE), name),
                x,
                blocks,
                name,
                torch.float32,
                what,
            )


@pytest.mark.parametrize("name", TYPES)
def test_matmul_16_bit(name):
    """fp16 on every path; bf16 on the FMA GEMV and the dense path (no interpreter dot)."""
    gen = torch.Generator().manual_seed(8)
    blocks, what = cut_cases(name)[-1]
    k = in_features(name, blocks.shape[1])
    dots = torch.cuda.is_available()
    for dtype, rows in (
        (torch.float16, [1, 8, 300]),
        (torch.bfloat16, [1, 8, 300] if dots else [1, 300]),
    ):
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(dtype)
            _check(tg.ggml_matmul_triton(x.to(DEVICE), blocks.to(DEVICE), name), x, blocks, name, dtype, what)


@pytest.mark.parametrize("name", ["Q6_K", "IQ4_NL"])
@pytest.mark.parametrize("m", [1, 5])
def test_split_k_and_forced_tiles(name, m):
    """Split-K (fp32 partials summed in order) and every tile height give the reference's values."""
    gen = torch.Generator().manual_seed(9)
    blocks, what = cut_cases(name)[-1]
    x = torch.randn(m, in_features(name, blocks.shape[1]), generator=gen)
    xd, bd = x.to(DEVICE), blocks.to(DEVICE)
    for kwargs in ({"split_k": 2}, {"split_k": 64}, {"block_m": 32}, {"block_m": 64, "split_k": 3}):
        _check(
            tg.ggml_matmul_triton(xd, bd, name, **kwargs), x, blocks, name, torch.float32, f"{what} {kwargs}"
        )
    dense = tg.ggml_matmul_triton(xd, bd, name, dense_threshold=0)
    _check(dense, x, blocks, name, torch.float32, f"{what} dense")


def test_leading_dims_and_row_order():
    """[..., K] inputs keep their leading dims; output column n is weight row n."""
    blocks = tensors_of("Q5_K")[0][1][:40]
    x = torch.randn(2, 3, in_features("Q5_K", blocks.shape[1]))
    got = tg.ggml_matmul_triton(x.to(DEVICE), blocks.to(DEVICE), "Q5_K").cpu()
    assert got.shape == (2, 3, 40)
    flipped = tg.ggml_matmul_triton(x.to(DEVICE), blocks.flip(0).contiguous().to(DEVICE), "Q5_K").cpu()
    # Not bit-equal: a tile's dot may sum in another order when its columns change.
    torch.testing.assert_close(flipped, got.flip(-1), rtol=1e-5, atol=1e-5)
    empty = tg.ggml_matmul_triton(x[:0].to(DEVICE), blocks.to(DEVICE), "Q5_K")
    assert empty.shape == (0, 3, 40)


def test_bad_input_is_refused_with_a_reason():
    blocks = tensors_of("Q6_K")[0][1][:8].contiguous()
    k = in_features("Q6_K", blocks.shape[1])
    with pytest.raises(ValueError, match=r"IQ2_XXS.*not supported.*Q4_K"):
        tg.ggml_matmul_triton(torch.randn(1, k), blocks, "IQ2_XXS")
    with pytest.raises(ValueError, match="whole number of 210-byte blocks"):
        tg.ggml_matmul_triton(torch.randn(1, k), blocks[:, :100].contiguous(), "Q6_K")
    with pytest.raises(ValueError, match="in_features K = 256"):
        tg.ggml_matmul_triton(torch.randn(1, 512), blocks, "Q6_K")
    with pytest.raises(ValueError, match="x dtype"):
        tg.ggml_matmul_triton(torch.randn(1, k).double(), blocks, "Q6_K")
    with pytest.raises(ValueError, match="uint8"):
        tg.dequantize_ggml_triton(blocks.view(torch.int8), "Q6_K")
