"""Triton per-token activation quantization and the fused residual + RMSNorm (+ smooth) + quantize kernel,
against the torch references (under TRITON_INTERPRET=1 without a GPU).

`quantize_per_token_triton` must equal `quantize_per_token_ref` bit for bit: both divisions are IEEE
round-to-nearest and the rounding is half-to-even like torch.round, so exact ties are tested on
purpose (a row whose max is 127 has scale exactly 1.0, making x.5 inputs exact ties).
The fused kernel reduces in a different order and uses the hardware rsqrt, so there a code may
differ by one where the normed value lies within a few ulp of a rounding boundary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.triton_support import HAS_TRITON
from lowbit.kernels.w8a8_matmul import quantize_per_token_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:  # the kernel modules import triton
    from lowbit.kernels import triton_act_quant
    from lowbit.kernels.triton_act_quant import (
        quantize_per_token_triton,
        rms_norm_quant_ref,
        rms_norm_quant_triton,
    )

EPS = 1e-5


@pytest.fixture
def small_max_block(monkeypatch):
    """Force rows longer than 64 onto the looped (multi-block) path with small shapes."""
    monkeypatch.setattr(triton_act_quant, "_MAX_BLOCK_K", 64)


def assert_codes_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Codes may differ by one at near-ties (reduction order, rsqrt), and only rarely."""
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() <= 1
    assert diff.count_nonzero().item() <= max(1, expected.numel() // 200)


# --- quantize_per_token_triton -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_ties_round_half_to_even(dtype):
    # max 127 -> scale exactly 1.0, so each code is round(value) and every .5 is an exact tie.
    values = [0.5, 1.5, 2.5, -2.5, 3.5, -0.5, 126.5, -125.5, 127.0, 0.0, -127.0, 4.25]
    codes = [0, 2, 2, -2, 4, 0, 126, -126, 127, 0, -127, 4]
    x = torch.tensor([values], dtype=dtype)
    xq, scale = quantize_per_token_triton(x)
    assert xq.tolist() == [codes]
    assert scale.tolist() == [[1.0]]
    ref_q, ref_scale = quantize_per_token_ref(x)
    assert torch.equal(xq, ref_q) and torch.equal(scale, ref_scale)


def test_quantize_just_below_half_rounds_down():
    # floor(v + 0.5) would round the largest float below k + 0.5 up, because v + 0.5 rounds to k + 1.
    below = [torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item() for v in (0.5, 2.5, -1.5)]
    x = torch.tensor([[*below, 127.0]], dtype=torch.float32)
    xq, _ = quantize_per_token_triton(x)
    assert xq.tolist() == [[0, 2, -1, 127]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("looped", [False, True], ids=["one-block", "looped"])
def test_quantize_matches_ref(dtype, looped, request):
    if looped:
        request.getfixturevalue("small_max_block")  # K = 100 walks two blocks of 64
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 100, generator=gen) * torch.logspace(-3, 2, 6)[:, None]).to(dtype)
    x[2] = 0  # an all-zero row: scale clamps at 1e-10, codes 0
    x[4, 17] = 300.0  # an outlier row
    xq, scale = quantize_per_token_triton(x)
    ref_q, ref_scale = quantize_per_token_ref(x)
    assert xq.dtype == torch.int8 and xq.shape == (6, 100)
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    assert torch.equal(xq, ref_q)
    assert torch.equal(scale, ref_scale)
    assert scale[2].item() == pytest.approx(1e-10) and not xq[2].any()


def test_quantize_long_row_several_blocks_and_leading_dims(small_max_block):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 300, generator=gen, dtype=torch.float32)  # [..., K], K = 4.7 blocks
    xq, scale = quantize_per_token_triton(x)
    ref_q, ref_scale = quantize_per_token_ref(x)
    assert xq.shape == (2, 3, 300) and scale.shape == (2, 3, 1)
    assert torch.equal(xq, ref_q) and torch.equal(scale, ref_scale)


def test_quantize_strided_rows():
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(5, 160, generator=gen, dtype=torch.float16)
    x = wide[:, 10:110]  # [5, 100], row stride 160
    xq, scale = quantize_per_token_triton(x)
    ref_q, ref_scale = quantize_per_token_ref(x)
    assert torch.equal(xq, ref_q) and torch.equal(scale, ref_scale)


