"""GGUF blocks -> canonical layouts (`decode_tensor`), against the `gguf` package's dequantizer.

Tolerance: none. Dense types (F32/F16/BF16) are compared bitwise (so -0.0, inf, NaN and
subnormals must survive). Quantized types are compared for exact fp32 equality, where only the sign
of a zero may differ (gguf's Q4_0 gives -0.0 for an all-zero block): both sides compute the same
products of an fp16 scale and a small integer, exact in fp32 (Q4_0: q * d - 8 * d = (q - 8) * d,
both being <= 15-bit-mantissa multiples of d; Q4_1: the same `q * d + m`, one rounding each side).
"""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from lowbit.loaders.gguf_blocks import decode_tensor
from lowbit.loaders.gguf_file import read_gguf
from lowbit.runtime.quant import GGMLConfig, QuantizedWeight, W4A16Config, W8A16Config, method_for

from .gguf_fixtures import reference_reader

EXPECTED_CONFIG = {Q.Q4_0: W4A16Config(32), Q.Q4_1: W4A16Config(32), Q.Q8_0: W8A16Config(32)}


def _bits(x) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    assert x.dtype == np.float32
    return x.view(np.uint32)


def assert_bitwise_equal(got: torch.Tensor, expected: np.ndarray) -> None:
    assert got.dtype == torch.float32
    assert tuple(got.shape) == expected.shape
    got_bits, expected_bits = _bits(got.contiguous()), _bits(np.ascontiguousarray(expected))
    if not np.array_equal(got_bits, expected_bits):  # the fast check; the slow one reports where
        np.testing.assert_array_equal(got_bits, expected_bits)


def assert_exactly_equal(got: torch.Tensor, expected: np.ndarray) -> None:
    """Exact fp32 values; +0.0 == -0.0. (No NaN can come out of finite fp16 scales.)"""
    assert got.dtype == torch.float32
    assert tuple(got.shape) == expected.shape
    assert expected.dtype == np.float32 and np.isfinite(expected).all()
    if not np.array_equal(got.numpy(), expected):
        np.testing.assert_array_equal(got.numpy(), expected)


def _as_bytes(raw: np.ndarray) -> np.ndarray:
    """Any array -> uint8 [outer dims..., bytes per row], the form `tensor_bytes` hands out."""
    raw = np.ascontiguousarray(raw)
    return raw.view(np.uint8).reshape(*raw.shape[:-1], -1)


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random rows of very different magnitudes plus the awkward cases quantizers special-case."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) == 2:
        x *= np.exp(rng.uniform(-6, 4, size=(shape[0], 1))).astype(np.float32)
        x[0, : min(32, shape[1])] = 0.0  # an all-zero block (scale 0)
        if shape[0] > 2:
            x[1] = 0.75  # constant row (Q4_1: zero range)
            x[2, 5] = 1e4  # one outlier sets its block's scale
        if shape[0] > 3:
            x[3] = -np.abs(x[3])  # all-negative row
    return x


SHAPES = [(16, 64), (48, 96), (1, 32), (5, 256)]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantized_blocks_match_gguf_dequantize(qtype, shape):
    x = _weights(shape, seed=100 * SHAPES.index(shape) + int(qtype))  # deterministic per case
    raw = gguf.quants.quantize(x, qtype)
    w = decode_tensor(raw, qtype, shape)
    assert isinstance(w, QuantizedWeight)
    assert w.config == EXPECTED_CONFIG[qtype]
    assert (w.out_features, w.in_features) == shape
    method = method_for(w.config)
    method.check(w)  # exactly the canonical tensors, shapes and dtypes of the scheme
    assert_exactly_equal(method.dequantize(w.tensors), gguf.quants.dequantize(raw, qtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 70000 -> f16 inf
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(16, 64), (48, 96), (7,), (2, 3, 4)], ids=str)
def test_dense_types_match_gguf_dequantize(qtype, shape):
    x = _weights(shape, seed=3)
    flat = x.reshape(-1)
    # Non-finite values, -0.0, an fp32 subnormal, a value that overflows fp16.
    flat[:6] = [np.inf, -np.inf, -0.0, 1e-40, 70000.0, np.nan][: flat.size]
    x = flat.reshape(shape)
    stored = x if qtype == Q.F32 else gguf.quants.quantize(x, qtype)
    expected = x if qtype == Q.F32 else gguf.quants.dequantize(stored, qtype).astype(np.float32)
    got = decode_tensor(_as_bytes(stored), qtype, shape)
    assert isinstance(got, torch.Tensor)
    assert_bitwise_equal(got, expected.reshape(shape))


