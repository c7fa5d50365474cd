"""Sampler on synthetic logits: greedy, seeds, temperature, top-k/top-p/min-p, logit bias, penalties,
logprobs. Distribution checks draw one token from each of many identical rows in one call."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.runtime.sampler import Sampler, SampleRequest, apply_penalties
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.sequence import Sequence

V = 64


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
) -> SampleRequest:
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return SampleRequest(params or SamplingParams(), prompt or [], output or [], generator)


def random_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def logits_from_probs(probs: list[float], vocab: int = V) -> torch.Tensor:
    """Logits [vocab] whose softmax is `probs` followed by the remaining mass spread evenly."""
    rest = 1 - sum(probs)
    full = probs + [rest / (vocab - len(probs))] * (vocab - len(probs))
    return torch.tensor(full, dtype=torch.float64).log().float()


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int = 1500, seed: int = 0) -> torch.Tensor:
    """Token counts [V] from n independent draws (n identical rows in one call)."""
    logits = logits_row.expand(n, -1).clone()
    tokens = Sampler(seed)(logits, [row(params)] * n).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[-1])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the cells with expected count >= 5 (others pooled); and its dof."""
    n = counts.sum().item()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return ((obs - exp) ** 2 / exp).sum().item(), int(keep.sum().item()) - 1


def assert_matches_distribution(counts: torch.Tensor, probs: torch.Tensor) -> None:
    assert counts[probs == 0].sum() == 0
    stat, dof = chi_square(counts, probs)
    if dof == 0:  # a single possible token
        assert stat == 0
        return
    # mean dof, sd sqrt(2 dof): 7 sd is far beyond chance, far below any real mismatch here.
    assert stat < dof + 7 * math.sqrt(2 * dof), (stat, dof)


# ---------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax() -> None:
    logits = random_logits(8, vocab=500)
    out = Sampler(0)(logits.clone(), [row(SamplingParams(temperature=0))] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


@pytest.mark.parametrize("temperature", [0.01, 0.7, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature: float) -> None:
    logits = random_logits(64, vocab=300, seed=1, scale=1.0)
    out = Sampler(3)(logits.clone(), [row(SamplingParams(temperature=temperature, top_k=1))] * 64)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-3, 1e-6, 1e-20, 1e-38, 1e-45])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    logits = random_logits(64, vocab=200, seed=2)
    out = Sampler(0)(logits.clone(), [row(SamplingParams(temperature=temperature))] * 64)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_high_temperature_spreads_over_the_vocabulary() -> None:
    # One token with 90% of the mass. At T=50 the probabilities become p^(1/50), renormalized:
    # 0.9^0.02 = 0.998 against 99 x 0.00101^0.02 = 99 x 0.871, so the top token gets ~1.1%.
    logits = logits_from_probs([0.9], vocab=100)
    low = draw_many(logits, SamplingParams(temperature=1.0), n=3000)
    high = draw_many(logits, SamplingParams(temperature=50.0), n=3000)
    assert 0.87 < low[0] / 3000 < 0.93
    assert high[0] / 3000 < 0.03
    assert (high > 0).all()


# ------------------------------------------------------------------------------------------ seeds


def test_sampler_seed_makes_unseeded_rows_reproducible() -> None:
    logits = random_logits(32, seed=4, scale=1.0)
    a = Sampler(7)(logits.clone(), [row()] * 32).token_ids
    b = Sampler(7)(logits.clone(), [row()] * 32).token_ids
    c = Sampler(8)(logits.clone(), [row()] * 32).token_ids
    assert a == b
    assert a != c


def test_seeded_row_repeats_across_calls_and_sampler_instances() -> None:
    logits = random_logits(1, seed=5, scale=1.0)

    def run(sampler_seed: int) -> list[int]:
        sampler = Sampler(sampler_seed)
        r = row(seed=1234)
        return [sampler(logits.clone(), [r]).token_ids[0] for _ in range(30)]

    first = run(0)
    assert first == run(99)
    assert len(set(first)) > 5  # the generator advances from call to call


