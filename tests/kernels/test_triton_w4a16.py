"""Fused Triton W4A16 kernels (kernels/triton_w4a16.py) against `w4a16_matmul_ref` / `dequantize_w4a16_ref`.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; with CUDA they
run on the GPU. The reference is fed the scales and mins rounded to the dtype the weight is packed for
(that rounding is a documented packing choice), so the bounds below measure the kernels alone.

bf16 and the tl.dot paths: Triton's interpreter computes `tl.dot` on bf16 operands wrongly (measured),
and the M > 1 paths feed bf16 weights to tl.dot on GPU (tensor cores; casting to fp32 first would
defeat them). So under the interpreter bf16 is covered where no dot runs (the M == 1 FMA GEMV and the
dequantize kernel) and the bf16 dot paths are `gpu`-marked tests that run where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.triton_support import HAS_TRITON
from lowbit.kernels.w4a16_matmul import dequantize_w4a16_ref, w4a16_matmul_ref

from .tolerance import assert_close_rel

if HAS_TRITON:  # the kernel module imports triton
    from lowbit.kernels import triton_w4a16 as tw

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# assert_close_rel bounds (relative to |ref| + max |ref|); the reference is fp32 math on the same stored
# scales/mins. Measured worst over 6 seeds at N = 80, K = 256 under the interpreter: fp32 3.4e-7
# (summation order only); fp16 3.6e-4 (the dot paths round each dequantized weight to fp16, 2^-11,
# and the output is rounded to fp16). bf16 has 8 mantissa bits: output rounding 2^-8 (the interpreter
# truncates: up to 2^-7) and on GPU bf16 weights in the dot. A wrong nibble, group or column is O(1).
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def canonical_bytes(q: torch.Tensor) -> torch.Tensor:
    """int codes [N, K] -> canonical uint8 [N, K/2]: column 2i in the low nibble of byte i, 2i+1 high.
    Written out here (not via pack_int4) so that a packing mistake cannot hide in kernel and reference."""
    q = q.to(torch.int32)
    return (q[:, 0::2] + 16 * q[:, 1::2]).to(torch.uint8)


def make_weight(n: int, k: int, group: int, seed: int):
    """Integer codes [N, K], canonical qweight, and realistic fp32 scales / mins (GPTQ / Q4_1 style)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    mins = -zero * scales + torch.randn(n, k // group, generator=gen) * 0.01
    return q, canonical_bytes(q), scales, mins


class Case:
    """One packed weight plus the fp32 reference inputs it corresponds to."""

    def __init__(self, n, k, group, dtype, act_order=False, seed=0):
        self.n, self.k, self.group, self.dtype = n, k, group, dtype
        self.q, self.qweight, scales, mins = make_weight(n, k, group, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.perm = torch.randperm(k, generator=gen) if act_order else None
        self.packed = tw.pack_w4a16_triton(
            self.qweight.to(DEVICE),
            scales.to(DEVICE),
            mins.to(DEVICE),
            group,
            dtype,
            None if self.perm is None else self.perm.to(DEVICE),
        )
        # What the packed weight holds: scales and mins rounded to the activation dtype.
        self.scales = scales.to(dtype).float()
        self.mins = mins.to(dtype).float()
        self.gen = gen

    def x(self, *lead: int) -> torch.Tensor:
        return torch.randn(*lead, self.k, generator=self.gen).to(self.dtype)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[..., self.perm]
        return w4a16_matmul_ref(x, self.qweight, self.scales, self.mins, self.group)

    def check(self, y: torch.Tensor, x: torch.Tensor) -> None:
        assert y.dtype == self.dtype and y.shape == (*x.shape[:-1], self.n)
        assert_close_rel(y.cpu(), self.expected(x), KERNEL_TOL[self.dtype])


def gemv(case, x, **kw):
    return tw.w4a16_gemv_triton(x.to(DEVICE), case.packed, case.group, **kw)


def gemm(case, x, **kw):
    return tw.w4a16_gemm_triton(x.to(DEVICE), case.packed, case.group, **kw)


# --- the reference and the packed layout, against what the test builds from integer codes ------------


def test_reference_matches_float64_from_codes():
    n, k, group = 24, 96, 32
    q, qweight, scales, mins = make_weight(n, k, group, seed=3)
    w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(4))
    expected = x.double() @ w.T
    assert_close_rel(w4a16_matmul_ref(x, qweight, scales, mins, group), expected, 1e-6)


def test_packed_layout_matches_header():
    """Word r of 128-column block b holds column 128 b + 16 j + r in bits 4j..4j+3; padding is 0."""
    n, k, group = 3, 160, 32
    q, qweight, scales, mins = make_weight(n, k, group, seed=5)
    packed = tw.pack_w4a16_triton(qweight, scales, mins, group, torch.float16)
    words = torch.zeros(256 // 8, n, dtype=torch.int64)
    for b in range(2):
        for r in range(16):
            for j in range(8):
                col = 128 * b + 16 * j + r
                if col < k:
                    words[16 * b + r] += q[:, col].long() << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert packed["qweight"].dtype == torch.int32 and torch.equal(packed["qweight"], words)
    assert torch.equal(packed["scales"], scales.T.to(torch.float16))
    assert torch.equal(packed["mins"], mins.T.to(torch.float16))
    assert "perm" not in packed


# --- the GEMV / split-K path (M <= 16) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "dtype"),
    [(1, torch.float32), (1, torch.float16), (1, torch.bfloat16), (5, torch.float32), (5, torch.float16)],
    ids=["m1-fp32", "m1-fp16", "m1-bf16", "m5-fp32", "m5-fp16"],
)
@pytest.mark.parametrize(("n", "k"), [(48, 160), (80, 96)])
def test_gemv(m, dtype, n, k):
    case = Case(n, k, 32, dtype, seed=n + k + m)
    x = case.x(m)
    case.check(gemv(case, x), x)
    if k > 128:  # two K blocks: one split each
        case.check(gemv(case, x, split_k=2), x)


# --- the tiled path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gemm_ragged(dtype):
    case = Case(80, 160, 32, dtype, seed=7)
    x = case.x(37)
    case.check(gemm(case, x, block_m=32, block_n=64), x)  # 2 x 2 tiles, both ragged, 2 K blocks
    case.check(gemm(case, x, block_m=16, block_n=64, split_k=2), x)


# --- group sizes: inside a 128-column block, equal to it, spanning blocks, not a multiple of 16 -------


@pytest.mark.parametrize(
    ("group", "k"),
    [(32, 160), (64, 192), (128, 256), (96, 192), (40, 160), (6, 102)],
    ids=["g32", "g64", "g128", "g96-spans-blocks", "g40-gather", "g6-k102"],
)
def test_group_sizes(group, k):
    case = Case(48, k, group, torch.float32, seed=group)
    x1, x20 = case.x(1), case.x(20)
    case.check(gemv(case, x1), x1)
    case.check(gemm(case, x20, block_m=16), x20)


def test_every_group_scale_is_used():
    """Only the last group of each row is non-zero: a weight read with a wrong group gives ~0."""
    n, k, group = 48, 256, 32
    q = torch.full((n, k), 8, dtype=torch.int32)
    q[:, -group:] = 15
    scales = torch.full((n, k // group), 0.25)
    scales[:, -1] = torch.arange(1, n + 1, dtype=torch.float32)
    mins = -8.0 * scales  # q = 8 -> 0 everywhere but the last group, where w = 7 * scale
    packed = tw.pack_w4a16_triton(
        canonical_bytes(q).to(DEVICE), scales.to(DEVICE), mins.to(DEVICE), group, torch.float32
    )
    x = torch.ones(1, k, device=DEVICE)
    expected = 7.0 * group * torch.arange(1, n + 1, dtype=torch.float32)[None, :]
    assert_close_rel(tw.w4a16_gemv_triton(x, packed, group).cpu(), expected, 1e-6)


# --- act-order -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_act_order(dtype, monkeypatch):
    case = Case(48, 160, 32, dtype, act_order=True, seed=11)
    assert case.packed["perm"].dtype == torch.int32
    for m in (1, 5):
        x = case.x(m)
        case.check(gemv(case, x), x)
    x = case.x(37)
    case.check(gemm(case, x, block_m=32), x)
    monkeypatch.setattr(tw, "DENSE_M_THRESHOLD", 16)
    case.check(tw.w4a16_matmul_triton(x.to(DEVICE), case.packed, case.group), x)


# --- the dispatcher ------------------------------------------------------------------------------------


def test_dispatcher_3d_input_each_path(monkeypatch):
    case = Case(48, 160, 32, torch.float16, seed=13)
    for lead in [(1, 1), (2, 3), (2, 10)]:  # M = 1, 6: gemv; M = 20: tiled
        x = case.x(*lead)
        case.check(tw.w4a16_matmul_triton(x.to(DEVICE), case.packed, case.group), x)
    # Above the threshold: dequantize + torch.matmul, no fused matmul launch.
    monkeypatch.setattr(tw, "DENSE_M_THRESHOLD", 8)

    def fail(*args, **kwargs):
        raise AssertionError("the dense path must not launch the fused kernel")

    monkeypatch.setattr(tw, "_launch", fail)
    x = case.x(2, 10)
    case.check(tw.w4a16_matmul_triton(x.to(DEVICE), case.packed, case.group), x)


def test_dispatcher_empty_batch():
    case = Case(48, 96, 32, torch.float32, seed=17)
    y = tw.w4a16_matmul_triton(torch.empty(0, 96, device=DEVICE), case.packed, case.group)
    assert y.shape == (0, 48)


# --- dequantize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_dequantize_equals_ref(dtype):
    case = Case(80, 160, 32, dtype, act_order=True, seed=19)
    expected = dequantize_w4a16_ref(case.qweight, case.scales, case.mins, case.group).to(dtype)  # [N, K]
    got = tw.dequantize_w4a16_triton(case.packed, case.group)
    assert got.shape == (80, 160) and got.dtype == dtype and got.T.is_contiguous()
    unpermuted = tw.dequantize_w4a16_triton(case.packed, case.group, unpermute=True)
    got, unpermuted = got.cpu(), unpermuted.cpu()
    if DEVICE == "cpu" and dtype != torch.bfloat16:
        assert torch.equal(got, expected)  # same fp32 ops as the reference, then the same cast
    else:
        # The GPU may fuse q * scale + min into one FMA (one rounding fewer); the interpreter casts
        # fp32 -> bf16 by truncation where torch and the GPU round to nearest: one ulp apart at most.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, expected, rtol=eps, atol=eps * expected.abs().max().item())
    # Original column order: column perm[k] holds stored column k.
    assert torch.equal(unpermuted[:, case.perm], got)


# --- bad input ----------------------------------------------------------------------------------------------


def test_errors():
    case = Case(48, 96, 32, torch.float32, seed=23)
    x = torch.randn(2, 96, device=DEVICE)
    with pytest.raises(ValueError, match=r"last dim must be in_features K = 96"):
        tw.w4a16_matmul_triton(x[:, :64], case.packed, 32)
    with pytest.raises(ValueError, match=r"K = 3 groups x group_size 64 = 192.*wrong group_size"):
        tw.w4a16_matmul_triton(x, case.packed, 64)  # packed with group size 32
    with pytest.raises(
        ValueError, match=r"last dim must be in_features K = 120 \(3 groups x group_size 40\)"
    ):
        tw.w4a16_matmul_triton(x, case.packed, 40)  # same number of int32 words, so x's K shows it
    with pytest.raises(ValueError, match="group_size must be an even int"):
        tw.w4a16_gemm_triton(x, case.packed, 33)
    with pytest.raises(ValueError, match=r"packed for torch\.float32"):
        tw.w4a16_matmul_triton(x.half(), case.packed, 32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        tw.w4a16_gemv_triton(torch.randn(17, 96, device=DEVICE), case.packed, 32)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        tw.w4a16_gemm_triton(x, case.packed, 32, block_n=48)
    with pytest.raises(ValueError, match="lacks 'mins'"):
        tw.w4a16_matmul_triton(x, {"qweight": case.packed["qweight"], "scales": case.packed["scales"]}, 32)

    qweight, scales, mins = case.qweight, case.scales, case.mins
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of group_size 64"):
        tw.pack_w4a16_triton(qweight, scales, mins, 64, torch.float16)
    with pytest.raises(ValueError, match="scales must be float"):
        tw.pack_w4a16_triton(qweight, scales[:, :2], mins, 32, torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tw.pack_w4a16_triton(qweight, scales, mins, 32, torch.int8)
    with pytest.raises(ValueError, match=r"perm must have shape \[K\] = \[96\]"):
        tw.pack_w4a16_triton(qweight, scales, mins, 32, torch.float16, torch.arange(95))
    with pytest.raises(ValueError, match="not a permutation"):
        tw.pack_w4a16_triton(qweight, scales, mins, 32, torch.float16, torch.zeros(96, dtype=torch.int64))


# --- bf16 through tl.dot: GPU only (see the module docstring) ------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [5, 37])
@pytest.mark.parametrize("act_order", [False, True])
def test_bf16_dot_paths_on_gpu(m, act_order):
    case = Case(80, 160, 32, torch.bfloat16, act_order=act_order, seed=29 + m)
    x = case.x(m)
    case.check(tw.w4a16_matmul_triton(x.to(DEVICE), case.packed, case.group), x)