UNSUPPORTED = [
    Q.IQ1_S,
    Q.IQ2_XXS,
    Q.IQ2_S,
    Q.IQ3_XXS,
    Q.IQ3_S,
    Q.TQ1_0,
    Q.TQ2_0,
    Q.MXFP4,
    Q.Q8_1,
    Q.F64,
    Q.I8,
]


@pytest.mark.parametrize("qtype", UNSUPPORTED, ids=lambda q: q.name)
def test_unsupported_type_raises_naming_it_and_the_supported_ones(qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, 256 // block * type_size), np.uint8)
    with pytest.raises(
        ValueError, match=rf"tensor type {qtype.name} is not supported \(supported: .*Q4_K.*IQ4_XS"
    ):
        decode_tensor(raw, qtype, (2, 256))


GGML_TYPES = [Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]


@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda q: q.name)
def test_other_block_types_are_kept_as_the_files_bytes(qtype):
    """No conversion at load: the weight is the rows' bytes, so it costs the file's tensor bytes."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (3, 512 // block * type_size), dtype=np.uint8)
    w = decode_tensor(raw, qtype, (3, 512))
    assert isinstance(w, QuantizedWeight) and w.config == GGMLConfig(qtype.name)
    assert (w.out_features, w.in_features) == (3, 512)
    method_for(w.config).check(w)
    assert np.array_equal(w.tensors["blocks"].numpy(), raw)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0], ids=lambda q: q.name)
def test_quantized_tensor_must_be_2d(qtype):
    raw = gguf.quants.quantize(np.ones((2, 3, 32), np.float32), qtype)
    with pytest.raises(ValueError, match=r"must be 2-D, got shape \(2, 3, 32\)"):
        decode_tensor(raw, qtype, (2, 3, 32))


# ---------------------------------------------------------------------------------------------
# Real tensors of the default model.


@pytest.fixture(scope="module")
def real(default_gguf):
    ref = reference_reader(default_gguf)
    return read_gguf(default_gguf), {t.name: t for t in ref.tensors}


@pytest.mark.parametrize(
    "name, qtype",
    [
        ("blk.0.attn_q.weight", Q.Q4_1),
        ("blk.29.ffn_down.weight", Q.Q4_1),
        ("blk.13.attn_k.weight", Q.Q4_1),
        ("token_embd.weight", Q.Q8_0),
        ("output_norm.weight", Q.F32),
        ("blk.4.ffn_norm.weight", Q.F32),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_real_tensors_match_gguf_dequantize(real, name, qtype):
    ours, ref = real
    info, t = ours.tensors[name], ref[name]
    assert info.qtype == t.tensor_type == qtype
    expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    got = decode_tensor(ours.tensor_bytes(name), info.qtype, info.shape)
    if qtype == Q.F32:
        assert isinstance(got, torch.Tensor)
    else:
        assert isinstance(got, QuantizedWeight) and got.config == EXPECTED_CONFIG[qtype]
        method_for(got.config).check(got)
        assert_exactly_equal(method_for(got.config).dequantize(got.tensors), expected)
        return
    assert_bitwise_equal(got, expected.reshape(info.shape))
