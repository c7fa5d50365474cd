"""Continuous batching on the real model: whatever the batch, chunking, pool size or cache state,
every request gets the tokens it gets alone. Exact mode (fp32), where the only differences
between a batched and a single run would be bugs, not rounding."""

from __future__ import annotations

import pytest

from lowbit import LLM, SamplingParams

from .conftest import KV_MEMORY

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LENGTHS = (3, 9, 17, 31, 64, 100, 170, 260)  # prompt tokens: under, at and across block edges


@pytest.fixture(scope="module")
def prompts(llm_exact, wiki_ids) -> list[list[int]]:
    return [wiki_ids[i * 5 : i * 5 + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def alone(llm_exact, prompts) -> list[list[int]]:
    return [llm_exact.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


def _together(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _idle_and_empty(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0


def test_batched_equals_alone(llm_exact, prompts, alone):
    assert _together(llm_exact, prompts) == alone
    assert _idle_and_empty(llm_exact)


def test_batched_equals_alone_with_int8_kv(llm_exact_int8, prompts):
    alone_int8 = [llm_exact_int8.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert _together(llm_exact_int8, prompts) == alone_int8


def test_small_chunks_and_a_tiny_pool_change_nothing(prompts, alone):
    # 24 blocks of 16 tokens hold the longest request (276 tokens) but not all eight at once.
    llm = LLM(dtype="float32", max_num_batched_tokens=32, max_num_seqs=8, num_kv_blocks=24)
    assert _together(llm, prompts) == alone
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.steps > sum(LENGTHS) // 32  # prompts really went through in chunks
    assert _idle_and_empty(llm)


def test_prefix_cache_skips_the_shared_prefix_and_changes_nothing(wiki_ids):
    system, questions = wiki_ids[:200], ([11, 22, 33, 44], [55, 66, 77])
    cached = LLM(dtype="float32", kv_cache_memory=KV_MEMORY)
    uncached = LLM(dtype="float32", kv_cache_memory=KV_MEMORY, enable_prefix_caching=False)
    for question in questions:
        prompt = system + question
        before = cached.engine.stats().prompt_tokens_computed
        out = cached.generate([prompt], GREEDY)[0]
        computed = cached.engine.stats().prompt_tokens_computed - before
        assert out.outputs[0].token_ids == uncached.generate([prompt], GREEDY)[0].outputs[0].token_ids
        assert computed == len(prompt) - out.num_cached_tokens
    # The second prompt shares 200 tokens = 12 full blocks of 16 with the first.
    assert out.num_cached_tokens == 12 * 16
    assert cached.engine.stats().prefix_cache_hit_rate > 0.4
    assert uncached.engine.stats().prefix_cache_hit_rate == 0


def test_n_completions_share_the_prompt_blocks(llm_exact, wiki_ids):
    prompt = wiki_ids[:100]
    before = llm_exact.engine.stats().prompt_tokens_computed
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    out = llm_exact.generate([prompt], params)[0]
    computed = llm_exact.engine.stats().prompt_tokens_computed - before
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # Completion 0 computes the prompt; 1 and 2 only what is past its last full block (100 % 16 = 4).
    assert computed == len(prompt) + 2 * (len(prompt) % 16)


def test_seeded_sampling_ignores_batch_company(llm_exact, prompts):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    alone = llm_exact.generate([prompts[3]], seeded)[0].outputs[0].token_ids
    crowd = llm_exact.generate(
        [*prompts[:3], prompts[3], *prompts[4:6]], [noisy] * 3 + [seeded] + [noisy] * 2
    )
    assert crowd[3].outputs[0].token_ids == alone