def test_seeded_row_is_independent_of_batch_composition_and_position() -> None:
    target_logits = random_logits(1, seed=6, scale=1.0)[0]
    params = SamplingParams(temperature=0.9, seed=42)

    def tokens(make_batch) -> list[int]:
        sampler = Sampler(0)
        r = row(params, seed=42)
        out = []
        for step in range(20):
            rows, logits, position = make_batch(r, step)
            out.append(sampler(logits, rows).token_ids[position])
        return out

    def alone(r, step):
        return [r], target_logits[None].clone(), 0

    def crowded(r, step):
        others = [
            row(SamplingParams(temperature=0)),
            row(SamplingParams(temperature=1.5, top_k=5)),
            row(SamplingParams(top_p=0.5, min_p=0.2)),
            row(SamplingParams(temperature=0.3), seed=step),
            row(SamplingParams(repetition_penalty=1.3, logit_bias={3: 2.0}), prompt=[1, 2, 3]),
        ][: 1 + step % 5]
        position = step % (len(others) + 1)
        rows = [*others[:position], r, *others[position:]]
        logits = random_logits(len(rows), seed=100 + step, scale=1.0)
        logits[position] = target_logits
        return rows, logits, position

    reference = tokens(alone)
    assert tokens(crowded) == reference
    assert len(set(reference)) > 3


def test_different_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, 1000)

    def run(seed: int) -> list[int]:
        sampler, r = Sampler(0), row(seed=seed)
        return [sampler(logits.clone(), [r]).token_ids[0] for _ in range(20)]

    runs = [run(seed) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            agree = sum(a == b for a, b in zip(runs[i], runs[j], strict=True))
            assert agree <= 2, (i, j, agree)


def test_n_completions_with_one_seed_differ_but_reproduce() -> None:
    params = SamplingParams(seed=11)

    def generator(index: int) -> torch.Generator:
        return Sequence("r", index, [1, 2], params, None, 4).generator  # type: ignore[arg-type]

    logits = torch.zeros(1, 1000)

    def run(index: int) -> list[int]:
        sampler, gen = Sampler(0), generator(index)
        return [
            sampler(logits.clone(), [SampleRequest(params, [1, 2], [], gen)]).token_ids[0] for _ in range(10)
        ]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert Sequence("r", 0, [1], SamplingParams(), None, 4).generator is None  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = random_logits(1, vocab=50, seed=7, scale=1.5)[0]
    counts = draw_many(logits, SamplingParams(temperature=temperature), n=5000, seed=1)
    assert_matches_distribution(counts, torch.softmax(logits.double() / temperature, dim=-1))


def test_distribution_check_detects_a_wrong_temperature() -> None:
    """The chi-square bound above is tight enough to tell T=1 from T=1.25."""
    logits = random_logits(1, vocab=50, seed=7, scale=1.5)[0]
    counts = draw_many(logits, SamplingParams(temperature=1.0), n=5000, seed=1)
    stat, dof = chi_square(counts, torch.softmax(logits.double() / 1.25, dim=-1))
    assert stat > dof + 7 * math.sqrt(2 * dof)


# ------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_top_k_only_returns_the_k_most_likely(k: int) -> None:
    logits = random_logits(1, vocab=200, seed=8, scale=0.5)[0]
    counts = draw_many(logits, SamplingParams(top_k=k))
    top = set(logits.topk(k).indices.tolist())
    drawn = set(counts.nonzero().flatten().tolist())
    assert drawn == top  # never outside, and (flat logits) every one of them is reached
    probs = torch.zeros(200, dtype=torch.float64)
    idx = torch.tensor(sorted(top))
    probs[idx] = torch.softmax(logits[idx].double(), dim=-1)
    assert_matches_distribution(counts, probs)


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    # No top_p equals a cumulative mass: 0.5 did, and whether float32 softmax gives the top token
    # 0.49999997 or 0.50000003 (it differs between CPUs' exp kernels) decided the answer.
    [(0.3, [0]), (0.45, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.95, [0, 1, 2, 3])],
)
def test_top_p_returns_only_the_nucleus(top_p: float, nucleus: list[int]) -> None:
    # probabilities 0.5, 0.3, 0.1, 0.06 then 0.04 over 60 tokens: the nucleus is the smallest
    # most-likely set whose mass reaches top_p.
    logits = logits_from_probs([0.5, 0.3, 0.1, 0.06])
    counts = draw_many(logits, SamplingParams(top_p=top_p))
    assert set(counts.nonzero().flatten().tolist()) == set(nucleus)
    probs = torch.zeros(V, dtype=torch.float64)
    kept = torch.tensor([0.5, 0.3, 0.1, 0.06], dtype=torch.float64)[: len(nucleus)]
    probs[: len(nucleus)] = kept / kept.sum()
    assert_matches_distribution(counts, probs)


