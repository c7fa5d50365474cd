"""W8A16 kernels: the fp32 reference (checked against a naive loop) and torch's CPU int8pack path.

torch's `_weight_int8pack_mm` crashes the process in bf16 when K is not a multiple of 16, so it is
only ever called here with K % 16 == 0.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.w8a16_matmul import (
    cpu_int8pack_supports,
    dequantize_w8a16_ref,
    w8a16_matmul_cpu,
    w8a16_matmul_ref,
)

from .tolerance import TOL, assert_close_rel


def naive_dequantize(qweight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """w[n, k] = qweight[n, k] * scales[n, k // G], one element at a time."""
    qw, sc = qweight.tolist(), scales.tolist()
    out = torch.empty(qweight.shape, dtype=torch.float64)
    for n in range(qweight.shape[0]):
        for k in range(qweight.shape[1]):
            out[n, k] = qw[n][k] * sc[n][k // group]
    return out


def random_weight(n: int, k: int, group: int, gen: torch.Generator):
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    return qweight, scales


def test_dequantize_ref_hand_computed():
    qweight = torch.tensor([[1, -2, 3, -4], [127, -127, 0, 5]], dtype=torch.int8)
    grouped = torch.tensor([[0.5, 2.0], [1.0, 0.25]])  # G = 2
    assert torch.equal(
        dequantize_w8a16_ref(qweight, grouped),
        torch.tensor([[0.5, -1.0, 6.0, -8.0], [127.0, -127.0, 0.0, 1.25]]),
    )
    per_channel = torch.tensor([[0.5], [2.0]])
    assert torch.equal(
        dequantize_w8a16_ref(qweight, per_channel),
        torch.tensor([[0.5, -1.0, 1.5, -2.0], [254.0, -254.0, 0.0, 10.0]]),
    )


@pytest.mark.parametrize(("n", "k", "group"), [(3, 40, 40), (4, 64, 64), (3, 64, 32), (2, 96, 32)])
def test_dequantize_ref_matches_naive_loop(n, k, group):
    gen = torch.Generator().manual_seed(k + group)
    qweight, scales = random_weight(n, k, group, gen)
    got = dequantize_w8a16_ref(qweight, scales)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    torch.testing.assert_close(got.double(), naive_dequantize(qweight, scales, group), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64])
def test_matmul_ref_matches_naive(dtype, group):
    gen = torch.Generator().manual_seed(3)
    qweight, scales = random_weight(5, 64, group, gen)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    got = w8a16_matmul_ref(x, qweight, scales)
    assert got.dtype == dtype and got.shape == (3, 5)
    assert_close_rel(got, x.double() @ naive_dequantize(qweight, scales, group).T, TOL[dtype])


@pytest.mark.parametrize("k", [16, 64, 576, 1536])
@pytest.mark.parametrize("n", [8, 48, 576])
def test_cpu_int8pack_matches_ref_bf16(n, k):
    assert k % 16 == 0  # never hand int8pack a bf16 shape it crashes on
    assert cpu_int8pack_supports(k, 1) is None
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(n * 7919 + k)
    qweight, scales = random_weight(n, k, k, gen)  # per-channel: scales [N, 1]
    for lead in [(1,), (3,), (17,), (2, 5)]:
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        got = w8a16_matmul_cpu(x, qweight, scales[:, 0].to(dtype))
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert_close_rel(got, w8a16_matmul_ref(x, qweight, scales), TOL[dtype])


def test_cpu_int8pack_supports():
    assert cpu_int8pack_supports(64, 1) is None
    assert cpu_int8pack_supports(1536, 1) is None
    assert "multiple of 16" in cpu_int8pack_supports(40, 1)
    assert "multiple of 16" in cpu_int8pack_supports(24, 1)
    assert "per-channel" in cpu_int8pack_supports(64, 2)
    assert "per-channel" in cpu_int8pack_supports(1536, 48)
