"""AWQ (GEMM) tensors <-> canonical W4A16, checked against AutoAWQ's layout as its code documents it
(`WQLinear_GEMM.from_linear`: nibble i of a word holds output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]):
int32 words written out by hand and a naive per-element decoder written here."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.w4a16_matmul import pack_int4
from lowbit.loaders.awq import AwqConfig, AwqWriter, awq_to_canonical, canonical_to_awq
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, method_for
from lowbit.runtime.quant.rtn import quantize_w8a8_rtn

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map, as written in its packing loop


def _i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _words(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[_i32(w) for w in row] for row in rows], dtype=torch.int32)


# ---------------------------------------------------------------------- a hand-packed example
# 16 inputs, 8 outputs, group size 8. q[i, n] = n on even input rows, 15 - n on odd rows.
# Nibbles (lowest first) hold outputs 0, 2, 4, 6, 1, 3, 5, 7:
#   even rows: 0, 2, 4, 6, 1, 3, 5, 7      -> 0x75316420
#   odd rows:  15, 13, 11, 9, 14, 12, 10, 8 -> 0x8ACE9BDF
HAND_QWEIGHT = [[0x75316420], [0x8ACE9BDF]] * 8
# zeros: group 0 holds n + 1 for output n -> nibbles 1, 3, 5, 7, 2, 4, 6, 8; group 1 holds 8.
HAND_QZEROS = [[0x86427531], [0x88888888]]


def _hand_q() -> torch.Tensor:
    return torch.tensor([[n if i % 2 == 0 else 15 - n for n in range(8)] for i in range(16)])  # [K, N]


def _hand_zeros() -> torch.Tensor:
    return torch.tensor([[n + 1 for n in range(8)], [8] * 8])  # [G, N]


def _hand_scales() -> torch.Tensor:
    return torch.tensor([[0.5] * 8, [0.25 * (n + 1) for n in range(8)]], dtype=torch.float16)  # [G, N]


def _hand_raw() -> dict[str, torch.Tensor]:
    return {"qweight": _words(HAND_QWEIGHT), "qzeros": _words(HAND_QZEROS), "scales": _hand_scales()}


def _naive(q, zeros, scales, group) -> torch.Tensor:
    k, n_out = q.shape
    w = torch.zeros(n_out, k)
    for i in range(k):
        for n in range(n_out):
            w[n, i] = (int(q[i, n]) - int(zeros[i // group, n])) * float(scales[i // group, n])
    return w


def _canonical(q, zeros, scales, group) -> QuantizedWeight:
    s = scales.float().T.contiguous()
    tensors = {"qweight": pack_int4(q.T.contiguous()), "scales": s, "mins": -zeros.T.float() * s}
    return QuantizedWeight(W4A16Config(group), q.shape[1], q.shape[0], tensors)


def test_hand_packed_words_read_as_documented():
    weight = awq_to_canonical(_hand_raw(), "", AwqConfig(4, 8), 8, 16)
    assert weight.config == W4A16Config(8)
    expected = _naive(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    assert torch.equal(method_for(weight.config).dequantize(weight.tensors), expected)


def test_canonical_writes_the_hand_packed_words():
    out = canonical_to_awq(_canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8))
    for name, tensor in _hand_raw().items():
        assert out[name].dtype == tensor.dtype, name
        assert torch.equal(out[name], tensor), name


def _unpack_naive(words: torch.Tensor) -> torch.Tensor:
    """[R, N/8] words -> [R, N]: output 8c + ORDER[j] is nibble j of word c."""
    rows, cols = words.shape
    out = torch.zeros(rows, cols * 8, dtype=torch.int64)
    for r in range(rows):
        for c in range(cols):
            for j in range(8):
                out[r, 8 * c + ORDER[j]] = (int(words[r, c]) >> (4 * j)) & 15
    return out


def test_random_file_tensors_dequantize_like_the_naive_decoder():
    gen = torch.Generator().manual_seed(0)
    k, n, group = 32, 16, 8
    raw = {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k, n // 8), generator=gen, dtype=torch.int32),
        "qzeros": torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), generator=gen, dtype=torch.int32),
        "scales": torch.rand(k // group, n, generator=gen).half(),
    }
    weight = awq_to_canonical(raw, "", AwqConfig(4, group), n, k)
    expected = _naive(_unpack_naive(raw["qweight"]), _unpack_naive(raw["qzeros"]), raw["scales"], group)
    assert torch.equal(method_for(weight.config).dequantize(weight.tensors), expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [8, 32], ids=["grouped", "per_channel"])
def test_read_of_write_is_identity(symmetric, group):
    gen = torch.Generator().manual_seed(1)
    k, n = 32, 24
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = (
        torch.full((k // group, n), 8) if symmetric else torch.randint(0, 16, (k // group, n), generator=gen)
    )
    scales = (torch.rand(k // group, n, generator=gen) * 0.1 + 1e-3).half()
    weight = _canonical(q, zeros, scales, group)
    config = AwqConfig(4, -1 if group == k else group)
    back = awq_to_canonical(canonical_to_awq(weight), "", config, n, k)
    assert back.config == weight.config
    for name, tensor in weight.tensors.items():
        assert torch.equal(back.tensors[name], tensor), name


# ---------------------------------------------------------------------- config and errors


def test_config_reads_autoawq_and_transformers_spellings():
    assert AwqConfig.from_dict(
        {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "GEMM"}
    ) == AwqConfig(4, 64)
    assert AwqConfig.from_dict({"w_bit": 4, "q_group_size": 32, "zero_point": True}) == AwqConfig(4, 32)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bits": 3, "group_size": 128}, r"AWQ bits 3 is not supported \(supported: 4\)"),
        ({"bits": 4, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
        ({"bits": 4, "zero_point": False}, "zero_point: false"),
    ],
)
def test_unsupported_configs(config, message):
    with pytest.raises(ValueError, match=message):
        AwqConfig.from_dict(config)


def test_tensor_errors_name_the_tensor():
    raw = {f"m.{k}": v for k, v in _hand_raw().items()}
    with pytest.raises(ValueError, match=r"tensor 'm\.qweight' has shape \(8, 1\), expected \(16, 1\)"):
        awq_to_canonical({**raw, "m.qweight": raw["m.qweight"][:8]}, "m", AwqConfig(4, 8), 8, 16)
    with pytest.raises(ValueError, match=r"missing tensor 'm\.qzeros'"):
        awq_to_canonical({k: v for k, v in raw.items() if k != "m.qzeros"}, "m", AwqConfig(4, 8), 8, 16)


def test_weights_awq_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="AWQ holds W4A16 weights, not w8a8"):
        canonical_to_awq(quantize_w8a8_rtn(torch.randn(8, 16)))
    weight = _canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    act_order = QuantizedWeight(W4A16Config(8, True), 8, 16, {**weight.tensors, "perm": torch.arange(16)})
    with pytest.raises(ValueError, match="AWQ cannot hold act-order"):
        canonical_to_awq(act_order)
    q4_1 = _canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    q4_1.tensors["mins"] = q4_1.tensors["mins"] - 0.25 * q4_1.tensors["scales"]
    with pytest.raises(ValueError, match="mins are not integer multiples of the scales"):
        canonical_to_awq(q4_1)
    zero16 = _canonical(_hand_q(), torch.full((2, 8), 16), _hand_scales(), 8)  # from a GPTQ v1 file
    with pytest.raises(ValueError, match=r"AWQ zero points must lie in \[0, 15\]"):
        canonical_to_awq(zero16)


def test_writer_needs_one_group_size_and_quantized_projections():
    writer = AwqWriter()
    writer.add("a", _canonical(_hand_q(), _hand_zeros(), _hand_scales(), 8))
    assert writer.quantization_config() == {
        "quant_method": "awq", "bits": 4, "group_size": 8, "zero_point": True, "version": "gemm",
    }  # fmt: skip
    writer.dense("lm_head")  # fine: AWQ leaves lm_head dense
    with pytest.raises(ValueError, match="quantizes every decoder projection"):
        writer.dense("model.layers.0.mlp.up_proj")
    q = torch.zeros(16, 8, dtype=torch.int64)
    writer.add("b", _canonical(q, torch.full((1, 8), 8), torch.ones(1, 8, dtype=torch.float16), 16))
    with pytest.raises(ValueError, match=r"one group size for all layers, got \[-1, 8\]"):
        writer.quantization_config()
