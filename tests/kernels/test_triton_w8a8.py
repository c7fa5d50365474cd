"""Triton W8A8 GEMM against the exact integer product, and the whole W8A8 matmul against
`w8a8_matmul_ref` (under TRITON_INTERPRET=1 without a GPU).

The int8 x int8 tl.dot is exact in the interpreter (only bf16 dots are not), and no bf16 value
reaches tl.dot here, so fp16, bf16 and fp32 outputs are all tested on CPU.
Tolerances, relative to the largest |expected| output: the int32 accumulator is exact, and the fp32
epilogue (int32 -> fp32, two scale multiplies, bias) costs a few fp32 ulp; the expected value is
computed in float64 and rounded once to the output dtype, so fp16/bf16 may land one output ulp away.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.triton_support import HAS_TRITON
from lowbit.kernels.w8a8_matmul import quantize_per_token_ref, w8a8_matmul_ref

from .tolerance import assert_close_rel

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:  # the kernel modules import triton
    from lowbit.kernels.triton_w8a8 import pack_w8a8_triton, w8a8_gemm_triton, w8a8_matmul_triton

# One output ulp: fp16 2^-10 ~ 1e-3, bf16 2^-7 ~ 8e-3 (relative); fp32 only the epilogue's ulps.
OUT_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
# Neither a multiple of any BLOCK_N (64, 128) nor of any BLOCK_K (64, 128).
N, K = 70, 300


def random_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)  # [N, K]
    scales = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3  # [N, 1] fp32
    return qweight, scales


def exact_gemm(xq, x_scale, qweight, scales, bias=None) -> torch.Tensor:
    """float64: exact integer product (|sum| < 128^2 K << 2^53), then the scales and bias."""
    y = (xq.double() @ qweight.double().T) * x_scale.double() * scales.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


# --- the reference itself --------------------------------------------------------------------------


def test_ref_equals_dequantize_then_matmul():
    """w8a8_matmul_ref (integer product, then scales) == dequantize both sides, then matmul."""
    gen = torch.Generator().manual_seed(0)
    qweight, scales = random_weight(N, K, gen)
    x = torch.randn(7, K, generator=gen, dtype=torch.float64)
    xq, x_scale = quantize_per_token_ref(x)
    # x in float64 keeps the reference's own result unrounded (it quantizes from x.float() anyway).
    got = w8a8_matmul_ref(x, qweight, scales)
    dequant = (xq.double() * x_scale.double()) @ (qweight.double() * scales.double()).T
    torch.testing.assert_close(got, dequant, rtol=1e-12, atol=1e-12 * dequant.abs().max().item())
    # And the codes do approximate x: |x - xq * s| <= s / 2, plus the fp32 division's rounding.
    err = (x.float().double() - xq.double() * x_scale.double()).abs()
    assert (err <= x_scale.double() * (0.5 + 1e-4)).all()


# --- pack -----------------------------------------------------------------------------------------


def test_pack_layout():
    gen = torch.Generator().manual_seed(1)
    qweight, scales = random_weight(N, K, gen)
    packed = pack_w8a8_triton(qweight, scales)
    assert set(packed) == {"qweight", "scales"}
    assert packed["qweight"].dtype == torch.int8 and packed["qweight"].shape == (N, K)
    assert packed["qweight"].is_contiguous() and torch.equal(packed["qweight"], qweight)
    assert packed["scales"].dtype == torch.float32 and packed["scales"].shape == (N,)
    assert torch.equal(packed["scales"], scales[:, 0])
    # [N] scales and a 16-bit scale dtype (compressed-tensors may store bf16) are accepted too.
    packed16 = pack_w8a8_triton(qweight.T.contiguous().T, scales[:, 0].bfloat16())
    assert packed16["qweight"].is_contiguous()
    assert torch.equal(packed16["scales"], scales[:, 0].bfloat16().float())


def test_pack_errors():
    qweight = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"pack_w8a8_triton: qweight must be int8, got torch.float16"):
        pack_w8a8_triton(qweight.half(), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"qweight must be \[N, K\] with N, K > 0, got shape \(32,\)"):
        pack_w8a8_triton(qweight.reshape(-1), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 1\) or \(4,\), got \(4, 2\)"):
        pack_w8a8_triton(qweight, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"scales must be a float tensor, got torch.int32"):
        pack_w8a8_triton(qweight, torch.ones(4, 1, dtype=torch.int32))


# --- the GEMM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("M", [1, 5, 37])
def test_gemm_matches_exact_product(M, with_bias, out_dtype):
    gen = torch.Generator().manual_seed(M * 10 + with_bias)
    qweight, scales = random_weight(N, K, gen)
    # Full int8 range, -128 included: the GEMM must not assume the quantizer's [-127, 127].
    xq = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)  # [M, K]
    x_scale = torch.rand(M, 1, generator=gen) * 0.1 + 1e-3  # [M, 1]
    bias = torch.randn(N, generator=gen).to(out_dtype) if with_bias else None
    y = w8a8_gemm_triton(xq, x_scale, pack_w8a8_triton(qweight, scales), bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (M, N)
    expected = exact_gemm(xq, x_scale, qweight, scales, bias).to(out_dtype)
    assert_close_rel(y, expected, OUT_TOL[out_dtype])


def test_gemm_large_m_config_and_strided_inputs():
    """M = 130 takes the large-M tiles (128 x 128: 2 x 3 ragged tiles in grouped order); xq and
    x_scale are strided views; K = 1100 makes |acc| pass 2^24, where int32 -> fp32 starts to round."""
    gen = torch.Generator().manual_seed(4)
    M, n, k = 130, 300, 1100
    qweight, scales = random_weight(n, k, gen)
    xq = torch.randint(-128, 128, (M, k + 24), generator=gen, dtype=torch.int8)[:, 8 : 8 + k]
    xq[0] = 127
    qweight[0] = 127  # acc[0, 0] = 127^2 * 1100 > 2^24
    x_scale = (torch.rand(M, 3, generator=gen) + 0.01)[:, 1:2]  # [M, 1], row stride 3
    y = w8a8_gemm_triton(xq, x_scale, pack_w8a8_triton(qweight, scales), out_dtype=torch.float32)
    assert_close_rel(y, exact_gemm(xq, x_scale, qweight, scales), OUT_TOL[torch.float32])


def test_gemm_empty_m():
    qweight, scales = random_weight(N, K, torch.Generator().manual_seed(5))
    xq = torch.zeros(0, K, dtype=torch.int8)
    y = w8a8_gemm_triton(xq, torch.zeros(0, 1), pack_w8a8_triton(qweight, scales))
    assert y.shape == (0, N) and y.dtype == torch.float16


def test_gemm_errors():
    packed = pack_w8a8_triton(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1))
    xq, xs = torch.zeros(3, 8, dtype=torch.int8), torch.ones(3, 1)
    fn = "w8a8_gemm_triton"
    with pytest.raises(ValueError, match=rf"{fn}: xq must be int8, got torch.float16"):
        w8a8_gemm_triton(xq.half(), xs, packed)
    with pytest.raises(ValueError, match=r"xq must be \[M, K\], got shape \(1, 3, 8\)"):
        w8a8_gemm_triton(xq[None], xs, packed)
    with pytest.raises(ValueError, match=r"xq has K=6 columns but the weight has K=8"):
        w8a8_gemm_triton(xq[:, :6], xs, packed)
    with pytest.raises(ValueError, match=r"x_scale must be float32 \[3, 1\], got torch.float32 \(3,\)"):
        w8a8_gemm_triton(xq, xs[:, 0], packed)
    with pytest.raises(ValueError, match=r"x_scale must be float32 \[3, 1\], got torch.float16 \(3, 1\)"):
        w8a8_gemm_triton(xq, xs.half(), packed)
    with pytest.raises(ValueError, match=r"bias must be a float tensor \[4\], got torch.float32 \(5,\)"):
        w8a8_gemm_triton(xq, xs, packed, bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"out_dtype must be float16, bfloat16 or float32, got torch.int32"):
        w8a8_gemm_triton(xq, xs, packed, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"packed must come from pack_w8a8_triton"):
        w8a8_gemm_triton(xq, xs, {"qweight_t": packed["qweight"]})
    with pytest.raises(ValueError, match=r"packed scales must be float32 \[4\], got torch.float32 \(4, 1\)"):
        w8a8_gemm_triton(xq, xs, {"qweight": packed["qweight"], "scales": torch.ones(4, 1)})


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "with_bias"), [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)]
)
def test_matmul_matches_ref(dtype, with_bias):
    gen = torch.Generator().manual_seed(6)
    qweight, scales = random_weight(N, K, gen)
    x = torch.randn(2, 3, K, generator=gen).to(dtype)  # [..., K]
    x[1, 2] = 0  # an all-zero token
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    y = w8a8_matmul_triton(x, pack_w8a8_triton(qweight, scales), bias)
    assert y.dtype == dtype and y.shape == (2, 3, N)
    # The reference on float64 x: same codes (it quantizes x.float()), no rounding of its output.
    expected = w8a8_matmul_ref(x.double(), qweight, scales)
    if with_bias:
        expected = expected + bias.double()
    assert_close_rel(y, expected.to(dtype), OUT_TOL[dtype])
    # A zero token: codes 0 (scale 1e-10), so its output is exactly the bias (or 0).
    assert torch.equal(y[1, 2], bias if with_bias else torch.zeros(N, dtype=dtype))


def test_matmul_errors():
    packed = pack_w8a8_triton(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"x must be float16, bfloat16 or float32, got torch.int8"):
        w8a8_matmul_triton(torch.zeros(2, 8, dtype=torch.int8), packed)
    with pytest.raises(ValueError, match=r"x has shape \(2, 6\) but the weight has K=8"):
        w8a8_matmul_triton(torch.zeros(2, 6), packed)


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 48, 300])
def test_gemm_cuda_each_config(M):
    """Real tensor-core int8 dots (each M config, Llama-like K) against the exact product."""
    gen = torch.Generator().manual_seed(M)
    n, k = 1000, 4096
    qweight, scales = random_weight(n, k, gen)
    xq = torch.randint(-127, 128, (M, k), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(M, 1, generator=gen) * 0.1 + 1e-3
    bias = torch.randn(n, generator=gen).half()
    packed = pack_w8a8_triton(qweight.cuda(), scales.cuda())
    y = w8a8_gemm_triton(xq.cuda(), x_scale.cuda(), packed, bias.cuda(), out_dtype=torch.bfloat16)
    expected = exact_gemm(xq, x_scale, qweight, scales, bias).to(torch.bfloat16)
    assert_close_rel(y.cpu(), expected, OUT_TOL[torch.bfloat16])
