"""Our engine against HF transformers on the same GGUF weights.

Tolerances (logits of SmolLM2-135M reach |30|; measurements in docs/accuracy.md):
- exact mode (fp32, dequantized weights): 2e-3 absolute, i.e. fp32 summation-order noise.
- fast mode (bf16 activations, bf16 int4 scales/zeros, fp16 lm_head): 2.5 absolute max,
  0.15 mean, and >= 97% top-1 agreement over a 300-token teacher-forced wiki passage; its greedy
  text follows HF's except where HF's own top two logits are within FAST_NEAR_TIE.
- int8 KV cache vs fp32 KV cache, both fp32 compute: see INT8_PROMPTS below.
- int8 KV cache in fast mode, against the same engine with a bf16 cache and against HF: perplexity,
  logits, and teacher-forced greedy tokens; see the last section.
"""

from __future__ import annotations

import math

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


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """[T, vocab] -> [T]: how far each row's largest logit is above its second largest."""
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def margin_moved(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[T]: how much `ours` moves the gap between `ref`'s top two tokens, position by position.
    Greedy choices can only differ from `ref`'s where this is at least `ref`'s own margin (or a
    third token overtakes both)."""
    top2 = ref.topk(2, dim=-1).indices
    d = ours - ref
    return (d.gather(-1, top2[..., :1]) - d.gather(-1, top2[..., 1:])).abs().squeeze(-1)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_mode_last_logits_match_hf(llm_exact, hf_model, prompt):
    ids = llm_exact.tokenizer.encode(prompt)
    ours = llm_exact.engine.score(ids)[-1]
    ref = hf_logits(hf_model, ids)[-1]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_mode_greedy_matches_hf_for_32_tokens(llm_exact, hf_model, prompt):
    # HF's smallest top-2 margins on these paths: 0.051, 0.012 and 0.005, all above the 2e-3 bound
    # of exact mode's logits (measured error: 1e-4 over 512 tokens).
    ids = llm_exact.tokenizer.encode(prompt)
    ours = llm_exact.generate([ids], GREEDY)[0].outputs[0].token_ids
    assert ours == hf_greedy(hf_model, ids, 32)


def test_fast_mode_logits_and_top1_over_passage(llm_fast, hf_model, wiki_ids):
    ours = llm_fast.engine.score(wiki_ids)
    ref = hf_logits(hf_model, wiki_ids)
    diff = (ours - ref).abs()
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"fast mode over {len(wiki_ids)} tokens: max |dlogit| {diff.max():.3f}, "
          f"mean {diff.mean():.4f}, top-1 agreement {agreement:.2%}, "
          f"HF's top-2 margin moved by up to {margin_moved(ours, ref).max():.3f}")  # fmt: skip
    # The maximum is rounding noise at a few sensitive positions (18-25 of this passage), where a
    # ~1e-6 change in a GEMM flips bf16 roundings of activations downstream: four GEMM variants
    # that agree to fp32 rounding read 0.73-1.73 (docs/accuracy.md). A bug moves logits by several.
    assert diff.max() < 2.5
    assert diff.mean() < 0.15
    assert agreement >= 0.97
    assert margin_moved(ours, ref).max() < FAST_NEAR_TIE


# Fast mode moves the fp32 model's top-two margin by at most 0.25 (measured over the first 512 tokens
# of wiki.utf8: 0.253 with the compiled CPU ops, 0.240 on the eager path; docs/accuracy.md), so its
# greedy text may part from HF's only where HF's own top two are closer than that. The France
# answer's first token is such a near-tie in the fp32 model itself ("The" 25.325 against "L" 25.243),
# and which of the two fast mode picks depends on what is already in the prefix cache.
FAST_NEAR_TIE = 0.5  # logits: twice the largest margin movement measured


@pytest.mark.parametrize("cache", ["fresh", "prefix cached"])
def test_fast_mode_chat_follows_hf_except_at_near_ties(llm_fast, hf_model, cache):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=32)
    ids = llm_fast.tokenizer.apply_chat_template(messages)
    llm_fast.reset_prefix_cache()  # "fresh": a new server's first chat
    if cache == "prefix cached":
        llm_fast.chat(messages, params)  # the prompt's full blocks are now cached
    out = llm_fast.chat(messages, params)[0]
    block = llm_fast.engine.block_manager.block_size
    assert out.num_cached_tokens == (len(ids) // block * block if cache == "prefix cached" else 0)
    ours, ref = list(out.outputs[0].token_ids), hf_greedy(hf_model, ids, 32)
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ours))  # noqa: B905
    print(f"fast-mode chat ({cache}): {same}/{len(ours)} tokens as HF's greedy; text {out.outputs[0].text!r}")
    if same == len(ours):  # HF's path to our end-of-turn token (HF itself does not stop there)
        assert out.outputs[0].text == "The capital of France is Paris."
        assert out.outputs[0].finish_reason == "stop"
        return
    logits = hf_logits(hf_model, ids + ours[:same])[-1]
    assert (logits[ref[same]] - logits[ours[same]]).item() < FAST_NEAR_TIE


def test_exact_mode_chat_matches_hf_answer(llm_exact, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm_exact.tokenizer.apply_chat_template(messages)
    out = llm_exact.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    ref = hf_greedy(hf_model, ids, 32)
    # HF does not stop at <|im_end|> here (eos_token_id=None): compare up to our stop. HF's
    # smallest top-2 margin on the way is the first token's 0.082, 40x the exact-mode bound.
    assert out.token_ids == ref[: len(out.token_ids)]
    assert out.text == "The capital of France is Paris."


INT8_PROMPTS = [*PROMPTS, "In 1492, Columbus", "import numpy as np\n", "The three primary colors are"]
# int8 K/V (per token and head) moves SmolLM2's logits by up to ~1.4, ~0.1 on average (its keys
# have outlier dimensions ~7x the mean magnitude, so the int8 step is coarse for the rest), while
# wiki perplexity moves by 0.1%. Greedy paths may only part where the fp32 model is nearly tied:
# where its top-two margin is within INT8_MARGIN (below), the most int8 KV is allowed to move it.


@pytest.mark.parametrize("prompt", INT8_PROMPTS)
def test_int8_kv_cache_follows_fp_cache(llm_exact, llm_exact_int8, prompt):
    ids = llm_exact.tokenizer.encode(prompt)
    fp = llm_exact.generate([ids], GREEDY)[0].outputs[0].token_ids
    q8 = llm_exact_int8.generate([ids], GREEDY)[0].outputs[0].token_ids
    same = next((i for i, (a, b) in enumerate(zip(fp, q8, strict=True)) if a != b), len(fp))
    fp_logits = llm_exact.engine.score(ids + fp)
    q8_logits = llm_exact_int8.engine.score(ids + fp)
    diff = (fp_logits - q8_logits).abs()
    margin = top2_margin(fp_logits[len(ids) - 1 + same]).item() if same < len(fp) else float("inf")
    moved = margin_moved(q8_logits, fp_logits).max().item()
    print(f"int8 KV vs fp32 KV {prompt!r}: {same}/32 greedy tokens equal, fp32 top-2 margin where they "
          f"part {margin:.4f}; |dlogit| max {diff.max():.3f} mean {diff.mean():.4f}; "
          f"top-2 margin moved by up to {moved:.3f}")  # fmt: skip
    assert same >= 16 or margin < INT8_MARGIN
    assert diff.max() < 2.0
    assert diff.mean() < 0.2
    assert moved < INT8_MARGIN


# ------------------------------------------------------------ int8 KV cache in fast mode (the default)
# What the int8 cache promises, each against a reference it does not compute: perplexity within 0.5%
# of the same engine with its bf16 cache; logits within a stated bound of that engine's; and the fp32
# model's own greedy token (transformers) at every position where the fp32 model is not nearly tied.
# (The France chat is not one of them: its first token is a near-tie, see FAST_NEAR_TIE.)

PPL_WINDOW, PPL_WINDOWS = 512, 3
# transformers (fp32, the same GGUF) over the same windows; fast mode's bf16 cache reads 11.241
# (11.259 on the eager path): a broken engine cannot pass the 0.5% comparison by being broken twice.
HF_PERPLEXITY = 11.248
# int8 K/V against the bf16 cache over the first window (both bf16 compute), measured 1.57 max and
# 0.106 mean (1.89 / 0.111 on the eager path); the maximum is a tail statistic, like fast mode's.
INT8_LOGIT_MAX, INT8_LOGIT_MEAN = 3.0, 0.2
# The most int8 KV moves the fp32 model's top-two margin: measured 0.63 in fast mode (bf16 compute,
# 0.60 on the eager path) and 0.50 in exact mode. The sum of fast mode's movement and int8's own.
INT8_MARGIN = 1.0


@pytest.fixture(scope="module")
def wiki_windows(llm_fast) -> list[list[int]]:
    """`lowbit eval`'s first windows: consecutive, non-overlapping 512-token windows from the start
    of exllamav2's wiki.utf8 (tokens 0-1535)."""
    from lowbit.quantize.text_data import standard_text

    ids = llm_fast.tokenizer.encode(standard_text("wiki")[: 12 * PPL_WINDOW * PPL_WINDOWS])
    return [ids[i * PPL_WINDOW : (i + 1) * PPL_WINDOW] for i in range(PPL_WINDOWS)]


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1]."""
    logprobs = logits[:-1].log_softmax(dim=-1)
    return -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


@pytest.fixture(scope="module")
def window_scores(llm_fast, llm_fast_int8, wiki_windows) -> dict[str, tuple[list[float], torch.Tensor]]:
    """Per KV dtype: each window's summed NLL, and the first window's logits."""
    scores = {}
    for kv, llm in (("bf16", llm_fast), ("int8", llm_fast_int8)):
        nll, first = [], None
        for ids in wiki_windows:
            logits = llm.engine.score(ids)
            nll.append(_nll(logits, ids))
            first = logits if first is None else first
        scores[kv] = (nll, first)
    return scores


def test_int8_kv_cache_perplexity_within_half_percent_of_bf16_cache(wiki_windows, window_scores):
    tokens = sum(len(ids) - 1 for ids in wiki_windows)
    assert tokens == PPL_WINDOWS * (PPL_WINDOW - 1)
    ppl = {kv: math.exp(sum(nll) / tokens) for kv, (nll, _) in window_scores.items()}
    change = ppl["int8"] / ppl["bf16"] - 1
    print(f"wiki perplexity over {PPL_WINDOWS} x {PPL_WINDOW} tokens: bf16 cache {ppl['bf16']:.4f}, "
          f"int8 cache {ppl['int8']:.4f} ({change:+.3%}); transformers fp32 {HF_PERPLEXITY}")  # fmt: skip
    assert ppl["bf16"] == pytest.approx(HF_PERPLEXITY, rel=0.02)
    assert abs(change) < 0.005


def test_int8_kv_cache_logits_within_bound_of_bf16_cache(window_scores):
    bf16, int8 = window_scores["bf16"][1], window_scores["int8"][1]
    diff = (int8 - bf16).abs()
    agreement = (int8.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    print(f"int8 vs bf16 cache over {len(bf16)} tokens: max |dlogit| {diff.max():.3f}, "
          f"mean {diff.mean():.4f}, top-1 agreement {agreement:.2%}")  # fmt: skip
    assert diff.max() < INT8_LOGIT_MAX
    assert diff.mean() < INT8_LOGIT_MEAN
    assert agreement >= 0.97


def test_int8_kv_cache_greedy_tokens_match_fp32_except_near_ties(llm_fast_int8, hf_model, wiki_ids):
    """Teacher forced: at every position, int8 KV's top token against the fp32 model's, on the
    passage's first 150 tokens and then those 150 again. The repeat is read back through the cache
    (the model copies from context, with large margins), so few positions are near-ties."""
    ids = wiki_ids[:150] * 2
    ours, ref = llm_fast_int8.engine.score(ids)[:-1], hf_logits(hf_model, ids)[:-1]
    margin, moved = top2_margin(ref), margin_moved(ours, ref)
    decided = margin > INT8_MARGIN
    wrong = [p for p in decided.nonzero().flatten().tolist() if ours[p].argmax() != ref[p].argmax()]
    print(f"int8 KV (fast mode) vs fp32 over {len(ref)} positions: {int(decided.sum())} with fp32 "
          f"margin > {INT8_MARGIN} ({int(decided[150:].sum())}/{len(ref) - 150} in the repeat), "
          f"{len(wrong)} wrong; top-2 margin moved by up to {moved.max():.3f}")  # fmt: skip
    assert moved.max() < INT8_MARGIN
    assert wrong == []
    assert decided.float().mean() >= 0.7  # measured 0.77: skipped positions are a minority
    assert decided[150:].float().mean() >= 0.9  # measured 0.95 where the text repeats
