"""write_checkpoint -> load_checkpoint / LLM(dir): every format gives back the canonical weights it was
given and the engine computes the same logits from the directory as from the in-memory checkpoint.
Also the directory-level errors of the safetensors loader for quantized checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lowbit import LLM
from lowbit.loaders.base import Checkpoint
from lowbit.loaders.registry import load_checkpoint
from lowbit.loaders.tokenizer import Tokenizer
from lowbit.loaders.writer import write_checkpoint
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine
from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, dense_weight
from lowbit.runtime.quant.rtn import quantize_w4a16_rtn, quantize_w8a8_rtn, quantize_w8a16_rtn

VOCAB = 256
PROJECTIONS = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}  # fmt: skip
IDS = [(37 * i + 5) % VOCAB for i in range(48)]
KV = 16 << 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A word-level vocabulary of VOCAB tokens (fast to save and load); ids 2 and 3 end generation."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer(hf, extra_eos_ids=[3])


def _model_config(tie: bool) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=tie,
    )  # fmt: skip


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def _fp16_scales(weight: QuantizedWeight) -> QuantizedWeight:
    """The same integer codes with fp16-representable scales (GPTQ and AWQ store fp16 scales)."""
    t = dict(weight.tensors)
    if "mins" in t:
        zeros = torch.round(-t["mins"] / t["scales"])
        t["mins"] = -zeros * _fp16_exact(t["scales"])
    t["scales"] = _fp16_exact(t["scales"])
    return QuantizedWeight(weight.config, weight.out_features, weight.in_features, t)


def _act_order_w4(w: torch.Tensor, gen) -> QuantizedWeight:
    """Symmetric W4A16 of w with columns quantized in a random order, sorted within each group."""
    out_features, in_features = w.shape
    perm = torch.randperm(in_features, generator=gen).reshape(-1, 32).sort(dim=1).values.flatten()
    stored = quantize_w4a16_rtn(w[:, perm], 32, symmetric=True)
    return QuantizedWeight(W4A16Config(32, True), out_features, in_features, {**stored.tensors, "perm": perm})


QUANTIZERS = {
    "w4a16": lambda w, gen: quantize_w4a16_rtn(w, 32),
    "w4a16_sym_act_order": _act_order_w4,
    "w8a16": lambda w, gen: quantize_w8a16_rtn(w),
    "w8a8": lambda w, gen: quantize_w8a8_rtn(w),
}


def _checkpoint(tokenizer, scheme: str, tie: bool = False, quantized_embedding: bool = False) -> Checkpoint:
    """A random tiny Llama whose projections are in `scheme`, every value fp16-exact."""
    gen = torch.Generator().manual_seed(0)
    weights: dict = {}
    embed = _fp16_exact(torch.randn(VOCAB, 64, generator=gen))
    weights["model.embed_tokens.weight"] = quantize_w8a16_rtn(embed, 32) if quantized_embedding else embed
    for i in range(2):
        for name in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{name}.weight"] = _fp16_exact(1 + 0.2 * torch.randn(64, generator=gen))
        for name, shape in PROJECTIONS.items():
            w = torch.randn(*shape, generator=gen) * 0.3
            weights[f"model.layers.{i}.{name}.weight"] = _fp16_scales(QUANTIZERS[scheme](w, gen))
    weights["model.norm.weight"] = _fp16_exact(1 + 0.2 * torch.randn(64, generator=gen))
    if not tie:
        weights["lm_head.weight"] = _fp16_exact(torch.randn(VOCAB, 64, generator=gen) * 0.1)
    return Checkpoint(_model_config(tie), weights, tokenizer, "memory")


def _in_memory_logits(checkpoint: Checkpoint, ids: list[int]) -> torch.Tensor:
    return Engine(EngineConfig(dtype="float32", kv_cache_memory=KV), checkpoint).score(ids)


def _assert_same_weights(path, checkpoint: Checkpoint, written_dense: bool = False) -> None:
    loaded = load_checkpoint(path)
    assert loaded.config == checkpoint.config
    expected_names = {n for n in checkpoint.weights}
    assert set(loaded.weights) == expected_names
    for name, weight in checkpoint.weights.items():
        got = loaded.weights[name]
        if isinstance(weight, QuantizedWeight) and not written_dense:
            assert isinstance(got, QuantizedWeight) and got.config == weight.config, name
            assert set(got.tensors) == set(weight.tensors), name
            for key, tensor in weight.tensors.items():
                assert torch.equal(got.tensors[key].to(tensor.dtype), tensor), f"{name} {key}"
        elif isinstance(weight, torch.Tensor):
            assert isinstance(got, torch.Tensor) and torch.equal(got.float(), weight.float()), name


CASES = [
    ("gptq", "w4a16"),
    ("gptq_v2", "w4a16"),
    ("gptq", "w4a16_sym_act_order"),
    ("gptq_v2", "w4a16_sym_act_order"),
    ("gptq", "w8a16"),
    ("awq", "w4a16"),
    ("compressed-tensors", "w4a16"),
    ("compressed-tensors", "w8a16"),
    ("compressed-tensors", "w8a8"),
]


@pytest.mark.parametrize(("fmt", "scheme"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_round_trip_gives_the_same_weights_and_logits(tmp_path, tokenizer, fmt, scheme):
    checkpoint = _checkpoint(tokenizer, scheme)
    path = write_checkpoint(checkpoint, tmp_path / "out", fmt)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt.removesuffix("_v2")
    _assert_same_weights(path, checkpoint)
    ids = IDS
    ours = LLM(str(path), dtype="float32", kv_cache_memory=KV).engine.score(ids)
    torch.testing.assert_close(ours, _in_memory_logits(checkpoint, ids), atol=1e-5, rtol=0)


DENSE_VS_PACKED_TOL = 5e-4


def test_dense_safetensors_holds_the_dequantized_weights(tmp_path, tokenizer):
    checkpoint = _checkpoint(tokenizer, "w4a16", tie=True, quantized_embedding=True)
    path = write_checkpoint(checkpoint, tmp_path / "out", "safetensors", dense_dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied
    assert all(t.dtype == torch.float32 for t in tensors.values())
    _assert_same_weights(path, checkpoint, written_dense=True)
    ids = IDS
    ours = LLM(str(path), dtype="float32", kv_cache_memory=KV).engine.score(ids)
    # The written model runs dense matmuls, the in-memory one the int4 kernel, which sums
    # scale * sum(q x) + min * sum(x) per group: the same products in another order (~1e-4).
    torch.testing.assert_close(ours, _in_memory_logits(checkpoint, ids), atol=DENSE_VS_PACKED_TOL, rtol=0)


def test_gptq_directory_files(tmp_path, tokenizer):
    checkpoint = _checkpoint(tokenizer, "w4a16_sym_act_order")
    path = write_checkpoint(checkpoint, tmp_path / "out", "gptq")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True,
        "checkpoint_format": "gptq",
    }  # fmt: skip
    assert json.loads((path / "quantize_config.json").read_text()) == config["quantization_config"]
    assert config["torch_dtype"] == "float16"
    generation = json.loads((path / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == set(tokenizer.eos_token_ids)
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (8, 64)
    assert tensors["model.layers.0.self_attn.q_proj.g_idx"].dtype == torch.int32
    assert tensors["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16
    assert tensors["lm_head.weight"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert load_checkpoint(path).tokenizer.eos_token_ids == tokenizer.eos_token_ids


def test_quantized_embedding_and_tied_head_are_written_dense(tmp_path, tokenizer):
    checkpoint = _checkpoint(tokenizer, "w4a16", tie=True, quantized_embedding=True)
    path = write_checkpoint(checkpoint, tmp_path / "out", "gptq_v2", dense_dtype=torch.float32)
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    ids = IDS
    ours = LLM(str(path), dtype="float32", kv_cache_memory=KV).engine.score(ids)
    torch.testing.assert_close(ours, _in_memory_logits(checkpoint, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("fmt", "scheme", "message"),
    [
        ("gptq", "w8a8", "GPTQ holds W4A16 or W8A16 weights, not w8a8"),
        ("awq", "w8a8", "AWQ holds W4A16 weights, not w8a8"),
        ("awq", "w4a16_sym_act_order", "AWQ cannot hold act-order"),
        ("awq", "w8a16", "AWQ holds W4A16 weights, not w8a16"),
        ("compressed-tensors", "w4a16_sym_act_order", "compressed-tensors cannot hold act-order"),
        ("safetensors", "w8a8", "W8A8 weight cannot be written dense"),
        ("exl2", "w4a16", "format must be one of"),
    ],
)
def test_weights_a_format_cannot_hold_are_refused_before_writing(tmp_path, tokenizer, fmt, scheme, message):
    with pytest.raises(ValueError, match=message):
        write_checkpoint(_checkpoint(tokenizer, scheme), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_float_minimums_are_refused(tmp_path, tokenizer):
    checkpoint = _checkpoint(tokenizer, "w4a16")
    name = "model.layers.1.mlp.up_proj.weight"
    w = checkpoint.weights[name]
    checkpoint.weights[name] = QuantizedWeight(
        w.config,
        w.out_features,
        w.in_features,
        {**w.tensors, "mins": w.tensors["mins"] + 0.1 * w.tensors["scales"]},
    )  # GGUF Q4_1's minimums are floats, not integer zero points
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: mins are not integer multiples"):
        write_checkpoint(checkpoint, tmp_path / "out", "gptq")


@pytest.mark.parametrize("wrapped", [False, True], ids=["tensor", "dense_weight"])
def test_dense_projection_goes_to_ignore_in_compressed_tensors_only(tmp_path, tokenizer, wrapped):
    checkpoint = _checkpoint(tokenizer, "w4a16")
    name = "model.layers.0.self_attn.v_proj.weight"
    dense = _fp16_exact(torch.randn(32, 64) * 0.3)
    checkpoint.weights[name] = dense_weight(dense) if wrapped else dense
    with pytest.raises(ValueError, match="quantizes every decoder projection"):
        write_checkpoint(checkpoint, tmp_path / "gptq", "gptq_v2")
    path = write_checkpoint(checkpoint, tmp_path / "ct", "compressed-tensors")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "model.layers.0.self_attn.v_proj"]
    loaded = load_checkpoint(path).weights[name]
    assert isinstance(loaded, torch.Tensor) and torch.equal(loaded.float(), dense)


# ---------------------------------------------------------------------- loader errors on directories


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tokenizer):
    return write_checkpoint(_checkpoint(tokenizer, "w4a16"), tmp_path_factory.mktemp("gptq") / "m", "gptq_v2")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_quant_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unknown_quant_method(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    _edit_quant_config(path, quant_method="exl2")
    with pytest.raises(
        ValueError, match=r"config\.json: quantized checkpoints with quant_method 'exl2' are not "
    ):
        load_checkpoint(path)


def test_unsupported_bits(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    _edit_quant_config(path, bits=3)
    with pytest.raises(
        ValueError, match=r"config\.json: GPTQ bits 3 is not supported \(supported: \(4, 8\)\)"
    ):
        load_checkpoint(path)


def test_mismatched_qweight_shape(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    name = "model.layers.1.mlp.gate_proj.qweight"
    _edit_tensors(path, lambda t: t.update({name: t[name][:, :64].contiguous()}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(8, 64\), expected \(8, 128\)"):
        LLM(str(path), dtype="float32", kv_cache_memory=KV)


def test_config_that_disagrees_with_the_tensors(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.qweight' has shape \(8, 128\), expected"
    ):
        load_checkpoint(path).weights["model.layers.0.mlp.gate_proj.weight"]


def test_missing_scales(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("model.layers.0.mlp.down_proj.scales"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.mlp\.down_proj\.scales'"):
        load_checkpoint(path)


def test_dense_tensor_shape_is_checked_too(gptq_dir, tmp_path):
    path = _copy(gptq_dir, tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:100].contiguous()}))
    with pytest.raises(
        ValueError, match=r"tensor 'lm_head\.weight' has shape \(100, 64\), config\.json implies"
    ):
        load_checkpoint(path).weights["lm_head.weight"]


def test_rtn_on_load_is_refused_for_a_quantized_directory(gptq_dir):
    with pytest.raises(
        ValueError, match=r"quantization='w4a16' applies to dense checkpoints.*already quantized \(gptq\)"
    ):
        load_checkpoint(gptq_dir, quantization="w4a16")


def test_compressed_tensors_missing_scale(tmp_path, tokenizer):
    path = write_checkpoint(_checkpoint(tokenizer, "w8a8"), tmp_path / "m", "compressed-tensors")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight_scale"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight_scale'"
    ):
        load_checkpoint(path)


def test_a_lone_quantize_config_json_is_read_as_gptq(gptq_dir, tmp_path):
    """Old AutoGPTQ directories carry only quantize_config.json."""
    path = _copy(gptq_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    weight = load_checkpoint(path).weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(weight, QuantizedWeight) and weight.config == W4A16Config(32)
    (path / "quantize_config.json").write_text(json.dumps({"bits": 2, "group_size": 32}))
    with pytest.raises(ValueError, match=r"quantize_config\.json: GPTQ bits 2 is not supported"):
        load_checkpoint(path)


def test_rewriting_a_directory_in_another_format(tmp_path, tokenizer):
    checkpoint = _checkpoint(tokenizer, "w4a16")
    path = write_checkpoint(checkpoint, tmp_path / "out", "gptq")
    write_checkpoint(checkpoint, path, "awq")
    assert not (path / "quantize_config.json").exists()  # it would make the directory read as GPTQ
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    _assert_same_weights(path, checkpoint)
    save_file({"x": torch.zeros(1)}, str(path / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match=r"holds other weight files \['model-00002-of-00002\.safetensors'\]"):
        write_checkpoint(checkpoint, path, "gptq")
