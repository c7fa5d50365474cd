"""Model families from HF checkpoints: tiny random models built by transformers' own config and
model classes (Qwen2, Qwen3, Llama with attention_bias / mlp_bias, Mistral with a sliding window
shorter than the prompt, Phi-3 with fused projections and LongRoPE, Gemma 2 with soft-caps and
alternating sliding/full layers, Gemma 3 with q/k norms, 3 sliding : 1 full layers and a local rope
base), saved as safetensors, against transformers on the same weights.

- fp32 prompt logits equal transformers' (max |d| < 1e-3; measured ~1e-6: summation order), on a
  prompt (18 tokens) longer than every sliding window (8);
- greedy tokens equal transformers' greedy generate for 32 tokens (decoding past the window);
- decode steps on the compiled CPU layer (biases, q/k norms and the window inside it) equal the
  eager layers; Gemma's layers decode on the eager ones (the compiled layer refuses them);
- a batch of prompts sharing a prefix (prefix cache, mixed prefill/decode steps) and int8 KV, over
  each attention variant (bias, q/k norm, window, soft-cap);
- round-to-nearest quantize-on-load against transformers on the same dequantized weights;
- `lowbit quantize` (GPTQ, AWQ, SmoothQuant W8A8) on each family, written and loaded back.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lowbit import LLM, SamplingParams
from lowbit.kernels.cpu import extension
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.registry import load_checkpoint
from lowbit.loaders.tokenizer import tokenizer_from_gguf
from lowbit.loaders.writer import write_checkpoint
from lowbit.quantize.calibration import calibration_samples, first_layer_inputs, run_layer
from lowbit.quantize.pipeline import QuantizeOptions, _fold, _group_weights, hf_model, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.layers.decode_layer import CompiledCPULayers
from lowbit.runtime.quant import method_for
from lowbit.runtime.quant.rtn import quantize_rtn

from .decode_paths import assert_compiled_decode_equals_eager

VOCAB = 49152  # the default model's tokenizer is reused
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
)  # fmt: skip
WINDOW = 8  # the sliding windows: shorter than TEXT's 18 tokens
# Gemma: head_dim 48 with query_pre_attn_scalar 32, so the score scale is not head_dim's.
GEMMA = dict(sliding_window=WINDOW, head_dim=48, query_pre_attn_scalar=32, tie_word_embeddings=True)
FAMILIES = {
    # Qwen2: q/k/v biases, tied embeddings (its small sizes); theta 1e6 as Qwen2.5.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen3: q/k RMSNorm per head, head_dim != hidden / heads (as Qwen3-0.6B: 1024 / 16 heads x 128).
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=64, tie_word_embeddings=True, rope_theta=1e6)),
    "llama-bias": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
    # Phi-3: qkv_proj and gate_up_proj fused in the checkpoint (each runs as one GEMM).
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(tie_word_embeddings=False)),
    # Gemma 2: attention soft-cap 50 and final soft-cap 30 (its defaults), layers slide / full.
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(GEMMA, num_hidden_layers=4)),
    # Gemma 3: three sliding layers then a full one (its pattern, 5:1, shortened), rope bases 1e6
    # (full) and 1e4 (sliding), no soft-caps.
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(GEMMA, num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    ),
}
TEXT = "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return tokenizer_from_gguf(read_gguf(default_gguf).metadata)


def _save(model_cls, config, path, hf_tokenizer, seed: int) -> torch.nn.Module:
    """A random transformers model saved with the tokenizer; returns the model."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them to matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return model


