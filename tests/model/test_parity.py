"""Our engine against HF transformers on the same GGUF weights.

Tolerances (logits of SmolLM2-135M reach |30|):
- exact mode (fp32, dequantized weights): 2e-3 absolute, i.e. fp32 summation-order noise.
- fast mode (bf16 activations, bf16 int4 scales/zeros, fp16 lm_head): 1.5 absolute max,
  0.15 mean, and >= 97% top-1 agreement over a 300-token teacher-forced wiki passage
  (measured: 0.731, 0.0521, 100%; docs/accuracy.md).
- int8 KV cache vs fp32 KV cache, both fp32 compute: see INT8_PROMPTS below.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import SamplingParams

from .conftest import hf_greedy, hf_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_mode_last_logits_match_hf(llm_exact, hf_model, prompt):
    ids = llm_exact.tokenizer.encode(prompt)
    ours = llm_exact.engine.score(ids)[-1]
    ref = hf_logits(hf_model, ids)[-1]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_mode_greedy_matches_hf_for_32_tokens(llm_exact, hf_model, prompt):
    ids = llm_exact.tokenizer.encode(prompt)
    ours = llm_exact.generate([ids], GREEDY)[0].outputs[0].token_ids
    assert ours == hf_greedy(hf_model, ids, 32)


def test_fast_mode_logits_and_top1_over_passage(llm_fast, hf_model, wiki_ids):
    ours = llm_fast.engine.score(wiki_ids)
    ref = hf_logits(hf_model, wiki_ids)
    diff = (ours - ref).abs()
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"fast mode over {len(wiki_ids)} tokens: max |dlogit| {diff.max():.3f}, "
          f"mean {diff.mean():.4f}, top-1 agreement {agreement:.2%}")  # fmt: skip
    # The maximum is rounding noise at a few sensitive positions (18-25 of this passage), where a
    # ~1e-6 change in a GEMM flips bf16 roundings of activations downstream: four GEMM variants
    # that agree to fp32 rounding read 0.73-1.73 (docs/accuracy.md). A bug moves logits by several.
    assert diff.max() < 2.5
    assert diff.mean() < 0.15
    assert agreement >= 0.97


# The France answer's first token is a near-tie in the fp32 model itself ("The" 25.325 against "L"
# 25.243), and fast mode's logits sit a few fp16 steps apart there (0.06-0.125 measured): which of
# the two it picks depends on what is already in the prefix cache. So fast-mode greedy text is
# held to HF's greedy text except where HF's own top two are this close.
FAST_NEAR_TIE = 0.25  # logits: ~5x fast mode's mean |dlogit| over the passage above


def test_fast_mode_chat_follows_hf_except_at_near_ties(llm_fast, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm_fast.tokenizer.apply_chat_template(messages)
    out = llm_fast.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    ours, ref = list(out.token_ids), hf_greedy(hf_model, ids, 32)
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ours))  # noqa: B905
    print(f"fast-mode chat: {same}/{len(ours)} tokens as HF's greedy; text {out.text!r}")
    if same == len(ours):
        assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"
        return
    logits = hf_logits(hf_model, ids + ours[:same])[-1]
    assert (logits[ref[same]] - logits[ours[same]]).item() < FAST_NEAR_TIE


def test_fast_mode_chat_answers_paris_on_a_fresh_engine(llm_fast):
    """Nothing cached yet (a new server's first chat): the answer the design names."""
    llm_fast.reset_prefix_cache()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm_fast.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert out.text == "The capital of France is Paris."


def test_exact_mode_chat_matches_hf_answer(llm_exact, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm_exact.tokenizer.apply_chat_template(messages)
    out = llm_exact.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    ref = hf_greedy(hf_model, ids, 32)
    # HF does not stop at <|im_end|> here (eos_token_id=None): compare up to our stop.
    assert out.token_ids == ref[: len(out.token_ids)]
    assert out.text == "The capital of France is Paris."


INT8_PROMPTS = [*PROMPTS, "In 1492, Columbus", "import numpy as np\n", "The three primary colors are"]
# int8 K/V (per token and head) moves SmolLM2's logits by up to ~1.3, ~0.1 on average (its keys
# have outlier dimensions ~7x the mean magnitude, so the int8 step is coarse for the rest), while
# wiki perplexity moves by 0.1%. Greedy paths may only part where the fp32 model is nearly tied.
NEAR_TIE = 0.05


@pytest.mark.parametrize("prompt", INT8_PROMPTS)
def test_int8_kv_cache_follows_fp_cache(llm_exact, llm_exact_int8, prompt):
    ids = llm_exact.tokenizer.encode(prompt)
    fp = llm_exact.generate([ids], GREEDY)[0].outputs[0].token_ids
    q8 = llm_exact_int8.generate([ids], GREEDY)[0].outputs[0].token_ids
    same = next((i for i, (a, b) in enumerate(zip(fp, q8, strict=True)) if a != b), len(fp))
    fp_logits = llm_exact.engine.score(ids + fp)
    diff = (fp_logits - llm_exact_int8.engine.score(ids + fp)).abs()
    top2 = fp_logits[len(ids) - 1 + same].topk(2).values if same < len(fp) else None
    margin = (top2[0] - top2[1]).item() if top2 is not None else float("inf")
    print(f"int8 KV vs fp32 KV {prompt!r}: {same}/32 greedy tokens equal, fp32 top-2 margin where they "
          f"part {margin:.4f}; |dlogit| max {diff.max():.3f} mean {diff.mean():.4f}")  # fmt: skip
    assert same >= 16 or margin < NEAR_TIE
    assert diff.max() < 2.0
    assert diff.mean() < 0.2


def test_int8_kv_cache_in_fast_mode_answers_paris(llm_fast_int8):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm_fast_int8.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text
