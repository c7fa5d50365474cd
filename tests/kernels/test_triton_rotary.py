"""Triton rotary in place (kernels/triton_rotary.py) against `rotary_ref`, and the reference against
the engine's runtime.layers.rotary.apply_rotary on RotaryEmbedding's own tables. Runs in Triton's
interpreter on CPU (no tl.dot here, so bf16 is covered too)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.triton_support import HAS_TRITON
from lowbit.runtime.layers.rotary import RotaryEmbedding, apply_rotary, inverse_frequencies
from lowbit.runtime.models.config import RopeScaling

from .tolerance import assert_close_rel

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
if HAS_TRITON:
    from lowbit.kernels.triton_rotary import rotary_ref, rotary_triton

# The default model's attention: 9 q heads, 3 k heads, 3 v heads of D = 64, rope base 100000.
Q_HEADS, KV_HEADS, HEAD_DIM, THETA = 9, 3, 64, 100000.0
# Relative to max|ref| (see assert_close_rel). fp32: the GPU may fuse a multiply-add (~1 ulp).
# 16-bit: the same fp32 value rounded once, at most one ulp apart at a rounding boundary
# (fp16 ulp 2^-11 ~ 4.9e-4 relative, bf16 2^-8 ~ 3.9e-3).
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tables(positions: list[int], head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's cos, sin [T, 1, D] for these positions."""
    inv_freq = inverse_frequencies(head_dim, THETA, RopeScaling())
    rope = RotaryEmbedding(inv_freq, torch.device("cpu"))
    return rope.tables(torch.tensor(positions))


