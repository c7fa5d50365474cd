"""W4A16 kernels: int4 packing, the fp32 reference, and torch's CPU int4pack (tinygemm) path.

The reference itself is checked against a naive per-element dequantization written here (reading the
nibbles out of the bytes with Python ints), so a packing or layout mistake cannot hide in both.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.w4a16_matmul import (
    CPU_GROUP_SIZES,
    cpu_int4pack_supports,
    dequantize_w4a16_ref,
    pack_int4,
    pack_w4a16_cpu,
    unpack_int4,
    w4a16_matmul_cpu,
    w4a16_matmul_ref,
)

from .tolerance import TOL, assert_close_rel


def naive_dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int):
    """w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G], q = nibble k % 2 of byte k // 2."""
    rows, half = qweight.shape
    qb, sc, mn = qweight.tolist(), scales.tolist(), mins.tolist()
    out = torch.empty(rows, 2 * half, dtype=torch.float64)
    for n in range(rows):
        for k in range(2 * half):
            byte = qb[n][k // 2]
            q = (byte >> (4 * (k % 2))) & 0xF
            out[n, k] = q * sc[n][k // group] + mn[n][k // group]
    return out


def random_weight(n: int, k: int, group: int, gen: torch.Generator):
    """A canonical W4A16 weight with realistic scales and mins (Q4_1 / GPTQ-like zero points)."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    mins = -zero * scales + torch.randn(n, k // group, generator=gen) * 0.01
    return q, pack_int4(q), scales, mins


# --- packing -----------------------------------------------------------------------------------


def test_pack_int4_hand_checked_bytes():
    q = torch.tensor([[1, 2, 15, 0, 0, 15, 10, 5]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    # Low nibble first: [1, 2] -> 0x21, [15, 0] -> 0x0F, [0, 15] -> 0xF0, [10, 5] -> 0x5A.
    assert packed.tolist() == [[0x21, 0x0F, 0xF0, 0x5A]]
    assert unpack_int4(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)).tolist() == [[1, 2, 0, 15]]


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 10), generator=gen, dtype=torch.uint8)
    assert pack_int4(q).shape == (7, 5)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    # Every byte value survives unpack -> pack, so no bit is lost or moved.
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    unpacked = unpack_int4(every_byte)
    assert unpacked.shape == (4, 128)
    assert int(unpacked.max()) == 15
    assert torch.equal(pack_int4(unpacked), every_byte)


def test_pack_int4_rejects_odd_columns():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


# --- the reference against independent computations ---------------------------------------------


def test_dequantize_ref_hand_computed():
    qweight = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # q = [1, 2, 0, 15]
    scales = torch.tensor([[0.5, 2.0]])
    mins = torch.tensor([[-1.0, 3.0]])
    # group 0: [1 * 0.5 - 1, 2 * 0.5 - 1]; group 1: [0 * 2 + 3, 15 * 2 + 3]
    expected = torch.tensor([[-0.5, 0.0, 3.0, 33.0]])
    assert torch.equal(dequantize_w4a16_ref(qweight, scales, mins, 2), expected)


@pytest.mark.parametrize(("n", "k", "group"), [(3, 8, 4), (4, 16, 8), (2, 12, 12)])
def test_dequantize_ref_matches_naive_loop(n, k, group):
    gen = torch.Generator().manual_seed(1)
    _, qweight, scales, mins = random_weight(n, k, group, gen)
    got = dequantize_w4a16_ref(qweight, scales, mins, group)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    torch.testing.assert_close(
        got.double(), naive_dequantize(qweight, scales, mins, group), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_ref_matches_naive(dtype):
    gen = torch.Generator().manual_seed(2)
    n, k, group = 6, 16, 8
    _, qweight, scales, mins = random_weight(n, k, group, gen)
    x = torch.randn(3, k, generator=gen).to(dtype)
    got = w4a16_matmul_ref(x, qweight, scales, mins, group)
    assert got.dtype == dtype and got.shape == (3, n)
    expected = x.double() @ naive_dequantize(qweight, scales, mins, group).T
    assert_close_rel(got, expected, TOL[dtype])


# --- the CPU int4pack path against the reference -------------------------------------------------

SHAPES = [
    (n, k, g) for n in (16, 48, 576) for k in (32, 64, 576, 1536) for g in CPU_GROUP_SIZES if k % g == 0
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("n", "k", "group"), SHAPES)
def test_cpu_int4pack_matches_ref(n, k, group, dtype):
    assert cpu_int4pack_supports(n, k, group) is None
    gen = torch.Generator().manual_seed(n * 10007 + k * 31 + group)
    _, qweight, scales, mins = random_weight(n, k, group, gen)
    packed, scales_and_zeros = pack_w4a16_cpu(qweight, scales, mins, dtype)
    assert scales_and_zeros.shape == (k // group, n, 2) and scales_and_zeros.dtype == dtype
    for lead in [(1,), (3,), (17,), (2, 5)]:
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        got = w4a16_matmul_cpu(x, packed, scales_and_zeros, group)
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert_close_rel(got, w4a16_matmul_ref(x, qweight, scales, mins, group), TOL[dtype])


def test_cpu_int4pack_uses_every_group_scale():
    """Groups must not be mixed up: a weight whose only non-trivial group is the last one."""
    n, k, group = 16, 128, 32
    q = torch.full((n, k), 8, dtype=torch.uint8)
    q[:, -group:] = 15
    scales = torch.ones(n, k // group) * 0.25
    scales[:, -1] = torch.arange(1, n + 1, dtype=torch.float32)
    mins = -8.0 * scales  # q = 8 -> w = 0 in groups 0..2; q = 15 -> w = 7 * scale in group 3
    x = torch.ones(1, k)
    expected = 7.0 * group * torch.arange(1, n + 1, dtype=torch.float32)[None, :]
    assert torch.equal(w4a16_matmul_ref(x, pack_int4(q), scales, mins, group), expected)
    packed, scales_and_zeros = pack_w4a16_cpu(pack_int4(q), scales, mins, torch.float32)
    assert_close_rel(w4a16_matmul_cpu(x, packed, scales_and_zeros, group), expected, TOL[torch.float32])


def test_cpu_int4pack_supports():
    assert cpu_int4pack_supports(48, 576, 64) is None
    for n in (8, 24, 40):
        assert "out_features" in cpu_int4pack_supports(n, 64, 32)
    assert "group size" in cpu_int4pack_supports(16, 64, 16)
    assert "group size" in cpu_int4pack_supports(16, 512, 512)
    assert "multiple of group size" in cpu_int4pack_supports(16, 96, 64)