def test_quantize_errors():
    with pytest.raises(ValueError, match=r"x must be float16, bfloat16 or float32, got torch.int8"):
        quantize_per_token_triton(torch.zeros(2, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"non-empty last dimension, got shape \(2, 0\)"):
        quantize_per_token_triton(torch.zeros(2, 0))


# --- rms_norm_quant_ref (the spec) ---------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_rms_norm_quant_ref_matches_composition(with_residual, with_smooth):
    gen = torch.Generator().manual_seed(11)
    M, K = 4, 96
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    weight = torch.rand(K, generator=gen) + 0.5
    residual = torch.randn(M, K, generator=gen) * 3 if with_residual else None
    smooth = torch.rand(K, generator=gen) * 4 + 0.25 if with_smooth else None
    # Independent composition: out-of-place add, torch's fused rms_norm, then the quantize spec.
    expected_res = x.float() + residual if with_residual else x.float()
    normed = F.rms_norm(expected_res, (K,), weight, EPS)
    if with_smooth:
        normed = normed / smooth
    expected_q, expected_scale = quantize_per_token_ref(normed)

    res_in = residual.clone() if with_residual else None
    xq, scale, res_out = rms_norm_quant_ref(x, weight, EPS, res_in, smooth)
    assert torch.equal(res_out, expected_res)
    if with_residual:
        assert res_out is res_in  # updated in place
    torch.testing.assert_close(scale, expected_scale, rtol=1e-5, atol=0)
    assert_codes_close(xq, expected_q)


# --- rms_norm_quant_triton -----------------------------------------------------------------------


CASES = [
    # (x dtype, K, residual, smooth, looped)
    (torch.float32, 100, False, False, False),
    (torch.float16, 100, True, False, False),
    (torch.bfloat16, 100, True, True, False),
    (torch.float16, 300, True, True, True),
    (torch.float32, 300, False, True, True),
]


@pytest.mark.parametrize(("dtype", "K", "with_residual", "with_smooth", "looped"), CASES)
def test_rms_norm_quant_matches_ref(dtype, K, with_residual, with_smooth, looped, request):
    if looped:
        request.getfixturevalue("small_max_block")
    gen = torch.Generator().manual_seed(K + 2 * with_residual + with_smooth)
    M = 5
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    weight = torch.rand(K, generator=gen) + 0.5
    smooth = torch.rand(K, generator=gen) * 4 + 0.25 if with_smooth else None
    residual = torch.randn(M, K, generator=gen) * 5 if with_residual else None
    if with_residual:
        x[3] = 0
        residual[3] = 0  # an all-zero row after the add: scale 1e-10, codes 0
    else:
        x[3] = 0

    res_kernel = residual.clone() if with_residual else None
    res_ref = residual.clone() if with_residual else None
    xq, scale, res_out = rms_norm_quant_triton(x, weight, EPS, res_kernel, smooth)
    ref_q, ref_scale, ref_res = rms_norm_quant_ref(x, weight, EPS, res_ref, smooth)

    assert xq.dtype == torch.int8 and xq.shape == (M, K)
    assert scale.dtype == torch.float32 and scale.shape == (M, 1)
    assert res_out.dtype == torch.float32 and res_out.shape == (M, K)
    # fp32 + upcast x is one correctly rounded add in both: exact.
    expected_res = residual + x.float() if with_residual else x.float()
    assert torch.equal(res_out, expected_res) and torch.equal(ref_res, expected_res)
    if with_residual:
        assert res_out is res_kernel  # in place, not a copy
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert scale[3].item() == pytest.approx(1e-10) and not xq[3].any()
    assert_codes_close(xq, ref_q)


def test_rms_norm_quant_strided_in_place_residual():
    gen = torch.Generator().manual_seed(2)
    M, K = 3, 80
    x = torch.randn(M, K + 16, generator=gen, dtype=torch.float16)[:, 8 : 8 + K]  # row stride K + 16
    buffer = torch.randn(M, 2 * K, generator=gen)
    residual = buffer[:, :K]  # a strided view: the update must land in `buffer`
    before = buffer.clone()
    weight = torch.rand(K, generator=gen) + 0.5
    xq, scale, res_out = rms_norm_quant_triton(x, weight, EPS, residual)
    assert res_out is residual
    assert torch.equal(buffer[:, :K], before[:, :K] + x.float())
    assert torch.equal(buffer[:, K:], before[:, K:])  # the other half of the buffer is untouched
    ref_q, ref_scale, _ = rms_norm_quant_ref(x, weight, EPS, before[:, :K].clone())
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert_codes_close(xq, ref_q)


def test_rms_norm_quant_errors():
    x = torch.randn(2, 8)
    w = torch.ones(8)
    fn = "rms_norm_quant_triton"
    with pytest.raises(ValueError, match=rf"{fn}: x must be \[M, K\] with K > 0, got shape \(2, 2, 8\)"):
        rms_norm_quant_triton(torch.randn(2, 2, 8), w, EPS)
    with pytest.raises(ValueError, match=rf"{fn}: x must be float16, bfloat16 or float32, got torch.int32"):
        rms_norm_quant_triton(torch.ones(2, 8, dtype=torch.int32), w, EPS)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        rms_norm_quant_triton(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match=r"weight must be float32, got torch.float16"):
        rms_norm_quant_triton(x, w.half(), EPS)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 8\), got \(3, 8\)"):
        rms_norm_quant_triton(x, w, EPS, residual=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"residual must be float32, got torch.bfloat16"):
        rms_norm_quant_triton(x, w, EPS, residual=torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"smooth must have shape \(8,\), got \(8, 1\)"):
        rms_norm_quant_triton(x, w, EPS, smooth=torch.ones(8, 1))