def test_top_p_one_keeps_the_whole_vocabulary() -> None:
    logits = torch.zeros(V)
    counts = draw_many(logits, SamplingParams(top_p=1.0, top_k=0))
    assert (counts > 0).all()


def test_top_k_and_top_p_combine() -> None:
    # top_k=3 renormalizes 0.5/0.3/0.1 to 0.556/0.333/0.111; top_p=0.85 then drops the third.
    logits = logits_from_probs([0.5, 0.3, 0.1, 0.06])
    counts = draw_many(logits, SamplingParams(top_k=3, top_p=0.85))
    assert set(counts.nonzero().flatten().tolist()) == {0, 1}


@pytest.mark.parametrize(
    # 0.19, not 0.2: 0.2 x 0.5 is exactly token 2's 0.1, a tie float rounding decides.
    ("min_p", "kept"),
    [(0.0, None), (0.1, [0, 1, 2, 3]), (0.19, [0, 1, 2]), (0.5, [0, 1])],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(
    min_p: float, kept: list[int] | None
) -> None:
    # top probability 0.4: thresholds 0.04, 0.08, 0.2; 0.04 is the 4th token's 0.05 > 0.04.
    logits = logits_from_probs([0.4, 0.2, 0.1, 0.05])
    counts = draw_many(logits, SamplingParams(min_p=min_p))
    drawn = set(counts.nonzero().flatten().tolist())
    if kept is None:
        assert len(drawn) > 40
    else:
        assert drawn == set(kept)
        probs = torch.zeros(V, dtype=torch.float64)
        p = torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=torch.float64)[: len(kept)]
        probs[: len(kept)] = p / p.sum()
        assert_matches_distribution(counts, probs)


def test_min_p_applies_to_the_temperature_scaled_distribution() -> None:
    # At T=0.5 the probabilities square (then renormalize): 0.4^2 vs 0.2^2 is a ratio of 0.25,
    # so min_p=0.3 keeps only the top token although 0.2 > 0.3 * 0.4 at T=1.
    logits = logits_from_probs([0.4, 0.2, 0.1, 0.05])
    counts = draw_many(logits, SamplingParams(min_p=0.3, temperature=0.5), n=3000)
    assert set(counts.nonzero().flatten().tolist()) == {0}


# ----------------------------------------------------------------------------------- logit bias


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_plus_100_forces_a_token(temperature: float) -> None:
    logits = random_logits(16, seed=9)
    targets = [int(logits[i].argmin()) for i in range(16)]
    rows = [row(SamplingParams(temperature=temperature, logit_bias={t: 100})) for t in targets]
    assert Sampler(0)(logits.clone(), rows).token_ids == targets


def test_logit_bias_minus_100_forbids_the_argmax() -> None:
    logits = random_logits(1, seed=10)[0]
    best = int(logits.argmax())
    second = int(logits.topk(2).indices[1])
    greedy = Sampler(0)(logits[None].clone(), [row(SamplingParams(temperature=0, logit_bias={best: -100}))])
    assert greedy.token_ids == [second]
    counts = draw_many(logits, SamplingParams(logit_bias={best: -100}), n=3000)
    assert counts[best] == 0
    assert counts.sum() == 3000


