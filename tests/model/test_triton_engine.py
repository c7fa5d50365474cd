"""The engine on the Triton path end to end: every linear, norm, rotary, KV store and attention
call goes through the Triton kernels.

Without a GPU they run in Triton's interpreter on CPU tensors (LOWBIT_TRITON_ON_CPU=1 makes a CPU
engine take the path a CUDA engine takes). References: transformers on the same weights (dense,
and RTN-dequantized for W4A16), and the CPU engine's greedy text (int8 KV, W8A8). On a CUDA
machine the `gpu` test runs the default model for real.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import LLM, SamplingParams
from lowbit.kernels.triton_support import HAS_TRITON
from tests.tiny_llama import with_rtn_weights

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TEXT = "The quick brown fox jumps over the lazy dog. " * 4
PROMPTS = [TEXT + "Then", TEXT + "After that the fox", "Hello"]
LATER = [TEXT + "Finally"]  # after PROMPTS: its prefill attends to TEXT's blocks from the prefix cache


def build(path, triton: bool, monkeypatch, **kwargs) -> LLM:
    if triton:
        monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    else:
        monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    llm = LLM(str(path), device="cpu", kv_cache_memory=8 << 20, **kwargs)
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    return llm


def kernel_names(llm: LLM) -> set[str]:
    return {m.packed.kernel.name for m in llm.engine.model.modules() if hasattr(m, "packed")}


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("scheme", [None, "w4a16"])
def test_fp32_logits_match_transformers(tiny, tokenizer, monkeypatch, scheme):
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    llm = build(path, True, monkeypatch, dtype="float32", quantization=scheme)
    if scheme:
        assert "triton-w4a16" in kernel_names(llm)
        model = with_rtn_weights(model, scheme)
    assert llm.engine.model.layers[0].self_attn.backend.name == "triton"
    torch.testing.assert_close(llm.engine.score(ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_fp16_logits_match_transformers_loosely(tiny, tokenizer, monkeypatch):
    path, model = tiny
    ids = tokenizer.encode(TEXT)
    ref = hf_logits(with_rtn_weights(model, "w4a16"), ids)
    ours = build(path, True, monkeypatch, dtype="float16", quantization="w4a16").engine.score(ids)
    # fp16 activations and KV: ~3 significant digits through two layers.
    assert (ours - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize(("scheme", "kv"), [("w4a16", "int8"), ("w8a8", "auto")])
def test_greedy_batch_matches_the_cpu_engine(tiny, monkeypatch, scheme, kv):
    """Three prompts at once (mixed prefill and decode steps, a shared prefix from the prefix
    cache, int8 KV or W8A8): the same greedy tokens as the CPU kernels."""
    path, _ = tiny
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kwargs = dict(dtype="float32", quantization=scheme, kv_cache_dtype=kv)
    triton_llm = build(path, True, monkeypatch, **kwargs)
    assert f"triton-{scheme}" in kernel_names(triton_llm)
    layer = triton_llm.engine.model.layers[0]
    # W8A8: the norms hand int8 rows + scales straight to the GEMMs (one pass for norm + quantize).
    fused = layer.input_layernorm.quantize_output and layer.post_attention_layernorm.quantize_output
    assert fused == (scheme == "w8a8")
    ours = greedy(triton_llm, params)
    assert triton_llm.engine.stats().prefix_cache_hit_rate > 0
    assert ours == greedy(build(path, False, monkeypatch, **kwargs), params)


def greedy(llm: LLM, params: SamplingParams) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, params) + llm.generate(LATER, params)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_default_model_greedy_matches_cpu():
    # The whole fp32 greedy answer ("The capital of Japan is Tokyo.", end of turn included) has no
    # near-tie: HF's smallest top-2 margin on it is 0.97, about four times what CPU bf16 moves margins
    # by (docs/accuracy.md). France's first token is a near-tie (0.08): which answer a half-precision
    # GPU engine gives there is rounding luck, not parity.
    prompt = [{"role": "user", "content": "What is the capital of Japan?"}]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    gpu = LLM(device="cuda", kv_cache_memory=64 << 20)
    assert "triton-w4a16" in kernel_names(gpu)
    cpu = LLM(device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    assert gpu.chat(prompt, params)[0].outputs[0].text == cpu.chat(prompt, params)[0].outputs[0].text
