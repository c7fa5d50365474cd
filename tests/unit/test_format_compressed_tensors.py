"""compressed-tensors <-> canonical W4A16 / W8A16 / W8A8, against the `compressed-tensors` package
itself (an independent producer and consumer) and transformers running the package's weights.

The package is a test-only dependency; lowbit's loader implements the packing on its own."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.quantization.utils import calculate_qparams
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowbit import LLM
from lowbit.kernels.cpu import extension
from lowbit.kernels.w4a16_matmul import pack_int4
from lowbit.kernels.w8a8_matmul import w8a8_matmul_ref
from lowbit.loaders.compressed_tensors import (
    CompressedTensorsWriter,
    CtConfig,
    canonical_to_ct,
    ct_to_canonical,
)
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.registry import load_checkpoint
from lowbit.loaders.tokenizer import tokenizer_from_gguf
from lowbit.loaders.writer import write_checkpoint
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, W8A8Config, W8A16Config, method_for


def _i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ---------------------------------------------------------------------- a hand-packed example
# 8 outputs, 16 inputs, group size 8. Codes q = x_q + 8: row 1 holds 15 - k, every other row k.
# Element k of a row is at bit 4k of the row's bit stream: word k // 8, bits 4 (k % 8)...
HAND_PACKED = [[0x76543210, 0xFEDCBA98]] + [[0x89ABCDEF, 0x01234567]] + [[0x76543210, 0xFEDCBA98]] * 6
# zero points z = zp + 8: group 0 holds n + 1 for output n, group 1 holds 8; packed along outputs.
HAND_ZERO_POINT = [[0x87654321, 0x88888888]]


def _hand_q() -> torch.Tensor:
    return torch.tensor([[15 - k if n == 1 else k for k in range(16)] for n in range(8)])  # [N, K]


def _hand_zeros() -> torch.Tensor:
    return torch.tensor([[n + 1, 8] for n in range(8)])  # [N, G]


def _hand_scales() -> torch.Tensor:
    return torch.tensor([[0.5, 0.25 * (n + 1)] for n in range(8)])  # [N, G]


def _words(rows) -> torch.Tensor:
    return torch.tensor([[_i32(w) for w in row] for row in rows], dtype=torch.int32)


def _w4(q, zeros, scales, group) -> QuantizedWeight:
    """Canonical W4A16 from codes q [N, K] in [0, 15], zeros and scales [N, G]."""
    tensors = {"qweight": pack_int4(q), "scales": scales.float(), "mins": -zeros.float() * scales.float()}
    return QuantizedWeight(W4A16Config(group), q.shape[0], q.shape[1], tensors)


def test_hand_packed_words_both_ways_and_as_the_package_packs():
    weight = _w4(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    tensors, scheme = canonical_to_ct(weight, torch.float32)
    assert torch.equal(tensors["weight_packed"], _words(HAND_PACKED))
    assert torch.equal(tensors["weight_zero_point"], _words(HAND_ZERO_POINT))
    assert tensors["weight_shape"].tolist() == [8, 16]
    # the package packs the signed values the same way
    assert torch.equal(pack_to_int32((_hand_q() - 8).to(torch.int8), 4), _words(HAND_PACKED))
    assert torch.equal(
        pack_to_int32((_hand_zeros() - 8).to(torch.int8), 4, packed_dim=0), _words(HAND_ZERO_POINT)
    )
    # and reading the hand words gives w = (x_q - zp) * s element by element
    back = ct_to_canonical(tensors, "", CtConfig.from_dict(_config(scheme)).scheme_for("x"), 8, 16)
    q, z, s = _hand_q(), _hand_zeros(), _hand_scales()
    expected = torch.tensor(
        [[(int(q[n, k]) - int(z[n, k // 8])) * float(s[n, k // 8]) for k in range(16)] for n in range(8)]
    )
    assert torch.equal(method_for(back.config).dequantize(back.tensors), expected)


def _config(*schemes: dict) -> dict:
    groups = {f"group_{i}": {"targets": ["Linear"], **s} for i, s in enumerate(schemes)}
    formats = {s["format"] for s in schemes}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop(),
        "config_groups": groups,
        "ignore": [],
    }


# ---------------------------------------------------------------------- the package as consumer


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """fp16-representable values, so every product below is exact in fp32 and comparisons can be."""
    return t.half().float()


def _random_weights(gen) -> dict[str, QuantizedWeight]:
    n, k = 24, 64
    q4 = torch.randint(0, 16, (n, k), generator=gen)
    s4 = _fp16_exact(torch.rand(n, k // 16, generator=gen) * 0.1 + 1e-3)
    s_channel = _fp16_exact(torch.rand(n, 1, generator=gen) * 0.1 + 1e-3)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return {
        "w4a16_sym": _w4(q4, torch.full((n, 4), 8), s4, 16),
        "w4a16_asym": _w4(q4, torch.randint(0, 16, (n, 4), generator=gen), s4, 16),
        "w4a16_channel": _w4(q4, torch.randint(0, 16, (n, 1), generator=gen), s_channel, k),
        "w8a16": QuantizedWeight(W8A16Config(16), n, k, {"qweight": q8, "scales": s4}),
        "w8a16_channel": QuantizedWeight(W8A16Config(None), n, k, {"qweight": q8, "scales": s_channel}),
        "w8a8": QuantizedWeight(W8A8Config(), n, k, {"qweight": q8, "scales": s_channel}),
    }


@pytest.mark.parametrize(
    "kind", ["w4a16_sym", "w4a16_asym", "w4a16_channel", "w8a16", "w8a16_channel", "w8a8"]
)  # fmt: skip
def test_the_package_decompresses_what_we_write_to_our_weights(kind):
    weight = _random_weights(torch.Generator().manual_seed(0))[kind]
    tensors, scheme = canonical_to_ct(weight, torch.float32)
    config = QuantizationConfig.model_validate(_config(scheme))  # the package accepts our config
    package_scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    dense = compressor.decompress(tensors, package_scheme)["weight"]
    assert torch.equal(dense, method_for(weight.config).dequantize(weight.tensors))
    back = ct_to_canonical(tensors, "", CtConfig.from_dict(_config(scheme)).scheme_for("x"), 24, 64)
    assert back.config == weight.config
    for name, tensor in weight.tensors.items():
        assert torch.equal(back.tensors[name], tensor), name


def test_writer_config_is_accepted_by_the_package():
    weights = _random_weights(torch.Generator().manual_seed(1))
    writer = CompressedTensorsWriter(torch.float16)
    writer.add("model.layers.0.mlp.up_proj", weights["w4a16_asym"])
    writer.add("model.layers.0.mlp.down_proj", weights["w4a16_asym"])
    single = writer.quantization_config()
    assert single["format"] == "pack-quantized" and single["ignore"] == ["lm_head"]
    assert single["config_groups"]["group_0"]["targets"] == ["Linear"]
    QuantizationConfig.model_validate(single)
    writer.add("model.layers.0.self_attn.o_proj", weights["w8a8"])
    writer.dense("model.layers.0.self_attn.q_proj")
    mixed = writer.quantization_config()
    assert mixed["format"] == "mixed-precision"
    assert mixed["ignore"] == ["lm_head", "model.layers.0.self_attn.q_proj"]
    parsed = QuantizationConfig.model_validate(mixed)
    assert {tuple(g.targets) for g in parsed.config_groups.values()} == {
        ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
        ("model.layers.0.self_attn.o_proj",),
    }
    ours = CtConfig.from_dict(mixed)
    assert ours.scheme_for("model.layers.0.self_attn.o_proj").scheme == "w8a8"
    assert ours.scheme_for("model.layers.0.mlp.up_proj").scheme == "w4a16"
    assert ours.scheme_for("model.layers.0.self_attn.q_proj") is None


def test_config_targets_presets_regexes_and_ignore():
    config = CtConfig.from_dict(
        {
            "quant_method": "compressed-tensors",
            "format": "mixed-precision",
            "config_groups": {"W4A16": ["re:.*mlp.*"], "W8A8": ["model.layers.0.mlp.down_proj"]},
            "ignore": ["lm_head", "re:.*layers\\.1\\..*"],
        }
    )
    down = config.scheme_for("model.layers.0.mlp.down_proj")
    assert down is not None and down.scheme == "w8a8"  # an exact name beats a regex
    up = config.scheme_for("model.layers.0.mlp.up_proj")
    assert up is not None and (up.scheme, up.group_size, up.symmetric) == ("w4a16", 128, True)
    assert config.scheme_for("model.layers.0.self_attn.q_proj") is None  # no target matches
    assert config.scheme_for("model.layers.1.mlp.up_proj") is None  # ignored
    assert config.scheme_for("lm_head") is None


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}},
         "'float' weights are not supported"),
        ({"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
          "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False}},
         "input activations .* are not supported"),
        ({"targets": ["Linear"], "weights": {"num_bits": 3, "group_size": 128, "strategy": "group"}},
         "3-bit symmetric weights .* is not supported"),
        ({"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128, "actorder": "group"}},
         "actorder 'group'"),
    ],
)  # fmt: skip
def test_unsupported_schemes_are_refused(group, message):
    with pytest.raises(ValueError, match=message):
        CtConfig.from_dict({"format": "pack-quantized", "config_groups": {"g": group}})


def test_tensor_errors_name_the_tensor():
    weight = _w4(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    tensors, scheme = canonical_to_ct(weight, torch.float32)
    scheme_ = CtConfig.from_dict(_config(scheme)).scheme_for("m")
    raw = {f"m.{k}": v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"missing tensor 'm\.weight_scale'"):
        ct_to_canonical({k: v for k, v in raw.items() if k != "m.weight_scale"}, "m", scheme_, 8, 16)
    with pytest.raises(ValueError, match=r"tensor 'm\.weight_shape' says \[8, 16\], expected \[8, 32\]"):
        ct_to_canonical({**raw, "m.weight_packed": torch.zeros(8, 4, dtype=torch.int32),
                         "m.weight_scale": torch.ones(8, 4)}, "m", scheme_, 8, 32)  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor 'm\.weight_packed' has shape \(8, 2\), expected \(16, 2\)"):
        ct_to_canonical(raw, "m", scheme_, 16, 16)


def test_weights_it_cannot_hold_are_refused():
    weight = _w4(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    act_order = QuantizedWeight(W4A16Config(8, True), 8, 16, {**weight.tensors, "perm": torch.arange(16)})
    with pytest.raises(ValueError, match="cannot hold act-order"):
        canonical_to_ct(act_order, torch.float16)
    q4_1 = _w4(_hand_q(), _hand_zeros(), _hand_scales(), 8)
    q4_1.tensors["mins"] = q4_1.tensors["mins"] + 0.5 * q4_1.tensors["scales"]
    with pytest.raises(ValueError, match="mins are not integer multiples"):
        canonical_to_ct(q4_1, torch.float16)


# ---------------------------------------------------------------------- the package as producer

VOCAB = 49152  # the default model's tokenizer is reused
W4A16_ASYM_32 = {
    "format": "pack-quantized",
    "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
}
W4A16_SYM_CHANNEL = {
    "format": "pack-quantized",
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
}
W8A16_GROUP_32 = {
    "format": "pack-quantized",
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
}
W8A8 = {
    "format": "int-quantized",
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "input_activations": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "dynamic": True,
    },
}


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return tokenizer_from_gguf(read_gguf(default_gguf).metadata)


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif "proj" in name:
                p.mul_(4.0)  # make the projections matter next to the residual stream
    return model


def _package_quantized(path, tokenizer, scheme: dict):
    """The package's own flow: attach the scheme, calibrate min-max qparams with the package's
    `calculate_qparams`, compress, save. Returns (the compressed model's int8/packed state,
    a plain transformers model holding the package's decompressed weights)."""
    model = _tiny_llama()
    config = QuantizationConfig.model_validate(
        {"config_groups": {"group_0": {"targets": ["Linear"], **scheme}}, "ignore": ["lm_head"],
         "format": scheme["format"]}
    )  # fmt: skip
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data
        rows = w.reshape(w.shape[0], -1, args.group_size) if args.group_size else w[:, None, :]
        scale, zero = calculate_qparams(rows.amin(-1), rows.amax(-1), args)  # [N, G]
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, scheme["format"])
    compressor.compress_model(model)
    compressed = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(path)
    compressor.update_config(str(path))
    tokenizer.hf.save_pretrained(path)
    compressor.decompress_model(model)
    reference = LlamaForCausalLM(model.config).eval()
    state = model.state_dict()
    reference.load_state_dict({k: state[k] for k in reference.state_dict()})
    return compressed, reference


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _check_weights_match(path, reference, scheme_name):
    checkpoint = load_checkpoint(path)
    ref_state = reference.state_dict()
    for name in ref_state:
        ours = checkpoint.weights[name]
        if name.split(".")[-2] in PROJECTIONS:
            assert isinstance(ours, QuantizedWeight) and ours.config.name == scheme_name, name
            ours = method_for(ours.config).dequantize(ours.tensors)
        torch.testing.assert_close(ours, ref_state[name], rtol=1e-6, atol=1e-7, msg=name)