def fused_heads(tokens: int, dtype: torch.dtype, seed: int, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """A fused qkv output [T, hidden + 2 * kv_hidden] viewed as heads [T, H + 2 Hkv, D], like Attention."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (Q_HEADS + 2 * KV_HEADS) * head_dim, generator=gen) * 2
    return qkv.to(dtype).view(tokens, Q_HEADS + 2 * KV_HEADS, head_dim)


def test_reference_matches_apply_rotary():
    positions = [0, 1, 7, 300, 8191]
    cos, sin = tables(positions)
    heads = fused_heads(len(positions), torch.float32, seed=1)
    rotated = Q_HEADS + KV_HEADS
    out = rotary_ref(heads, cos, sin, rotated)
    assert torch.equal(out[:, :rotated], apply_rotary(heads[:, :rotated], cos, sin))
    assert torch.equal(out[:, rotated:], heads[:, rotated:])
    # [T, D] tables give the same answer as [T, 1, D].
    assert torch.equal(rotary_ref(heads, cos[:, 0], sin[:, 0], rotated), out)


def test_reference_hand_computed():
    """Position 1 with D = 4: pairs (x0, x2) and (x1, x3) rotate by angles 1 and 1 / sqrt(theta)."""
    heads = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    angles = torch.tensor([1.0, THETA**-0.5, 1.0, THETA**-0.5])
    c, s = angles.cos(), angles.sin()
    expected = torch.stack([
        1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[2] + 1 * s[2], 4 * c[3] + 2 * s[3],
    ])  # fmt: skip
    cos, sin = tables([0, 1], head_dim=4)
    out = rotary_ref(heads, cos[1:], sin[1:], 1)
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions", [[5], [0, 3, 17, 100, 2049]])  # one decode token; a ragged prefill
def test_rotates_q_and_k_in_place_and_leaves_v_untouched(dtype, positions):
    cos, sin = tables(positions)
    heads = fused_heads(len(positions), dtype, seed=len(positions))
    buffer = heads.view(len(positions), -1)  # the fused qkv buffer the heads view came from
    expected = rotary_ref(heads, cos, sin, Q_HEADS + KV_HEADS)
    v_before = heads[:, Q_HEADS + KV_HEADS :].clone()
    rotary_triton(heads, cos, sin, Q_HEADS + KV_HEADS)
    assert heads.data_ptr() == buffer.data_ptr()
    assert torch.equal(heads[:, Q_HEADS + KV_HEADS :], v_before)  # v bit for bit
    assert_close_rel(heads, expected, TOL[dtype])
    # Against the engine's own math, cast back to the buffer's dtype.
    engine = apply_rotary(fused_heads(len(positions), dtype, seed=len(positions))[:, : Q_HEADS + KV_HEADS],
                          cos, sin).to(dtype)  # fmt: skip
    assert_close_rel(heads[:, : Q_HEADS + KV_HEADS], engine, TOL[dtype])


@pytest.mark.parametrize("head_dim", [128, 48])  # 48: the half (24) is not a power of two, masked
def test_other_head_dims_and_2d_tables(head_dim):
    positions = [2, 9, 40]
    cos, sin = tables(positions, head_dim)
    heads = fused_heads(len(positions), torch.float16, seed=head_dim, head_dim=head_dim)
    expected = rotary_ref(heads, cos, sin, Q_HEADS)  # only q: k and v untouched
    rotary_triton(heads, cos[:, 0], sin[:, 0], Q_HEADS)
    assert torch.equal(heads[:, Q_HEADS:], expected[:, Q_HEADS:])
    assert_close_rel(heads, expected, TOL[torch.float16])


def test_arbitrary_tables():
    """Random cos/sin whose two halves differ (the engine's tables repeat them), so a kernel that read
    the wrong half of a table would show."""
    gen = torch.Generator().manual_seed(6)
    cos, sin = torch.randn(3, HEAD_DIM, generator=gen), torch.randn(3, HEAD_DIM, generator=gen)
    heads = fused_heads(3, torch.float32, seed=6)
    expected = rotary_ref(heads, cos, sin, Q_HEADS + KV_HEADS)
    rotary_triton(heads, cos, sin, Q_HEADS + KV_HEADS)
    assert_close_rel(heads, expected, TOL[torch.float32])


def test_many_heads_span_several_programs():
    """More rotated heads than one program's block (16): the ragged last block is masked."""
    positions = [1, 4]
    cos, sin = tables(positions)
    gen = torch.Generator().manual_seed(3)
    heads = torch.randn(len(positions), 40, HEAD_DIM, generator=gen)
    expected = rotary_ref(heads, cos, sin, 37)
    rotary_triton(heads, cos, sin, 37)
    assert torch.equal(heads[:, 37:], expected[:, 37:])
    assert_close_rel(heads, expected, TOL[torch.float32])


def test_strided_view():
    """A non-contiguous view: every other token of a larger buffer; the skipped tokens stay as they were."""
    positions = [3, 8, 13]
    cos, sin = tables(positions)
    full = fused_heads(2 * len(positions), torch.bfloat16, seed=4)
    before = full.clone()
    heads = full[::2]
    expected = rotary_ref(heads, cos, sin, Q_HEADS + KV_HEADS)
    rotary_triton(heads, cos, sin, Q_HEADS + KV_HEADS)
    assert torch.equal(full[1::2], before[1::2])
    assert_close_rel(heads, expected, TOL[torch.bfloat16])


def test_nothing_to_rotate():
    cos, sin = tables([0, 1])
    heads = fused_heads(2, torch.float16, seed=2)
    before = heads.clone()
    rotary_triton(heads, cos, sin, 0)
    assert torch.equal(heads, before)
    rotary_triton(heads[:0], cos[:0], sin[:0], Q_HEADS)  # no tokens


def bad_call(heads=None, cos=None, sin=None, rotated=Q_HEADS + KV_HEADS):
    cos_ok, sin_ok = tables([0, 1])
    heads = fused_heads(2, torch.float16, seed=0) if heads is None else heads
    rotary_triton(heads, cos_ok if cos is None else cos, sin_ok if sin is None else sin, rotated)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": torch.zeros(2, 8 * 15)}, r"heads must be \[T, num_heads_total, D\]"),
        ({"heads": torch.zeros(2, 15, 64, dtype=torch.int8)}, "heads must be float16"),
        ({"heads": torch.zeros(2, 15, 63)}, "D must be even"),
        ({"rotated": 16}, r"num_rotated_heads must be in \[0, 15\]"),
        ({"rotated": -1}, r"num_rotated_heads must be in \[0, 15\]"),
        ({"cos": torch.zeros(3, 64)}, r"cos must be \[T, D\] = \[2, 64\]"),
        ({"sin": torch.zeros(2, 2, 64)}, r"sin must be \[T, D\] = \[2, 64\]"),
        ({"cos": torch.zeros(2, 32)}, r"cos must be \[T, D\]"),
        ({"cos": torch.zeros(2, 64, dtype=torch.float16)}, "cos must be float32"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bad_call(**kwargs)
