"""Quantization methods: kernel selection, load/apply against the method's own dequantization,
validation of canonical tensors, and round-to-nearest quantization checked from first principles."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.cpu import extension
from lowbit.kernels.w4a16_matmul import pack_int4, unpack_int4
from lowbit.runtime.quant import (
    DenseConfig,
    QuantConfig,
    QuantizedWeight,
    W4A16Config,
    W8A16Config,
    dense_weight,
    method_for,
    pack_linear,
)
from lowbit.runtime.quant.rtn import quantize_rtn, quantize_w4a16_rtn, quantize_w8a16_rtn

from .tolerance import TOL, assert_close_rel

CPU = torch.device("cpu")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def random_w4(n: int, k: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    mins = -torch.randint(0, 16, (n, k // group), generator=gen).float() * scales
    tensors = {"qweight": pack_int4(q), "scales": scales, "mins": mins}
    return QuantizedWeight(W4A16Config(group), n, k, tensors)


def random_w8(n: int, k: int, group: int | None, gen: torch.Generator) -> QuantizedWeight:
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // (group or k), generator=gen) * 0.01 + 1e-3
    return QuantizedWeight(W8A16Config(group), n, k, {"qweight": qweight, "scales": scales})


def random_dense(n: int, k: int, gen: torch.Generator) -> QuantizedWeight:
    return dense_weight(torch.randn(n, k, generator=gen) * 0.05)


# (weight factory, dtype, expected kernel, with the compiled CPU ops). Without them (no compiler, or
# LOWBIT_CPU_OPS=0) the engine falls back to torch's int4pack / int8pack, checked here too.
SELECTION = [
    pytest.param(lambda g: random_dense(48, 64, g), BF16, "torch-dense", True, id="dense-bf16"),
    pytest.param(lambda g: random_dense(8, 40, g), FP32, "torch-dense", True, id="dense-fp32"),
    pytest.param(lambda g: random_w4(48, 128, 64, g), BF16, "cpu-group-int4", True, id="w4-bf16"),
    pytest.param(lambda g: random_w4(16, 256, 256, g), BF16, "cpu-group-int4", True, id="w4-g256"),
    pytest.param(lambda g: random_w4(48, 128, 64, g), FP32, "cpu-group-int4", True, id="w4-fp32"),
    pytest.param(lambda g: random_w4(48, 128, 32, g), FP16, "cpu-group-int4", True, id="w4-fp16"),
    pytest.param(lambda g: random_w4(8, 128, 64, g), BF16, "dequantized", True, id="w4-bf16-n8"),
    pytest.param(lambda g: random_w4(48, 128, 16, g), BF16, "dequantized", True, id="w4-bf16-g16"),
    pytest.param(lambda g: random_w8(48, 64, None, g), BF16, "cpu-group-int8", True, id="w8-bf16"),
    pytest.param(lambda g: random_w8(48, 64, 32, g), BF16, "cpu-group-int8", True, id="w8-g32"),
    pytest.param(lambda g: random_w8(48, 64, None, g), FP32, "cpu-group-int8", True, id="w8-fp32"),
    pytest.param(lambda g: random_w8(8, 40, None, g), BF16, "dequantized", True, id="w8-bf16-k40"),
    pytest.param(lambda g: random_w4(48, 128, 64, g), BF16, "cpu-int4pack", False, id="w4-int4pack"),
    pytest.param(lambda g: random_w4(16, 256, 256, g), BF16, "cpu-int4pack", False, id="w4-g256-pack"),
    pytest.param(lambda g: random_w4(48, 128, 64, g), FP32, "dequantized", False, id="w4-fp32-eager"),
    pytest.param(lambda g: random_w8(48, 64, None, g), BF16, "cpu-int8pack", False, id="w8-int8pack"),
    pytest.param(lambda g: random_w8(48, 64, 64, g), BF16, "cpu-int8pack", False, id="w8-g=k-pack"),
    pytest.param(lambda g: random_w8(48, 64, 32, g), BF16, "dequantized", False, id="w8-g32-eager"),
]


@pytest.mark.parametrize(("make", "dtype", "kernel", "compiled"), SELECTION)
def test_load_selects_kernel_and_apply_matches_dequantized(make, dtype, kernel, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(extension, "load", lambda: None)
    elif extension.load() is None and kernel.startswith("cpu-group"):
        pytest.skip("no C++ compiler here: the compiled CPU GEMMs are unavailable")
    weight = make(torch.Generator().manual_seed(0))
    method = method_for(weight.config)
    packed = method.load(weight, CPU, dtype)
    assert packed.kernel.name == kernel
    assert (packed.out_features, packed.in_features) == (weight.out_features, weight.in_features)
    w = method.dequantize(weight.tensors)
    assert w.dtype == torch.float32 and w.shape == (weight.out_features, weight.in_features)
    gen = torch.Generator().manual_seed(1)
    for lead in [(1,), (5,), (2, 3)]:
        x = torch.randn(*lead, weight.in_features, generator=gen).to(dtype)
        y = method.apply(x, packed)
        assert y.shape == (*lead, weight.out_features) and y.dtype == dtype
        assert_close_rel(y, x.float() @ w.T, TOL[dtype])
        assert torch.equal(packed(x), y)
    assert packed.nbytes() > 0


def test_pack_linear_wraps_plain_tensors_as_dense():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    packed = pack_linear(weight, CPU, torch.float32)
    assert packed.kernel.name == "torch-dense"
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    assert_close_rel(packed(x), x @ weight.T, TOL[torch.float32])


def test_method_for_rejects_unknown_config():
    class Other(QuantConfig):
        pass

    with pytest.raises(ValueError, match="unsupported"):
        method_for(Other())


def test_dense_weight_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        dense_weight(torch.zeros(4))


def _replace(base: QuantizedWeight, /, **tensors: torch.Tensor | None) -> QuantizedWeight:
    new = dict(base.tensors)
    for name, tensor in tensors.items():
        if tensor is None:
            del new[name]
        else:
            new[name] = tensor
    return QuantizedWeight(base.config, base.out_features, base.in_features, new)


def _bad_weights():
    gen = torch.Generator().manual_seed(4)
    w4 = random_w4(16, 64, 32, gen)
    w8 = random_w8(16, 64, 32, gen)
    dense = random_dense(16, 64, gen)
    return [
        # (weight, tensor name the message must mention, id)
        (
            _replace(w4, qweight=torch.zeros(16, 64, dtype=torch.uint8)),
            "qweight",
            "w4-qweight-unpacked-shape",
        ),
        (_replace(w4, qweight=torch.zeros(16, 32, dtype=torch.int8)), "qweight", "w4-qweight-int8"),
        (_replace(w4, scales=torch.ones(16, 1)), "scales", "w4-scales-shape"),
        (_replace(w4, mins=torch.ones(2, 16)), "mins", "w4-mins-transposed"),
        (_replace(w4, scales=torch.ones(16, 2, dtype=torch.int32)), "scales", "w4-scales-int"),
        (_replace(w4, mins=None), "mins", "w4-missing-mins"),
        (_replace(w8, qweight=torch.zeros(16, 64, dtype=torch.uint8)), "qweight", "w8-qweight-uint8"),
        (_replace(w8, qweight=torch.zeros(16, 64)), "qweight", "w8-qweight-float"),
        (_replace(w8, scales=torch.ones(16, 1)), "scales", "w8-scales-per-channel-for-g32"),
        (_replace(w8, scales=None), "scales", "w8-missing-scales"),
        (_replace(w8, zeros=torch.zeros(16, 2)), "zeros", "w8-extra-tensor"),
        (_replace(dense, weight=torch.zeros(64, 16)), "weight", "dense-transposed"),
        (_replace(dense, weight=torch.zeros(16, 64, dtype=torch.int8)), "weight", "dense-int8"),
    ]


@pytest.mark.parametrize(("weight", "name"), [pytest.param(w, n, id=i) for w, n, i in _bad_weights()])
def test_load_rejects_non_canonical_tensors(weight, name):
    with pytest.raises(ValueError, match=name):
        method_for(weight.config).load(weight, CPU, torch.bfloat16)


def test_in_features_must_be_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="multiple of group size"):
        method_for(W4A16Config(64)).create_weights(96, 16)
    with pytest.raises(ValueError, match="multiple of group size"):
        method_for(W8A16Config(32)).create_weights(48, 16)
    with pytest.raises(ValueError):
        W4A16Config(3)
    with pytest.raises(ValueError):
        W8A16Config(0)


def test_create_weights_shapes():
    assert {n: (s.shape, s.dtype) for n, s in method_for(W4A16Config(32)).create_weights(64, 16).items()} == {
        "qweight": ((16, 32), torch.uint8),
        "scales": ((16, 2), torch.float32),
        "mins": ((16, 2), torch.float32),
    }
    assert {n: (s.shape, s.dtype) for n, s in method_for(W8A16Config()).create_weights(64, 16).items()} == {
        "qweight": ((16, 64), torch.int8),
        "scales": ((16, 1), torch.float32),
    }
    assert {n: (s.shape, s.dtype) for n, s in method_for(DenseConfig()).create_weights(64, 16).items()} == {
        "weight": ((16, 64), torch.float32)
    }


@pytest.mark.parametrize("make", [lambda g: random_w4(24, 64, 32, g), lambda g: random_w8(24, 64, 32, g)])
def test_select_and_concat_rows_are_exact_on_packed_data(make):
    gen = torch.Generator().manual_seed(5)
    a, b = make(gen), make(gen)
    method = method_for(a.config)
    index = torch.tensor([5, 0, 23, 7])
    assert torch.equal(method.dequantize(a.select_rows(index).tensors), method.dequantize(a.tensors)[index])
    fused = QuantizedWeight.concat_rows([a, b])
    assert fused.out_features == 48
    expected = torch.cat([method.dequantize(a.tensors), method.dequantize(b.tensors)])
    assert torch.equal(method.dequantize(fused.tensors), expected)
    with pytest.raises(ValueError):
        QuantizedWeight.concat_rows([a, random_dense(24, 64, gen)])


# --- round-to-nearest ----------------------------------------------------------------------------


def _weight_with_zeros(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[torch.rand(n, k, generator=gen) < 0.1] = 0.0
    w[1] = torch.rand(k, generator=gen) + 0.1  # all positive row: the range is widened to include 0
    w[2] = -torch.rand(k, generator=gen) - 0.1  # all negative row
    w[3, :32] = 0.0  # an all-zero group
    return w


@pytest.mark.parametrize("group", [32, 128])
def test_w4a16_rtn_error_within_half_a_step(group):
    w = _weight_with_zeros(16, 256, group)
    qw = quantize_w4a16_rtn(w, group)
    assert qw.config == W4A16Config(group) and (qw.out_features, qw.in_features) == (16, 256)
    method = method_for(qw.config)
    method.check(qw)
    scales, mins = qw.tensors["scales"], qw.tensors["mins"]
    # Independent: the grid spans [min(w, 0), max(w, 0)] in 15 steps, with an integer zero point.
    wg = w.reshape(16, 256 // group, group)
    step = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
    torch.testing.assert_close(scales, step.clamp(min=1e-8), rtol=1e-6, atol=0.0)
    zero = -mins / scales  # an integer in [0, 15] (up to the rounding of mins = -zero * scale)
    torch.testing.assert_close(zero, zero.round(), rtol=0.0, atol=1e-5)
    assert bool((zero.round() >= 0).all()) and bool((zero.round() <= 15).all())

    deq = method.dequantize(qw.tensors)
    half_step = scales.repeat_interleave(group, dim=1) / 2
    assert bool(((deq - w).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))  # zeros are exact
    assert torch.equal(deq[3, :32], torch.zeros(32))


@pytest.mark.parametrize("group", [None, 32])
def test_w8a16_rtn_error_within_half_a_step(group):
    w = _weight_with_zeros(16, 128, 7)
    qw = quantize_w8a16_rtn(w, group)
    assert qw.config == W8A16Config(group)
    method = method_for(qw.config)
    method.check(qw)
    g = group or 128
    scales = qw.tensors["scales"]
    expected = (w.reshape(16, 128 // g, g).abs().amax(-1) / 127).clamp(min=1e-8)
    torch.testing.assert_close(scales, expected, rtol=1e-6, atol=0.0)
    q = qw.tensors["qweight"]
    assert q.dtype == torch.int8 and int(q.min()) >= -127 and int(q.max()) <= 127
    deq = method.dequantize(qw.tensors)
    half_step = scales.repeat_interleave(g, dim=1) / 2
    assert bool(((deq - w).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))


def test_w4a16_rtn_exact_on_grid():
    gen = torch.Generator().manual_seed(8)
    n, k, group = 8, 128, 32
    q = torch.randint(0, 16, (n, k), generator=gen)
    q[:, ::group] = 0  # each group reaches both ends of the grid, so RTN finds the same grid
    q[:, 1::group] = 15
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    step = 2.0 ** -torch.randint(3, 8, (n, k // group), generator=gen).float()  # exact in fp32
    w = (q.float() - zero.repeat_interleave(group, 1)) * step.repeat_interleave(group, 1)
    qw = quantize_w4a16_rtn(w, group)
    assert torch.equal(qw.tensors["scales"], step)
    assert torch.equal(unpack_int4(qw.tensors["qweight"]), q.to(torch.uint8))
    assert torch.equal(method_for(qw.config).dequantize(qw.tensors), w)


@pytest.mark.parametrize("group", [None, 32])
def test_w8a16_rtn_exact_on_grid(group):
    gen = torch.Generator().manual_seed(9)
    n, k = 8, 64
    g = group or k
    q = torch.randint(-127, 128, (n, k), generator=gen)
    q[:, ::g] = 127 * torch.where(torch.rand(n, k // g, generator=gen) < 0.5, -1, 1)  # amax = 127 steps
    step = 2.0 ** -torch.randint(4, 10, (n, k // g), generator=gen).float()
    w = q.float() * step.repeat_interleave(g, 1)
    qw = quantize_w8a16_rtn(w, group)
    assert torch.equal(qw.tensors["scales"], step)
    assert torch.equal(qw.tensors["qweight"], q.to(torch.int8))
    assert torch.equal(method_for(qw.config).dequantize(qw.tensors), w)


def test_rtn_packs_and_runs_end_to_end(monkeypatch):
    monkeypatch.setattr(extension, "load", lambda: None)  # torch's kernels; cpu_gemm's have their own tests
    w = _weight_with_zeros(48, 256, 10)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    for scheme, kernel in [("w4a16", "cpu-int4pack"), ("w8a16", "cpu-int8pack")]:
        qw = quantize_rtn(w, scheme)
        method = method_for(qw.config)
        packed = method.load(qw, CPU, torch.bfloat16)
        assert packed.kernel.name == kernel
        assert_close_rel(packed(x), x.float() @ method.dequantize(qw.tensors).T, TOL[torch.bfloat16])
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_rtn(w, "w3a16")
    with pytest.raises(ValueError, match="multiple of group size"):
        quantize_w4a16_rtn(w[:, :96], 64)
