"""GGUF files of every block type on the Triton path (kernels/triton_ggml.py for every linear, the
Triton attention, norm and rotary kernels), end to end.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (LOWBIT_TRITON_ON_CPU=1 makes
a CPU engine take the path a CUDA engine takes). References: transformers in fp32 on gguf-py's
dequantization of each file (`hf_dequant`, tests/data/gguf/README.md) for prompt logits, and the
CPU engine (kernels/cpu/ggml_blocks.cpp) for decode steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import LLM, SamplingParams
from lowbit.kernels.triton_support import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
FIXTURES = Path(__file__).parents[1] / "data" / "gguf" / "llama3"
# Four super-block types (Q3_K_M holds Q3_K, Q4_K, Q5_K and Q6_K), one of the 32-blocks, and Q8_0,
# which loads as W8A16 groups of 32 and runs as Q8_0 blocks here too (triton-ggml-int8): each file
# takes 5-12 s in the interpreter, and tests/kernels/test_triton_ggml.py covers every type.
PRESETS = ["Q3_K_M", "IQ4_NL", "Q8_0"]
EXACT_MAX = 5e-5  # as tests/model/test_gguf_presets.py: only summation order differs (measured ~5e-6)


def ids() -> list[int]:
    return json.loads((FIXTURES / "reference.json").read_text())["ids"]


def build(preset: str, triton: bool, monkeypatch) -> LLM:
    if triton:
        monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    else:
        monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    llm = LLM(str(FIXTURES / f"llama3-{preset}.gguf"), device="cpu", dtype="float32", kv_cache_memory=8 << 20)
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU", raising=False)
    return llm


def kernels(llm: LLM) -> set[str]:
    return {m.packed.kernel.name for m in llm.engine.model.modules() if hasattr(m, "packed")}


def test_presets_cover_the_types_they_claim():
    from lowbit.loaders.gguf_file import read_gguf

    found = {
        info.qtype.name for p in PRESETS for info in read_gguf(FIXTURES / f"llama3-{p}.gguf").tensors.values()
    }
    assert {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0"} <= found


@pytest.mark.parametrize("preset", PRESETS)
def test_prompt_logits_equal_dequantized_transformers(preset, monkeypatch):
    llm = build(preset, True, monkeypatch)
    assert kernels(llm) == {"triton-ggml-int8" if preset == "Q8_0" else "triton-ggml"}
    assert llm.engine.model.layers[0].self_attn.backend.name == "triton"
    expected = torch.from_numpy(np.load(FIXTURES / f"llama3-{preset}.hf_dequant.logits.npy"))
    assert (llm.engine.score(ids()) - expected).abs().max().item() <= EXACT_MAX


def test_decode_steps_follow_the_cpu_engine(monkeypatch):
    """Single-row steps (the GEMV kernel, embedding rows dequantized from the tied-or-not table):
    the same greedy tokens as the CPU kernels, logprobs to fp32 summation order."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=1)
    prompt = ids()[:6]
    ours = build("Q3_K_M", True, monkeypatch).generate([prompt], params)[0].outputs[0]
    cpu = build("Q3_K_M", False, monkeypatch).generate([prompt], params)[0].outputs[0]
    assert list(ours.token_ids) == list(cpu.token_ids)
    for a, b in zip(ours.logprobs, cpu.logprobs, strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-4


def test_gemma2_on_the_triton_path(monkeypatch):
    """Gemma 2's sliding window (8, shorter than the 16 scored tokens, on layer 0; layer 1 full)
    and attention soft-cap through the Triton prefill attention kernel: prompt logits equal
    transformers' on the dequantized file. (Decode steps past a window and every window / cap case
    of both kernels: tests/kernels/test_triton_*_attention.py; 20 s in the interpreter bought no
    more than those.)"""
    data = FIXTURES.parent / "gemma2"
    tokens = json.loads((data / "reference.json").read_text())["ids"]
    monkeypatch.setenv("LOWBIT_TRITON_ON_CPU", "1")
    llm = LLM(str(data / "gemma2-Q8_0.gguf"), device="cpu", dtype="float32", kv_cache_memory=8 << 20)
    monkeypatch.delenv("LOWBIT_TRITON_ON_CPU")
    assert llm.engine.model.layers[0].self_attn.backend.name == "triton"
    expected = torch.from_numpy(np.load(data / "gemma2-Q8_0.hf_dequant.logits.npy"))
    assert (llm.engine.score(tokens) - expected).abs().max().item() <= EXACT_MAX