WEIGHT_ONLY = {
    "w4a16_asym_group32": W4A16_ASYM_32,
    "w4a16_sym_channel": W4A16_SYM_CHANNEL,
    "w8a16_group32": W8A16_GROUP_32,
}


@pytest.mark.parametrize("kind", list(WEIGHT_ONLY))
def test_package_compressed_weight_only_loads_to_the_packages_weights_and_logits(tmp_path, tokenizer, kind):
    scheme = WEIGHT_ONLY[kind]
    _, reference = _package_quantized(tmp_path / "package", tokenizer, scheme)
    _check_weights_match(tmp_path / "package", reference, kind[:5])
    ids = tokenizer.encode(TEXT)
    expected = _hf_logits(reference, ids)
    ours = LLM(str(tmp_path / "package"), dtype="float32", kv_cache_memory=16 << 20).engine.score(ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    if not scheme["weights"]["symmetric"]:
        return  # transformers 5.23 + compressed-tensors 0.20 cannot load asymmetric pack-quantized at all
    # and back: what we write, transformers (through the package) runs to the same logits
    path = write_checkpoint(
        load_checkpoint(tmp_path / "package"), tmp_path / "ours", "compressed-tensors", torch.float32
    )
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    torch.testing.assert_close(_hf_logits(theirs, ids), expected, atol=1e-4, rtol=0)


def test_package_compressed_w8a8_matches_per_token_activation_quantization(tmp_path, tokenizer, monkeypatch):
    compressed, reference = _package_quantized(tmp_path, tokenizer, W8A8)
    _check_weights_match(tmp_path, reference, "w8a8")
    ids = tokenizer.encode(TEXT)
    # Eager torch attention, as the reference's: an fp32 attention that differs from it by rounding
    # (the compiled prefill op: ~1e-7) flips an activation's int8 rounding now and then, and one
    # flip moves this tiny model's logits by ~1e-2 from there on, as much as activation
    # quantization itself. The compiled ops are held to their references in tests/kernels.
    monkeypatch.setattr(extension, "load", lambda: None)
    ours = LLM(str(tmp_path), dtype="float32", kv_cache_memory=16 << 20).engine.score(ids)
    dense = _hf_logits(reference, ids)
    for name, module in reference.named_modules():
        if name.split(".")[-1] in PROJECTIONS:  # the package's int8 weights, activations per token
            q, s = compressed[f"{name}.weight"], compressed[f"{name}.weight_scale"]
            module.forward = lambda x, q=q, s=s: w8a8_matmul_ref(x, q, s)
    ref = _hf_logits(reference, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (dense - ref).abs().max() > 1e-3  # activation quantization really changes the logits
