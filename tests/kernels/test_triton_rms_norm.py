"""Triton add + RMSNorm (kernels/triton_rms_norm.py) against `add_rms_norm_ref`, and the reference
against a hand-written x * rsqrt(mean(x^2) + eps) * w in float64. Runs in Triton's interpreter on CPU
(no tl.dot here, so bf16 inputs are covered too)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.triton_support import HAS_TRITON

from .tolerance import assert_close_rel

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
if HAS_TRITON:
    from lowbit.kernels.rms_norm_ref import add_rms_norm_ref
    from lowbit.kernels.triton_rms_norm import MAX_BLOCK, add_rms_norm_triton

EPS = 1e-5
# Relative to max|ref| (see assert_close_rel). fp32: only the summation order and rsqrt differ (~1e-6).
# 16-bit outputs: the same fp32 value rounded once, so at most one ulp at a rounding boundary
# (fp16 ulp 2^-11 ~ 4.9e-4 relative, bf16 2^-8 ~ 3.9e-3).
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(rows: int, hidden: int, x_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(x_dtype)
    residual = torch.randn(rows, hidden, generator=gen) * 20  # the stream grows large: keep it fp32
    weight = torch.randn(hidden, generator=gen)
    return x, residual, weight


def manual_rms_norm(residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 ground truth written out by hand, independent of F.rms_norm."""
    r = residual.double()
    return r * torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_manual_formula(out_dtype):
    x, residual, weight = make_inputs(3, 96, torch.float16, seed=1)
    expected_residual = residual + x.double()
    normed, new_residual = add_rms_norm_ref(x, residual, weight, EPS, out_dtype)
    assert new_residual is residual and normed.dtype == out_dtype
    # One correctly rounded fp32 addition per element: within half an fp32 ulp of the exact sum.
    torch.testing.assert_close(new_residual.double(), expected_residual, rtol=2**-24, atol=0)
    assert_close_rel(normed, manual_rms_norm(expected_residual, weight, EPS), OUT_TOL[out_dtype])


CASES = [
    # (rows, hidden, block_size): None picks the launcher's block (one block per row).
    (5, 576, None),  # the default model's hidden: not a power of two, ragged in its 1024 block
    (3, 96, None),
    (3, 96, 32),  # multi-block path, hidden an exact multiple of the block
    (2, 576, 256),  # multi-block path with a ragged last block (576 = 2 * 256 + 64)
]


@pytest.mark.parametrize(("rows", "hidden", "block_size"), CASES)
@pytest.mark.parametrize(
    ("x_dtype", "out_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
     (torch.bfloat16, torch.float32)],
)  # fmt: skip
def test_with_residual_updates_in_place(rows, hidden, block_size, x_dtype, out_dtype):
    x, residual, weight = make_inputs(rows, hidden, x_dtype, seed=rows * hidden)
    x_before = x.clone()
    ref_normed, ref_residual = add_rms_norm_ref(x, residual.clone(), weight, EPS, out_dtype)
    normed, new_residual = add_rms_norm_triton(x, residual, weight, EPS, out_dtype, block_size=block_size)
    assert new_residual is residual  # the same object, updated in place
    assert torch.equal(residual, ref_residual)  # the same fp32 additions: bit for bit
    assert torch.equal(x, x_before)
    assert normed.dtype == out_dtype and normed.shape == (rows, hidden)
    assert_close_rel(normed, ref_normed, OUT_TOL[out_dtype])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 64])
def test_without_residual_returns_x_as_fp32(x_dtype, block_size):
    x, _, weight = make_inputs(3, 96, x_dtype, seed=7)
    normed, residual = add_rms_norm_triton(x, None, weight, EPS, x_dtype, block_size=block_size)
    assert residual.dtype == torch.float32 and torch.equal(residual, x.float())
    ref_normed, _ = add_rms_norm_ref(x, None, weight, EPS, x_dtype)
    assert_close_rel(normed, ref_normed, OUT_TOL[x_dtype])


def test_row_longer_than_the_largest_block():
    hidden = MAX_BLOCK + 96  # loops over two blocks, the second one mostly masked
    x, residual, weight = make_inputs(2, hidden, torch.bfloat16, seed=11)
    ref_normed, ref_residual = add_rms_norm_ref(x, residual.clone(), weight, EPS, torch.bfloat16)
    normed, _ = add_rms_norm_triton(x, residual, weight, EPS, torch.bfloat16)
    assert torch.equal(residual, ref_residual)
    assert_close_rel(normed, ref_normed, OUT_TOL[torch.bfloat16])


def test_strided_inputs():
    """Views with row strides wider than the row, and a transposed (column-strided) x."""
    x_wide, residual_wide, weight = make_inputs(4, 2 * 96, torch.float16, seed=5)
    x, residual = x_wide[:, :96], residual_wide[:, 96:]  # row stride 192
    x_t = x.t().contiguous().t()  # same values, column stride = rows
    untouched = residual_wide[:, :96].clone()
    ref_normed, ref_residual = add_rms_norm_ref(x, residual.clone(), weight[:96], EPS, torch.float16)
    normed, _ = add_rms_norm_triton(x_t, residual, weight[:96], EPS, torch.float16)
    assert torch.equal(residual, ref_residual)
    assert torch.equal(residual_wide[:, :96], untouched)  # the other half of the buffer is never written
    assert_close_rel(normed, ref_normed, OUT_TOL[torch.float16])


def test_zero_rows():
    weight = torch.ones(96)
    normed, residual = add_rms_norm_triton(torch.zeros(0, 96), None, weight, EPS, torch.float16)
    assert normed.shape == (0, 96) and normed.dtype == torch.float16 and residual.shape == (0, 96)


@pytest.mark.parametrize(
    ("x", "residual", "weight", "out_dtype", "match"),
    [
        (torch.zeros(2, 3, 8), None, torch.ones(8), torch.float32, r"x must be \[T, hidden\]"),
        (torch.zeros(2, 8, dtype=torch.int8), None, torch.ones(8), torch.float32, "x must be float16"),
        (torch.zeros(2, 8), None, torch.ones(7), torch.float32, r"weight must be \[hidden\] = \[8\]"),
        (torch.zeros(2, 8), None, torch.ones(8, dtype=torch.half), torch.float32, "weight must be float32"),
        (torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), torch.float32, "residual shape"),
        (torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), torch.float32,
         "residual must be float32"),
        (torch.zeros(2, 8), None, torch.ones(8), torch.int32, "out_dtype must be"),
        (torch.zeros(2, 0), None, torch.ones(0), torch.float32, "hidden size 0"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(x, residual, weight, out_dtype, match):
    with pytest.raises(ValueError, match=match):
        add_rms_norm_triton(x, residual, weight, EPS, out_dtype)


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        add_rms_norm_triton(torch.zeros(1, 96), None, torch.ones(96), EPS, torch.float32, block_size=48)
