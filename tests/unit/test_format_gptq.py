"""GPTQ tensors <-> canonical W4A16 / W8A16, checked against the layout as AutoGPTQ documents it in
code (qlinear_cuda_old: `pack` and the torch fallback of `forward`): int32 words written out by hand,
and a naive per-element decoder written here from that description."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.w4a16_matmul import pack_int4
from lowbit.loaders.gptq import GptqConfig, GptqWriter, canonical_to_gptq, gptq_to_canonical
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, W8A16Config, method_for
from lowbit.runtime.quant.rtn import quantize_w8a8_rtn, quantize_w8a16_rtn


def _i32(word: int) -> int:
    """An unsigned 32-bit pattern as the signed value torch.int32 holds."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _words(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[_i32(w) for w in row] for row in rows], dtype=torch.int32)


# ---------------------------------------------------------------------- a hand-packed example
# 16 inputs, 8 outputs, group size 8 (2 groups).
# q[i, n]: rows 0-7 hold i, except output 1 which holds 15 - i; rows 8-15 hold i - 8, except output 0,
# which holds 15. Packed along the input dim, value j of a word in bits 4j..4j+3:
HAND_QWEIGHT = [
    [0x76543210, 0x89ABCDEF] + [0x76543210] * 6,
    [0xFFFFFFFF] + [0x76543210] * 7,
]
# zero points: group 0 holds n + 1 for output n, group 1 holds 8 everywhere; packed along outputs.
HAND_ZEROS_V2 = [[0x87654321], [0x88888888]]
HAND_ZEROS_V1 = [[0x76543210], [0x77777777]]  # v1 stores zero - 1


def _hand_q() -> torch.Tensor:
    q = torch.zeros(16, 8, dtype=torch.int64)  # [K, N]
    for i in range(16):
        for n in range(8):
            if i < 8:
                q[i, n] = 15 - i if n == 1 else i
            else:
                q[i, n] = 15 if n == 0 else i - 8
    return q


def _hand_zeros() -> torch.Tensor:
    return torch.tensor([[n + 1 for n in range(8)], [8] * 8])  # [G, N]


def _hand_scales() -> torch.Tensor:
    return torch.tensor([[0.5] * 8, [0.25 * (n + 1) for n in range(8)]], dtype=torch.float16)  # [G, N]


def _naive(q, zeros, scales, g_idx) -> torch.Tensor:
    """w[n, i] = (q[i, n] - z[g_idx[i], n]) * s[g_idx[i], n], one element at a time."""
    k, n_out = q.shape
    w = torch.zeros(n_out, k)
    for i in range(k):
        for n in range(n_out):
            g = int(g_idx[i])
            w[n, i] = (int(q[i, n]) - int(zeros[g, n])) * float(scales[g, n])
    return w


