"""Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 GGUF files written by llama.cpp's own converter and
quantizer (tests/data/gguf/, copied from the shared fixture set; its README says how they were
made), against the same two
independent references as the Llama 3 presets (tests/model/test_gguf_presets.py, whose bounds
apply unchanged: docs/accuracy.md):

- transformers in fp32 on gguf-py's dequantization of each file (`hf_dequant`): the tensor names
  (q/k/v biases, q/k norms, Phi-3's fused attn_qkv and gate-then-up ffn_up, Gemma's four norms
  per layer stored as 1 + w), the unpermuted NeoX-RoPE rows and the family options are llama.cpp's
  own, not our writer's. Gemma's sliding window (8) is shorter than the 16 scored tokens: Gemma 2's
  layer 0 and both of Gemma 3's layers slide, Gemma 2 soft-caps its attention and output logits,
  and what the converter does not write (the sliding/full pattern, the score scale, Gemma 3's
  local rope base where absent) follows llama.cpp's rules;
- llama.cpp's logits on the same file, and its greedy tokens wherever its top-2 margin is clear.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import LLM

from .test_gguf_presets import EXACT_MAX, KV_MEMORY, LLAMACPP_MAX, LLAMACPP_MEAN

DATA = Path(__file__).parents[1] / "data" / "gguf"
ARCHS = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3")
CASES = [
    (arch, p.stem.removeprefix(f"{arch}-")) for arch in ARCHS for p in sorted((DATA / arch).glob("*.gguf"))
]


@cache
def ids(arch: str) -> list[int]:
    return json.loads((DATA / arch / "reference.json").read_text())["ids"]


@cache
def logits(arch: str, preset: str, dtype: str) -> torch.Tensor:
    llm = LLM(str(DATA / arch / f"{arch}-{preset}.gguf"), dtype=dtype, kv_cache_memory=KV_MEMORY)
    assert llm.engine.info.architecture == arch
    return llm.engine.score(ids(arch))


def expected(arch: str, preset: str, ref: str) -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / arch / f"{arch}-{preset}.{ref}.logits.npy"))


def test_every_family_is_shipped():
    assert {arch for arch, _ in CASES} == set(ARCHS) and len(CASES) >= 2 * len(ARCHS)


@pytest.mark.parametrize(("arch", "preset"), CASES)
def test_fp32_logits_equal_dequantized_transformers(arch, preset):
    diff = (logits(arch, preset, "float32") - expected(arch, preset, "hf_dequant")).abs()
    assert diff.max().item() <= EXACT_MAX


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("arch", "preset"), CASES)
def test_logits_and_greedy_tokens_follow_llama_cpp(arch, preset, dtype):
    reference = expected(arch, preset, "llamacpp_decode")
    got = logits(arch, preset, dtype)
    diff = (got - reference).abs()
    assert diff.max().item() <= LLAMACPP_MAX[dtype]
    assert diff.mean().item() <= LLAMACPP_MEAN[dtype]
    clear = _clear(reference, dtype)
    assert clear.sum() >= 1, "guard: no position with a clear winner to test greedy tokens"
    assert torch.equal(got.argmax(-1)[clear], reference.argmax(-1)[clear])


def _clear(reference: torch.Tensor, dtype: str) -> torch.Tensor:
    """Positions where llama.cpp's top-2 margin exceeds twice the bound: a token cannot flip there."""
    top2 = reference.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * LLAMACPP_MAX[dtype]


@pytest.mark.parametrize("arch", ARCHS)
def test_enough_clear_positions_per_family(arch):
    """Guard: these random models' logits are flatter than the Llama 3 one's (1-6 clear positions
    per file at the bf16 bound), so the greedy checks above must add up to enough per family."""
    total = sum(
        int(_clear(expected(a, p, "llamacpp_decode"), "bfloat16").sum()) for a, p in CASES if a == arch
    )
    assert total >= 8


def test_gemma2_sentencepiece_tokenizer_and_chat_template():
    """gemma2's SentencePiece vocabulary (BOS added, as its GGUF asks) tokenizes the fixture's text
    as llama.cpp did for the reference ids; its chat template renders Gemma's turns, and
    <end_of_turn> ends generation."""
    tokenizer = LLM(str(DATA / "gemma2" / "gemma2-Q8_0.gguf"), kv_cache_memory=KV_MEMORY).tokenizer
    text = "The quick brown fox jumps over the lazy dog. The capital of France is Paris."
    assert tokenizer.encode(text)[:16] == ids("gemma2")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt, skip_special_tokens=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tokenizer.hf.convert_tokens_to_ids("<end_of_turn>") in tokenizer.eos_token_ids