@cache
def _build(family: str, root: str, hf_tokenizer) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    return _save(model_cls, config_cls(**{**SHAPE, **extra}), f"{root}/{family}", hf_tokenizer, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = str(tmp_path_factory.mktemp("families"))
    return lambda family: (f"{root}/{family}", _build(family, root, tokenizer.hf))


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load(path: str, **kwargs) -> LLM:
    return LLM(path, device="cpu", kv_cache_memory=16 << 20, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_greedy_tokens_match_transformers(models, tokenizer, family):
    path, model = models(family)
    ids = tokenizer.encode(TEXT)
    llm = load(path, dtype="float32")
    assert llm.engine.info.architecture == ("llama" if family == "llama-bias" else family)
    assert len(ids) > WINDOW
    assert (llm.engine.score(ids) - hf_logits(model, ids)).abs().max().item() < 1e-3
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert list(llm.generate([ids], params)[0].outputs[0].token_ids) == expected[0, len(ids) :].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama-bias", "phi3", "mistral"])
def test_compiled_decode_layers_equal_eager_ones(models, tokenizer, family, dtype):
    """Biases, q/k norms and the sliding window run inside the compiled CPU layer with the eager
    layers' roundings (int8 weights on load: the compiled layer takes packed projections)."""
    if extension.load() is None:
        pytest.skip("no C++ compiler: no compiled decode path")
    llm = load(models(family)[0], dtype=dtype, quantization="w8a16")
    assert_compiled_decode_equals_eager(llm, tokenizer.encode(TEXT), 12, dtype)


def test_gemma_decodes_on_the_eager_layers(models):
    """Gemma's sandwich norms and GELU are not in the compiled layer: it says so and is not chosen."""
    llm = load(models("gemma2")[0], dtype="float32", quantization="w8a16")
    model = llm.engine.model
    assert model.decode_path.name == "eager-layers"
    why = CompiledCPULayers.can_implement(model.layers, torch.device("cpu"), torch.float32)
    assert "post-attention" in why


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2"])
def test_batch_with_shared_prefix_equals_one_at_a_time(models, tokenizer, family, kv):
    """Three prompts at once (one reuses another's cached prefix) give each prompt's own answer."""
    llm = load(models(family)[0], dtype="float32", kv_cache_dtype=kv)
    prompts = [TEXT + " Berlin", TEXT + " Rome is", "Hello there"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [list(llm.generate([p], params)[0].outputs[0].token_ids) for p in prompts]
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    assert together == alone


def test_int8_kv_stays_near_transformers(models, tokenizer):
    """int8 KV on Qwen3 (q/k norms feed the cached keys): logits within the int8 rounding of K/V."""
    path, model = models("qwen3")
    ids = tokenizer.encode(TEXT)
    got = load(path, dtype="float32", kv_cache_dtype="int8").engine.score(ids)
    expected = hf_logits(model, ids)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_quantize_on_load_matches_transformers_on_the_same_weights(models, tokenizer, family):
    """w4a16 round-to-nearest on load (biases and norms stay dense) against transformers with every
    projection replaced by the same quantize-dequantize."""
    path, model = models(family)
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                q = quantize_rtn(p.data, "w4a16")
                p.copy_(method_for(q.config).dequantize(q.tensors))
    ids = tokenizer.encode(TEXT)
    got = load(path, dtype="float32", quantization="w4a16").engine.score(ids)
    assert (got - hf_logits(clone, ids)).abs().max().item() < 1e-3


def test_sliding_window_serves_the_whole_trained_context(models):
    """The window is masked, not a cap on the context: max_model_len is the trained length."""
    path, _ = models("mistral")
    assert load(path, dtype="float32").engine.max_model_len == SHAPE["max_position_embeddings"]


# ---------------------------------------------------------------------- lowbit quantize per family

# (options, format written, bound on the RMS logit error / float logits' std: Llama-style families,
# Gemma). Measured: GPTQ 0.042 / 0.221 / 0.006 / 0.131 / 0.277 / 0.358 (qwen2 / qwen3 / llama-bias /
# phi3 / gemma2 / gemma3), AWQ 0.100 / 0.177 / 0.021 / 0.143 / 0.311 / 0.339, SmoothQuant 0.010 /
# 0.021 / 0.002 / 0.016 / 0.033 / 0.045. The Gemma models have four layers (the others two) and
# norm each branch's output before it joins the residual, so weight noise is not damped by the
# residual stream: round-to-nearest on load (no calibration) is as far off (0.29 / 0.39 measured).
QUANTIZERS = {
    "gptq": (
        QuantizeOptions("gptq", group_size=32, num_samples=8, seq_len=64, batch_size=4),
        "gptq",
        (0.25, 0.45),
    ),
    "awq": (
        QuantizeOptions("awq", group_size=32, num_samples=8, seq_len=64, batch_size=4),
        "awq",
        (0.25, 0.45),
    ),
    "smoothquant": (
        QuantizeOptions("smoothquant", bits=8, activations=8, num_samples=8, seq_len=64, batch_size=4),
        "compressed-tensors",
        (0.04, 0.07),
    ),
}


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama-bias", "phi3", "gemma2", "gemma3"])
def test_quantized_checkpoints_load_and_stay_near_the_float_model(
    models, tokenizer, tmp_path, family, method
):
    """quantize_model (calibrated on the family's own transformers model) -> write_checkpoint -> LLM:
    the RMS logit error against transformers' float model stays within tests/model/
    test_quantize_pipeline.py's bounds (a share of the float logits' standard deviation), and is
    not zero (the weights really were quantized). Biases and q/k norms are written dense; Phi-3's
    fused qkv_proj / gate_up_proj are quantized as the single linears its checkpoints hold."""
    opts, fmt, bounds = QUANTIZERS[method]
    bound = bounds[family.startswith("gemma")]
    path, model = models(family)
    checkpoint = quantize_model(path, opts, calibration_text=standard_text("c4"), progress=False)
    out = write_checkpoint(checkpoint, tmp_path / method, fmt)
    ids = tokenizer.encode(TEXT)
    expected = hf_logits(model, ids)
    rms = (load(str(out), dtype="float32").engine.score(ids) - expected).pow(2).mean().sqrt()
    assert 0 < rms.item() <= bound * expected.std().item()


@pytest.mark.parametrize("family", ["llama-bias", "phi3", "gemma2"])
def test_folding_keeps_the_float_model(models, tokenizer, family):
    """AWQ/SmoothQuant fold scales into up_proj's rows: with Llama's mlp_bias the bias is scaled
    too, in Phi-3's fused gate_up_proj only its up half; into Gemma's (1 + w) norms, the MLP's
    being pre_feedforward_layernorm; the float model computes the same logits afterwards."""
    path, _ = models(family)
    hf = hf_model(load_checkpoint(path))
    ids = tokenizer.encode(TEXT)
    before = hf_logits(hf, ids)
    gen = torch.Generator().manual_seed(0)
    for layer in hf.model.layers:
        scales = {
            k: torch.exp(torch.randn(w[0].shape[1], generator=gen)) for k, w in _group_weights(layer).items()
        }
        _fold(layer, scales)
    torch.testing.assert_close(hf_logits(hf, ids), before, atol=1e-4, rtol=0)


def test_calibration_runs_each_layer_type_with_its_own_mask_and_rope(models, tokenizer):
    """Gemma 3's sliding and full layers get different masks and rotary tables from transformers:
    calibrating layer by layer with each layer's own keyword arguments reproduces the model's
    forward (one layer's arguments for all would not: the guard at the end)."""
    model = models("gemma3")[1]
    samples = calibration_samples(tokenizer, standard_text("c4"), 4, 32)
    inputs, kwargs = first_layer_inputs(model, samples, batch_size=2)
    with torch.no_grad():
        expected = model.model(samples).last_hidden_state
        hidden = inputs
        for layer, layer_kwargs in zip(model.model.layers, kwargs, strict=True):
            hidden = run_layer(layer, hidden, layer_kwargs)
        torch.testing.assert_close(model.model.norm(torch.cat(hidden)), expected, atol=1e-5, rtol=0)
        hidden = inputs
        for layer in model.model.layers:
            hidden = run_layer(layer, hidden, kwargs[0])
        assert (model.model.norm(torch.cat(hidden)) - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------- Phi-3

PHI3 = dict(SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.mark.parametrize("regime", ["short", "long"])
def test_phi3_longrope_matches_transformers(tmp_path, tokenizer, regime):
    """LongRoPE (Phi-3-128k, Phi-3.5): per-frequency short/long factors and the attention factor on
    cos/sin. transformers takes the long factors once a sequence passes the original context; we
    take them for every position when max_model_len passes it (a KV cache cannot be re-rotated), so
    the two agree on a prompt past the original context (long) and within it (short)."""
    gen = torch.Generator().manual_seed(2)
    half = SHAPE["hidden_size"] // SHAPE["num_attention_heads"] // 2
    rope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "short_factor": (1 + torch.rand(half, generator=gen)).tolist(),
        "long_factor": (1 + 8 * torch.rand(half, generator=gen)).tolist(),
    }  # fmt: skip
    config = Phi3Config(**PHI3, rope_parameters=rope, original_max_position_embeddings=16)
    model = _save(Phi3ForCausalLM, config, tmp_path, tokenizer.hf, seed=1)
    ids = tokenizer.encode(TEXT)
    ids = ids[:12] if regime == "short" else ids
    assert (len(ids) > 16) == (regime == "long")
    llm = load(str(tmp_path), dtype="float32", max_model_len=16 if regime == "short" else None)
    assert (llm.engine.score(ids) - hf_logits(model, ids)).abs().max().item() < 1e-3