# ------------------------------------------------------------------------------------ penalties


def greedy_token(logits: list[float], params: SamplingParams, prompt=(), output=()) -> int:
    t = torch.tensor([logits + [-5.0] * (V - len(logits))])
    return Sampler(0)(t, [row(params, list(prompt), list(output))]).token_ids[0]


def test_repetition_penalty_divides_positive_logits_of_seen_tokens() -> None:
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    # Token 0 (3.0 -> 1.5) drops below token 1 (2.0, unseen, unchanged, still above 1.6 of token 2).
    assert greedy_token([3.0, 2.0, 1.6], SamplingParams(temperature=0)) == 0
    assert greedy_token([3.0, 2.0, 1.6], p, prompt=[0]) == 1
    assert greedy_token([3.0, 2.0, 1.6], p, output=[0]) == 1
    assert greedy_token([3.0, 2.0, 1.6], p, prompt=[0], output=[0, 0, 0]) == 1  # counted once
    # 3.0 / 2 = 1.5 stays above 1.4: a penalty applied twice (or to the square) would flip it.
    assert greedy_token([3.0, 1.4], p, prompt=[0], output=[0, 0]) == 0
    # Seen tokens elsewhere do not matter.
    assert greedy_token([3.0, 2.0], p, prompt=[5, 6], output=[7]) == 0


def test_repetition_penalty_multiplies_negative_logits_of_seen_tokens() -> None:
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    # -1.0 -> -2.0 falls below -1.5; dividing instead (-0.5) would keep token 0 on top.
    assert greedy_token([-1.0, -1.5], SamplingParams(temperature=0)) == 0
    assert greedy_token([-1.0, -1.5], p, prompt=[0]) == 1
    assert greedy_token([-1.0, -1.5], p, output=[0]) == 1


def test_repetition_penalty_below_one_favours_seen_tokens() -> None:
    p = SamplingParams(temperature=0, repetition_penalty=0.5)
    assert greedy_token([1.0, 1.5], p, prompt=[0]) == 0  # 1.0 / 0.5 = 2.0 > 1.5


def test_frequency_penalty_scales_with_the_count_in_the_output() -> None:
    # token 0 seen 3 times, token 1 once: 10 - 3 = 7 and 8 - 1 = 7 both fall below token 2's 7.5.
    logits = [10.0, 8.0, 7.5]
    out = [0, 1, 0, 0]
    assert greedy_token(logits, SamplingParams(temperature=0, frequency_penalty=1.0), output=out) == 2
    # With only one occurrence of token 0 the count does not push it below: 10 - 1 = 9.
    assert greedy_token(logits, SamplingParams(temperature=0, frequency_penalty=1.0), output=[0, 1]) == 0


def test_presence_penalty_ignores_the_count() -> None:
    # 10 - 2 = 8 for token 0 (seen 3 times), still above 7.5; a count-scaled penalty would give 4.
    logits = [10.0, 8.0, 7.5]
    assert greedy_token(logits, SamplingParams(temperature=0, presence_penalty=2.0), output=[0, 0, 0]) == 0
    # But it does apply once: 8.0 - 2 = 6.0 puts token 1 below token 2 when 0 is forbidden.
    p = SamplingParams(temperature=0, presence_penalty=2.0, logit_bias={0: -100})
    assert greedy_token(logits, p, output=[1]) == 2


def test_presence_and_frequency_penalties_ignore_the_prompt() -> None:
    p = SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert greedy_token([10.0, 9.0], p, prompt=[0, 0, 0]) == 0
    assert greedy_token([10.0, 9.0], p, output=[0]) == 1


def test_negative_presence_penalty_encourages_repetition() -> None:
    p = SamplingParams(temperature=0, presence_penalty=-2.0)
    assert greedy_token([5.0, 4.0], p, output=[1]) == 1


