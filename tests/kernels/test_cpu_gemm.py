"""The group-quantized CPU GEMMs (kernels/cpu/gemm.cpp) against fp32 dequantize-then-matmul
(`w4a16_matmul_ref`, `w8a16_matmul_ref`), on both compiled paths (AVX-512 where the CPU has it,
and the portable loops), every activation dtype, fp16 and fp32 scales, ragged M and several group
sizes; the packed layout against its definition; and the small decode-step ops beside them
(silu_mul, argmax_rows) against torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.cpu import gemm as cpu_gemm
from lowbit.kernels.w4a16_matmul import dequantize_w4a16_ref, pack_int4, w4a16_matmul_ref
from lowbit.kernels.w8a16_matmul import w8a16_matmul_ref

from .tolerance import assert_close_rel

ops = cpu_gemm.load()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler: the torch kernels are used instead")
PATHS = [pytest.param(False, id="avx512"), pytest.param(True, id="portable")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Only the summation order differs from the fp32 reference (and, for bf16 activations, the weights
# enter as q + 128 with 128 * sum(x) taken back per group: ~1e-6 of the output's range measured).
FP32_REL = 1e-5
# (N, K, G): GGUF blocks of 32, GPTQ/AWQ groups of 64 and 128, per-channel int8 (G = K).
SHAPES = [(16, 32, 32), (48, 128, 32), (32, 256, 64), (64, 384, 128), (16, 1536, 32)]
ROWS = [1, 2, 3, 4, 5, 9, 20]


def _int4_weight(n: int, k: int, g: int, gen: torch.Generator, fp16_scales: bool):
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=gen) * 0.02 + 0.005
    mins = -torch.rand(n, k // g, generator=gen) * 0.1
    if fp16_scales:  # what GGUF stores: packed as fp16
        scales, mins = scales.half().float(), mins.half().float()
    return pack_int4(q), scales, mins


def _int8_weight(n: int, k: int, g: int, gen: torch.Generator, fp16_scales: bool):
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
    return q, scales.half().float() if fp16_scales else scales


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp16_scales", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize(("n", "k", "g"), SHAPES)
def test_int4_gemm_matches_reference(n, k, g, fp16_scales, dtype, portable):
    gen = torch.Generator().manual_seed(n + k + g)
    qweight, scales, mins = _int4_weight(n, k, g, gen, fp16_scales)
    packed = cpu_gemm.pack_int4(qweight, scales, mins)
    assert packed["scales"].dtype == (torch.float16 if fp16_scales else torch.float32)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        expected = w4a16_matmul_ref(x.float(), qweight, scales, mins, g)  # fp32
        y = cpu_gemm.gemm(x, packed, g, out_dtype=torch.float32, portable=portable)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert_close_rel(y, expected, FP32_REL)
        y_cast = cpu_gemm.gemm(x, packed, g, portable=portable)  # default: x's dtype
        assert y_cast.dtype == dtype
        assert torch.equal(y_cast, y.to(dtype))


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp16_scales", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize(("n", "k", "g"), [*SHAPES, (32, 96, 96)])
def test_int8_gemm_matches_reference(n, k, g, fp16_scales, dtype, portable):
    gen = torch.Generator().manual_seed(n * k + g)
    qweight, scales = _int8_weight(n, k, g, gen, fp16_scales)
    packed = cpu_gemm.pack_int8(qweight, scales)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = cpu_gemm.gemm(x, packed, g, out_dtype=torch.float32, portable=portable)
        assert_close_rel(y, w8a16_matmul_ref(x.float(), qweight, scales), FP32_REL)


def test_leading_dimensions_are_kept():
    gen = torch.Generator().manual_seed(0)
    qweight, scales, mins = _int4_weight(32, 64, 32, gen, True)
    packed = cpu_gemm.pack_int4(qweight, scales, mins)
    x = torch.randn(2, 3, 64, generator=gen)
    y = cpu_gemm.gemm(x, packed, 32)
    assert y.shape == (2, 3, 32)
    assert torch.equal(y.reshape(6, 32), cpu_gemm.gemm(x.reshape(6, 64), packed, 32))
    assert torch.equal(cpu_gemm.gemm(x[:, 1], packed, 32), y[:, 1])  # a strided view


def _int4_byte(r: int, f: int) -> int:
    """The layout's definition (cpu_gemm.cpp): 16 rows x 8 features per 64-byte chunk."""
    return 16 * (r // 4) + 8 * ((f % 4) // 2) + 2 * (r % 4) + f % 2


def test_int4_packing_follows_the_layout():
    gen = torch.Generator().manual_seed(3)
    n, k = 32, 64
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = cpu_gemm.pack_int4(pack_int4(q), torch.ones(n, 2), torch.zeros(n, 2))["q"]
    assert packed.shape == (n // 16, k // 8, 64)
    for row in range(n):
        for feature in range(k):
            byte = int(packed[row // 16, feature // 8, _int4_byte(row % 16, feature % 8)])
            nibble = byte & 15 if feature % 8 < 4 else byte >> 4
            assert nibble == q[row, feature], (row, feature)


def test_int8_packing_puts_16_rows_side_by_side():
    q = torch.arange(32 * 8, dtype=torch.int32).reshape(32, 8).remainder(251).sub(125).to(torch.int8)
    packed = cpu_gemm.pack_int8(q, torch.ones(32, 1))["q"]
    assert packed.shape == (2, 8, 16)
    assert torch.equal(packed[1, 5], q[16:32, 5])


def test_bad_inputs_are_refused_with_a_reason():
    gen = torch.Generator().manual_seed(0)
    qweight, scales, mins = _int4_weight(32, 64, 32, gen, True)
    packed = cpu_gemm.pack_int4(qweight, scales, mins)
    with pytest.raises(RuntimeError, match=r"x: expected \[\.\.\., 64\]"):
        cpu_gemm.gemm(torch.randn(1, 32), packed, 32)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 32"):
        cpu_gemm.gemm(torch.randn(1, 64), packed, 16)
    with pytest.raises(RuntimeError, match="scales: expected contiguous"):
        cpu_gemm.gemm(torch.randn(1, 64), packed, 64)
    with pytest.raises(RuntimeError, match="q: expected int8"):
        cpu_gemm.gemm(torch.randn(1, 64), {"q": packed["q"], "scales": packed["scales"]}, 32)
    with pytest.raises(RuntimeError, match="x: expected a floating dtype"):
        cpu_gemm.gemm(torch.ones(1, 64, dtype=torch.int32), packed, 32)


def test_supports_names_what_does_not_fit():
    assert cpu_gemm.supports(48, 128, 32) is None
    assert "multiple of 16" in cpu_gemm.supports(40, 128, 32)
    assert "multiple of 32" in cpu_gemm.supports(48, 128, 16)
    assert "dividing in_features" in cpu_gemm.supports(48, 96, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_eager(dtype):
    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(3, 2 * 1536, generator=gen) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = ops.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (3, 1536)
    # Both round silu to the dtype, then the product; exp may differ in its last fp32 bit, which
    # can move a 16-bit result by one unit in the last place.
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=ulp, atol=1e-6)


def test_argmax_rows_matches_torch():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 49152, generator=gen)
    logits[1, 7] = logits[1, 9000] = 50.0  # a tie: the first wins
    logits[2, 123] = float("nan")  # NaN counts as the maximum
    logits[3] = float("-inf")
    logits[4, -1] = 1e9
    assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))
    ragged = torch.randn(4, 16 * 5 + 7, generator=gen)  # rows that end mid-vector
    ragged[0, -1] = 9.0  # the maximum in the tail
    ragged[1, -2] = float("nan")  # a NaN in the tail only
    ragged[2, 3] = ragged[2, -3] = 9.0  # a tie across the vector part and the tail
    assert torch.equal(ops.argmax_rows(ragged), ragged.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(ragged[:, :5]), ragged[:, :5].argmax(dim=-1))  # shorter than a vector
    with pytest.raises(RuntimeError, match="logits: expected fp32"):
        ops.argmax_rows(logits.half())


@pytest.mark.parametrize("fp16_scales", [True, False], ids=["fp16-scales", "fp32-scales"])
def test_gather_int8_rows_reads_back_the_canonical_rows(fp16_scales):
    gen = torch.Generator().manual_seed(7)
    qweight, scales = _int8_weight(64, 96, 32, gen, fp16_scales)
    rows = torch.tensor([0, 17, 63, 17, 40])
    got = cpu_gemm.gather_int8_rows(cpu_gemm.pack_int8(qweight, scales), rows)
    assert torch.equal(got["qweight"], qweight[rows])
    assert torch.equal(got["scales"], scales[rows])


def test_tied_embedding_reads_the_packed_vocabulary_projection():
    from lowbit.runtime.layers.embedding import Embedding
    from lowbit.runtime.layers.linear import Linear
    from lowbit.runtime.quant import QuantizedWeight, W8A16Config, method_for

    gen = torch.Generator().manual_seed(8)
    qweight, scales = _int8_weight(48, 64, 32, gen, True)
    table = QuantizedWeight(W8A16Config(32), 48, 64, {"qweight": qweight, "scales": scales})
    cpu = torch.device("cpu")
    embedding, head = Embedding(table, cpu), Linear(table, cpu, torch.float16)
    ids = torch.tensor([3, 47, 0, 3])
    own = embedding(ids)
    embedding.share(head.packed)
    assert embedding.shared is head.packed and embedding.nbytes() == 0
    assert torch.equal(embedding(ids), own)
    expected = method_for(table.config).dequantize({"qweight": qweight[ids], "scales": scales[ids]})
    assert torch.equal(own, expected)


# Large M dequantizes to x's dtype and runs torch's matmul: fp16 weights are rounded there (bf16
# ones are split in two bf16 halves, ~16 bits), and the output is rounded to x's dtype.
DENSE_REL = {torch.float32: FP32_REL, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _packed_weight(bits: int, n: int, k: int, g: int, gen: torch.Generator):
    """A packed int4 or int8 weight with fp16 scales, and its fp32 reference x -> x @ W.T."""
    if bits == 4:
        qweight, scales, mins = _int4_weight(n, k, g, gen, True)
        packed = cpu_gemm.pack_int4(qweight, scales, mins)
        return packed, lambda x: w4a16_matmul_ref(x, qweight, scales, mins, g)
    qweight, scales = _int8_weight(n, k, g, gen, True)
    return cpu_gemm.pack_int8(qweight, scales), lambda x: w8a16_matmul_ref(x, qweight, scales)


@pytest.mark.parametrize("weight_chunks", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_many_rows_take_the_dense_path(bits, dtype, weight_chunks, monkeypatch):
    gen = torch.Generator().manual_seed(bits)
    n, k, g = 96, 128, 32
    packed, reference = _packed_weight(bits, n, k, g, gen)
    width = 2 * k if dtype == torch.bfloat16 else k  # bf16 runs against a split [n, 2K] weight
    chunk_rows = n // weight_chunks  # whole, or 3 chunks of 32 rows
    monkeypatch.setattr(cpu_gemm, "DENSE_CHUNK_BYTES", chunk_rows * width * dtype.itemsize)
    monkeypatch.setattr(cpu_gemm, "_on_amx", lambda x: False)  # what CPUs without AMX run
    # Row counts: one padded small chunk (32), two small ones (70), large ones then a padded small
    # one (2 x 256 + 5), large ones only (256); a 3-D input.
    large = cpu_gemm.DENSE_LARGE_CHUNK
    for shape in ((cpu_gemm.DENSE_ROWS, k), (70, k), (2 * large + 5, k), (large, k), (2, 35, k)):
        x = torch.randn(shape, generator=gen).to(dtype)
        expected = reference(x.reshape(-1, k).float()).reshape(*shape[:-1], n)
        y = cpu_gemm.gemm(x, packed, g)
        assert y.dtype == dtype and y.shape == (*shape[:-1], n)
        assert_close_rel(y, expected, DENSE_REL[dtype])
        portable = cpu_gemm.gemm(x, packed, g, out_dtype=torch.float32, portable=True)  # the row kernel
        assert_close_rel(portable, expected, FP32_REL)


@pytest.mark.skipif(ops is None or not ops.has_amx(), reason="the CPU or kernel does not allow AMX")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_many_rows_stay_on_the_amx_kernel(bits, dtype, monkeypatch):
    """With AMX, bf16/fp16 rows stay in the kernel at any row count (a prompt chunk too): the dense
    path is not called, and the result is the fp32 reference's up to summation order (fp16 rows
    enter as two exact bf16 halves)."""
    gen = torch.Generator().manual_seed(bits)
    n, k, g = 96, 256, 64
    packed, reference = _packed_weight(bits, n, k, g, gen)

    def no_dense(*args):
        raise AssertionError("the dense path ran")

    monkeypatch.setattr(cpu_gemm, "_dense_gemm", no_dense)
    for rows in (cpu_gemm.DENSE_ROWS, 77, 300):  # 16-row tiles, the last padded
        x = torch.randn(rows, k, generator=gen).to(dtype)
        y = cpu_gemm.gemm(x, packed, g, out_dtype=torch.float32)
        assert_close_rel(y, reference(x.float()), FP32_REL)
        assert torch.equal(cpu_gemm.gemm(x, packed, g), y.to(dtype))  # x's dtype out, rounded as torch does


def test_dequantize_matches_the_canonical_weight():
    # q * scale + min with one rounding (a fused multiply-add) where the reference rounds twice.
    close = {"rtol": 1e-6, "atol": 1e-7}
    gen = torch.Generator().manual_seed(9)
    qweight, scales, mins = _int4_weight(32, 64, 32, gen, False)
    dense = ops.dequantize(*cpu_gemm.pack_int4(qweight, scales, mins).values(), 32, torch.float32, False)
    torch.testing.assert_close(dense, dequantize_w4a16_ref(qweight, scales, mins, 32), **close)
    q8, s8 = _int8_weight(32, 64, 32, gen, False)
    packed = cpu_gemm.pack_int8(q8, s8)
    exact = q8.float() * s8.repeat_interleave(32, 1)
    dense = ops.dequantize(packed["q"], packed["scales"], None, 32, torch.bfloat16, False)
    torch.testing.assert_close(dense, exact.bfloat16(), rtol=0, atol=0)
    hi, lo = ops.dequantize(packed["q"], packed["scales"], None, 32, torch.bfloat16, True).chunk(2, dim=-1)
    assert torch.equal(hi, exact.bfloat16())
    assert torch.equal(lo, (exact - hi.float()).bfloat16())
    assert (hi.float() + lo.float() - exact).abs().max() <= exact.abs().max() * 2**-16


@pytest.mark.parametrize(
    ("rows", "row_bytes", "expected"),
    [(1, 2304, [(0, 64)]), (64, 2304, [(0, 64)]), (65, 2304, [(0, 64), (64, 64)]),
     (256, 2304, [(0, 256)]), (300, 2304, [(0, 256), (256, 64)]),
     (700, 2304, [(0, 256), (256, 256), (512, 64), (576, 64), (640, 64)]),
     (300, 6144, [(0, 128), (128, 128), (256, 64)]),  # 256 rows would be 1.5 MiB: halved once
     (100, 1 << 20, [(0, 64), (64, 64)])],  # never below the small chunk
)  # fmt: skip
def test_dense_row_chunks_cover_the_rows_in_fixed_shapes(rows, row_bytes, expected):
    assert (cpu_gemm.DENSE_SMALL_CHUNK, cpu_gemm.DENSE_LARGE_CHUNK) == (64, 256)  # what the table assumes
    assert cpu_gemm.DENSE_CHUNK_INPUT_BYTES == 1 << 20
    assert cpu_gemm._row_chunks(rows, row_bytes) == expected


def test_lowbit_amx_0_keeps_amx_off():
    """The switch for A/B runs; the extension is loaded in a fresh process that has it set."""
    code = "from lowbit.kernels.cpu import extension; print(extension.load().has_amx())"
    env = {**os.environ, "LOWBIT_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_amx_runs_the_bf16_rows_where_the_cpu_has_it():
    """On a CPU with AMX (and Linux 5.16+, which grants the tiles), bf16 and fp16 activations of 2+
    rows in test_int4/int8_gemm_matches_reference run on AMX tiles, so those cases test that path."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    assert ops.has_amx() == ({"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags))