def _hand_raw(version: str, g_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    zeros = HAND_ZEROS_V1 if version == "gptq" else HAND_ZEROS_V2
    return {
        "qweight": _words(HAND_QWEIGHT),
        "qzeros": _words(zeros),
        "scales": _hand_scales(),
        "g_idx": g_idx.to(torch.int32),
    }


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_hand_packed_words_read_as_documented(version):
    g_idx = torch.arange(16) // 8
    weight = gptq_to_canonical(
        _hand_raw(version, g_idx), "", GptqConfig(4, 8, checkpoint_format=version), 8, 16
    )
    assert weight.config == W4A16Config(8, act_order=False)
    expected = _naive(_hand_q(), _hand_zeros(), _hand_scales(), g_idx)
    assert torch.equal(method_for(weight.config).dequantize(weight.tensors), expected)


def _canonical(q, zeros, scales, group, perm=None) -> QuantizedWeight:
    """Canonical W4A16 from integer codes q [K, N] (stored column order), zeros/scales [G, N]."""
    s = scales.float().T.contiguous()
    tensors = {"qweight": pack_int4(q.T.contiguous()), "scales": s, "mins": -zeros.T.float() * s}
    if perm is not None:
        tensors["perm"] = perm
    k, n = q.shape
    return QuantizedWeight(W4A16Config(group, perm is not None), n, k, tensors)


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_canonical_writes_the_hand_packed_words(version):
    out = canonical_to_gptq(_canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8), version)
    expected = _hand_raw(version, torch.arange(16) // 8)
    assert set(out) == set(expected)
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype, name
        assert torch.equal(out[name], tensor), name


# Act-order: even inputs are group 0, odd inputs group 1 (g_idx = i % 2), same words as above.
HAND_PERM = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_act_order_reads_to_a_permutation_and_writes_back(version):
    g_idx = torch.arange(16) % 2
    raw = _hand_raw(version, g_idx)
    weight = gptq_to_canonical(raw, "", GptqConfig(4, 8, desc_act=True, checkpoint_format=version), 8, 16)
    assert weight.config == W4A16Config(8, act_order=True)
    assert weight.tensors["perm"].tolist() == HAND_PERM
    expected = _naive(_hand_q(), _hand_zeros(), _hand_scales(), g_idx)
    assert torch.equal(method_for(weight.config).dequantize(weight.tensors), expected)
    back = canonical_to_gptq(weight, version)
    for name in raw:
        assert torch.equal(back[name], raw[name]), name


def test_trivial_g_idx_under_desc_act_is_not_act_order():
    raw = _hand_raw("gptq_v2", torch.arange(16) // 8)
    weight = gptq_to_canonical(raw, "", GptqConfig(4, 8, desc_act=True, checkpoint_format="gptq_v2"), 8, 16)
    assert weight.config == W4A16Config(8, act_order=False)


# ---------------------------------------------------------------------- random round trips


def _random_canonical(gen, n, k, group, zeros, act_order) -> QuantizedWeight:
    """q, scales (fp16-exact) and zeros drawn at random; perm sorted within each group (the order
    GPTQ's g_idx can express)."""
    groups = k // group
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.1 + 1e-3).half()
    perm = None
    if act_order:
        perm = torch.randperm(k, generator=gen).reshape(groups, group).sort(dim=1).values.flatten()
    return _canonical(q, zeros(groups, n), scales, group, perm)


ZEROS = {
    "sym": lambda g, n: torch.full((g, n), 8),
    "asym": lambda g, n: torch.randint(1, 16, (g, n), generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("symmetry", ["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_read_of_write_is_identity(version, symmetry, act_order):
    gen = torch.Generator().manual_seed(0)
    weight = _random_canonical(gen, 24, 64, 16, ZEROS[symmetry], act_order)
    config = GptqConfig(4, 16, desc_act=act_order, sym=symmetry == "sym", checkpoint_format=version)
    back = gptq_to_canonical(canonical_to_gptq(weight, version), "", config, 24, 64)
    assert back.config == weight.config
    assert set(back.tensors) == set(weight.tensors)
    for name, tensor in weight.tensors.items():
        assert torch.equal(back.tensors[name], tensor), name


def test_any_act_order_permutation_keeps_the_dequantized_weight():
    """g_idx cannot say the order of columns inside a group; the weight's meaning survives anyway."""
    gen = torch.Generator().manual_seed(2)
    weight = _random_canonical(gen, 8, 32, 8, ZEROS["asym"], act_order=False)
    perm = torch.randperm(32, generator=gen)
    weight = QuantizedWeight(W4A16Config(8, True), 8, 32, {**weight.tensors, "perm": perm})
    back = gptq_to_canonical(
        canonical_to_gptq(weight, "gptq_v2"), "", GptqConfig(4, 8, True, False, "gptq_v2"), 8, 32
    )
    method = method_for(weight.config)
    assert torch.equal(method.dequantize(back.tensors), method.dequantize(weight.tensors))


def test_extreme_zero_points_round_trip_where_the_version_can_hold_them():
    gen = torch.Generator().manual_seed(3)
    for version, zero in (("gptq", 16), ("gptq_v2", 0)):
        weight = _random_canonical(gen, 8, 16, 8, lambda g, n, z=zero: torch.full((g, n), z), False)
        back = gptq_to_canonical(
            canonical_to_gptq(weight, version), "", GptqConfig(4, 8, checkpoint_format=version), 8, 16
        )
        assert torch.equal(back.tensors["mins"], weight.tensors["mins"])


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_random_file_tensors_dequantize_like_the_naive_decoder(version, act_order):
    """Arbitrary int32 words (every nibble value, v1's stored 15 = zero 16 included)."""
    gen = torch.Generator().manual_seed(4)
    k, n, group = 32, 16, 8
    raw = {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32),
        "qzeros": torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), generator=gen, dtype=torch.int32),
        "scales": torch.rand(k // group, n, generator=gen).half(),
        "g_idx": (
            torch.randperm(k, generator=gen) % (k // group) if act_order else torch.arange(k) // group
        ).int(),
    }
    weight = gptq_to_canonical(raw, "", GptqConfig(4, group, act_order, False, version), n, k)
    q = torch.tensor(
        [[(int(raw["qweight"][i // 8, c]) >> (4 * (i % 8))) & 15 for c in range(n)] for i in range(k)]
    )
    stored = [
        [(int(raw["qzeros"][g, c // 8]) >> (4 * (c % 8))) & 15 for c in range(n)] for g in range(k // group)
    ]
    zeros = torch.tensor(stored) + (1 if version == "gptq" else 0)
    expected = _naive(q, zeros, raw["scales"], raw["g_idx"])
    assert torch.equal(method_for(weight.config).dequantize(weight.tensors), expected)


# ---------------------------------------------------------------------- 8-bit (symmetric) <-> W8A16


def test_8bit_symmetric_round_trips_through_w8a16():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=gen)
    for group in (None, 16):
        weight = quantize_w8a16_rtn(w, group)
        weight.tensors["scales"] = weight.tensors["scales"].half().float()  # GPTQ stores fp16 scales
        raw = canonical_to_gptq(weight, "gptq")
        assert raw["qweight"].shape == (16, 16) and raw["qzeros"].shape == ((64 // (group or 64)), 4)
        # value j of a word in bits 8j..8j+7: the first input of output 0 is q + 128 in the low byte
        assert int(raw["qweight"][0, 0]) & 0xFF == int(weight.tensors["qweight"][0, 0]) + 128
        assert int(raw["qzeros"][0, 0]) == 0x7F7F7F7F  # v1: zero 128 stored as 127
        back = gptq_to_canonical(raw, "", GptqConfig(8, group or -1, checkpoint_format="gptq"), 16, 64)
        assert back.config == W8A16Config(group)
        for name, tensor in weight.tensors.items():
            assert torch.equal(back.tensors[name], tensor), name


def test_asymmetric_8bit_is_refused():
    raw = canonical_to_gptq(quantize_w8a16_rtn(torch.randn(8, 16)), "gptq_v2")
    raw["qzeros"] = torch.full_like(raw["qzeros"], 0x01010101)
    with pytest.raises(ValueError, match="asymmetric 8-bit GPTQ"):
        gptq_to_canonical(raw, "", GptqConfig(8, -1, checkpoint_format="gptq_v2"), 8, 16)


# ---------------------------------------------------------------------- errors


def test_config_errors():
    with pytest.raises(ValueError, match=r"GPTQ bits 3 is not supported \(supported: \(4, 8\)\)"):
        GptqConfig.from_dict({"bits": 3, "group_size": 128})
    with pytest.raises(ValueError, match="GPTQ checkpoint_format 'marlin' is not supported"):
        GptqConfig.from_dict({"bits": 4, "checkpoint_format": "marlin"})
    assert GptqConfig.from_dict({"bits": 4, "group_size": 32, "desc_act": True}) == GptqConfig(
        4, 32, True, True, "gptq"
    )


def test_tensor_errors_name_the_tensor():
    raw = _hand_raw("gptq_v2", torch.arange(16) // 8)
    config = GptqConfig(4, 8, checkpoint_format="gptq_v2")
    bad = {f"layer.{k}": v for k, v in raw.items()} | {"layer.qweight": raw["qweight"][:1]}
    with pytest.raises(ValueError, match=r"tensor 'layer.qweight' has shape \(1, 8\), expected \(2, 8\)"):
        gptq_to_canonical(bad, "layer", config, 8, 16)
    missing = {f"layer.{k}": v for k, v in raw.items() if k != "scales"}
    with pytest.raises(ValueError, match=r"missing tensor 'layer\.scales'"):
        gptq_to_canonical(missing, "layer", config, 8, 16)
    wrong_dtype = {**raw, "qweight": raw["qweight"].float()}
    with pytest.raises(ValueError, match=r"tensor 'qweight' has dtype torch\.float32, expected int32"):
        gptq_to_canonical(wrong_dtype, "", config, 8, 16)
    uneven = {**raw, "g_idx": torch.tensor([0] * 9 + [1] * 7, dtype=torch.int32)}
    with pytest.raises(ValueError, match="group 0 has 9 input features, expected the group size 8"):
        gptq_to_canonical(uneven, "", config, 8, 16)
    out_of_range = {**raw, "g_idx": torch.tensor([0] * 8 + [2] * 8, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"group indices must lie in \[0, 2\)"):
        gptq_to_canonical(out_of_range, "", config, 8, 16)
    no_g_idx = {k: v for k, v in raw.items() if k != "g_idx"}
    with pytest.raises(ValueError, match="missing tensor 'g_idx' \\(desc_act is set\\)"):
        gptq_to_canonical(no_g_idx, "", GptqConfig(4, 8, desc_act=True, checkpoint_format="gptq_v2"), 8, 16)


def test_weights_gptq_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="GPTQ holds W4A16 or W8A16 weights, not w8a8"):
        canonical_to_gptq(quantize_w8a8_rtn(torch.randn(8, 16)), "gptq")
    zero0 = _canonical(_hand_q(), torch.zeros(2, 8, dtype=torch.int64), _hand_scales(), 8)
    with pytest.raises(ValueError, match=r"zero points must lie in \[1, 16\].*use gptq_v2"):
        canonical_to_gptq(zero0, "gptq")
    q4_1 = _canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    q4_1.tensors["mins"] = q4_1.tensors["mins"] + 0.3 * q4_1.tensors["scales"]  # GGUF Q4_1: float minimums
    with pytest.raises(ValueError, match="mins are not integer multiples of the scales"):
        canonical_to_gptq(q4_1, "gptq_v2")


def test_writer_config_follows_the_weights():
    gen = torch.Generator().manual_seed(6)
    writer = GptqWriter("gptq_v2")
    writer.add("a", _random_canonical(gen, 8, 32, 16, ZEROS["sym"], act_order=False))
    assert writer.quantization_config() == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq_v2",
    }  # fmt: skip
    writer.add("b", _random_canonical(gen, 8, 32, 16, ZEROS["asym"], act_order=True))
    config = writer.quantization_config()
    assert config["desc_act"] is True and config["sym"] is False
    writer.add("c", _random_canonical(gen, 8, 32, 8, ZEROS["sym"], act_order=False))
    with pytest.raises(
        ValueError, match=r"one bit width and group size for all layers.*group sizes \[8, 16\]"
    ):
        writer.quantization_config()
