"""The real default model, loaded once per test session in each mode, and its HF reference; the
tiny random Llama of tests/tiny_llama.py (per module, for files that do not build their own)."""

from __future__ import annotations

import pytest
import torch

from lowbit import LLM
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.tokenizer import tokenizer_from_gguf
from tests.tiny_llama import save_tiny_llama

# Small pools: the tests never hold more than a few thousand tokens at once.
KV_MEMORY = 64 << 20


@pytest.fixture(scope="session")
def hf_model(default_gguf):
    """transformers' own GGUF loading: dequantizes every tensor to fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def llm_exact() -> LLM:
    """fp32 reference mode: dequantized weights, fp32 activations and KV cache."""
    return LLM(dtype="float32", kv_cache_memory=KV_MEMORY)


@pytest.fixture(scope="session")
def llm_exact_int8() -> LLM:
    return LLM(dtype="float32", kv_cache_dtype="int8", kv_cache_memory=KV_MEMORY)


@pytest.fixture(scope="session")
def llm_fast() -> LLM:
    """The default: bf16 activations through the packed int4/int8 CPU kernels, bf16 KV cache."""
    return LLM(kv_cache_memory=KV_MEMORY)


@pytest.fixture(scope="session")
def llm_fast_int8() -> LLM:
    return LLM(kv_cache_dtype="int8", kv_cache_memory=KV_MEMORY)


@pytest.fixture(scope="session")
def wiki_ids(llm_fast) -> list[int]:
    """A fixed teacher-forcing passage: the first 300 tokens of exllamav2's wiki.utf8."""
    from lowbit.quantize.text_data import standard_text

    return llm_fast.tokenizer.encode(standard_text("wiki")[:4000])[:300]


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(hf_model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    # An explicit all-ones attention mask: the GGUF's pad token is <|im_end|> (id 2), and without a
    # mask `generate` infers one that hides every <|im_end|> of a chat prompt from the model (the
    # France chat's first-token logits then read 28.14 / 27.34 instead of the model's 25.33 / 25.24).
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None,
        )  # fmt: skip
    return out[0, len(token_ids) :].tolist()


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return tokenizer_from_gguf(read_gguf(default_gguf).metadata)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """The tiny Llama saved as an HF directory, and the transformers model itself."""
    path = tmp_path_factory.mktemp("tiny")
    return path, save_tiny_llama(path, tokenizer.hf)