def test_apply_penalties_matches_the_formulas() -> None:
    logits = random_logits(3, vocab=20, seed=12)
    prompt, output = [1, 2, 2, 5], [5, 7, 7, 7, 9]
    rows = [
        row(SamplingParams(repetition_penalty=1.7), prompt, output),
        row(SamplingParams(presence_penalty=0.4, frequency_penalty=0.3), prompt, output),
        row(SamplingParams(), prompt, output),
    ]
    expected = logits.clone()
    for t in set(prompt + output):
        x = expected[0, t].item()
        expected[0, t] = x / 1.7 if x > 0 else x * 1.7
    for t in set(output):
        expected[1, t] -= 0.3 * output.count(t) + 0.4
    got = logits.clone()
    apply_penalties(got, rows)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got - expected).abs().max()


# ------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_those_of_the_raw_logits(k: int) -> None:
    logits = random_logits(4, vocab=300, seed=13)
    reference = torch.log_softmax(logits.double(), dim=-1)
    rows = [
        row(SamplingParams(temperature=0, logprobs=k)),
        row(SamplingParams(temperature=0.8, top_k=3, logprobs=k)),
        row(SamplingParams(temperature=0, logit_bias={int(logits[2].argmin()): 100}, logprobs=k)),
        row(SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, logprobs=k), [1, 2], [3, 3]),
    ]
    out = Sampler(0)(logits.clone(), rows)
    assert out.token_ids[2] == int(logits[2].argmin())  # the bias did act
    for i, lp in enumerate(out.logprobs):
        assert lp is not None
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(reference[i, token].item(), abs=1e-5)
        top = reference[i].topk(k)
        assert list(lp.top) == top.indices.tolist()
        assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-5)


def test_logprobs_none_rows_get_none_in_a_mixed_batch() -> None:
    logits = random_logits(3, seed=14)
    rows = [
        row(SamplingParams(logprobs=2)),
        row(SamplingParams()),
        row(SamplingParams(temperature=0, logprobs=0)),
    ]
    out = Sampler(0)(logits.clone(), rows)
    assert out.logprobs[1] is None
    assert out.logprobs[0] is not None and len(out.logprobs[0].top) == 2
    assert out.logprobs[2] is not None and out.logprobs[2].top == {}
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[2].logprob == pytest.approx(ref[2].max().item(), abs=1e-5)


# ------------------------------------------------------------------------------------ mixed rows


def test_mixed_greedy_and_sampled_rows_in_one_batch() -> None:
    logits = random_logits(6, vocab=400, seed=15)
    forced = int(logits[3].argmin())
    rows = [
        row(SamplingParams(temperature=0)),
        row(SamplingParams(temperature=1.0, top_k=4)),
        row(SamplingParams(temperature=1.3, top_k=1)),
        row(SamplingParams(temperature=1.0, logit_bias={forced: 100})),
        row(SamplingParams(temperature=0.5, top_p=0.9, min_p=0.05), seed=3),
        row(SamplingParams(temperature=0, repetition_penalty=1e3), prompt=[int(logits[5].argmax())]),
    ]
    out = Sampler(0)(logits.clone(), rows)
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == argmax[0]
    assert out.token_ids[1] in logits[1].topk(4).indices.tolist()
    assert out.token_ids[2] == argmax[2]
    assert out.token_ids[3] == forced
    assert 0 <= out.token_ids[4] < 400
    assert out.token_ids[5] == int(logits[5].topk(2).indices[1])
    # The seeded row gives the same token when sampled alone.
    alone = Sampler(1)(logits[4:5].clone(), [row(rows[4].params, seed=3)])
    assert alone.token_ids[0] == out.token_ids[4]


def test_sampler_accepts_low_precision_logits() -> None:
    logits = random_logits(4, seed=16)
    out = Sampler(0)(logits.to(torch.float16), [row(SamplingParams(temperature=0))] * 4)
    assert out.token_ids == logits.to(torch.float16).float().argmax(dim=-1).tolist()
