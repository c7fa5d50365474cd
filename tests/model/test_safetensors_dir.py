"""HF safetensors directories: tiny random Llamas made by transformers itself, loaded by our
engine, compared with transformers running the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import LLM
from lowbit.kernels.cpu import extension
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.tokenizer import tokenizer_from_gguf
from tests.tiny_llama import with_rtn_weights

VOCAB = 49152  # the default model's tokenizer is reused, so the vocabulary must match it
TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # ~120 tokens: past the rope scaling knee


def _config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaConfig(**{**base, **overrides})


def _save(tmp_path_factory, tokenizer, config: LlamaConfig, name: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Random init leaves norms at 1 and logits near 0; perturb norms so they matter too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return tokenizer_from_gguf(read_gguf(default_gguf).metadata)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return _save(tmp_path_factory, tokenizer, _config(), "tiny")


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _our_logits(path, ids, **kwargs) -> torch.Tensor:
    return LLM(str(path), kv_cache_memory=16 << 20, **kwargs).engine.score(ids)


def test_dense_fp32_matches_transformers(tiny, tokenizer):
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    torch.testing.assert_close(
        _our_logits(path, ids, dtype="float32"), _hf_logits(model, ids), atol=1e-4, rtol=0
    )


def test_dense_bf16_matches_transformers_loosely(tiny, tokenizer):
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    ours, ref = _our_logits(path, ids), _hf_logits(model, ids)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_quantized_on_load_matches_transformers_on_the_same_weights(tiny, tokenizer, scheme):
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    ref = _hf_logits(with_rtn_weights(model, scheme), ids)
    exact = _our_logits(path, ids, dtype="float32", quantization=scheme)
    torch.testing.assert_close(exact, ref, atol=1e-4, rtol=0)
    fast = LLM(str(path), quantization=scheme, kv_cache_memory=16 << 20)
    kernels = {m.packed.kernel.name for m in fast.engine.model.modules() if hasattr(m, "packed")}
    bits = scheme[1]
    assert kernels >= {f"cpu-group-int{bits}" if extension.load() is not None else f"cpu-int{bits}pack"}
    assert (fast.engine.score(ids) - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantization_changes_the_weights(tiny, tokenizer):
    """Guards the test above: RTN int4 really moves the logits away from the dense model's."""
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    dense, quant = _hf_logits(model, ids), _our_logits(path, ids, dtype="float32", quantization="w4a16")
    assert (dense - quant).abs().max() > 1e-3


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "llama3"],
)  # fmt: skip
def test_rope_scaling_matches_transformers(tmp_path_factory, tokenizer, rope):
    path, model = _save(
        tmp_path_factory, tokenizer, _config(rope_parameters=rope, tie_word_embeddings=True), "rope"
    )
    ids = tokenizer.encode(TEXT)
    torch.testing.assert_close(
        _our_logits(path, ids, dtype="float32"), _hf_logits(model, ids), atol=1e-4, rtol=0
    )


def _edit_config(path, **changes):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"quantization_config": {"quant_method": "exl2"}}, "quantized checkpoints"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling 'yarn' is not supported"),
    ],
)
def test_unsupported_configs_raise(tiny, tmp_path, changes, message):
    path, _ = tiny
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), kv_cache_memory=16 << 20)


def test_missing_files_and_bad_quantization_raise(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(ValueError, match="no such file or directory"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"needs config\.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*\.safetensors files"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(path), quantization="w3a16")
