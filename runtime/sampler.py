"""Batched sampling over the last-position logits of the step's sampling sequences.

Order per row: logit_bias and penalties (these apply to greedy rows too), then greedy argmax, or
temperature -> top-k -> top-p -> min-p -> a draw. Filters run only on the rows that ask for them,
and only rows that need top-k/top-p pay for a sort. Draws use the exponential race
(argmax p / E, E ~ Exp(1)), one noise vector per row from that row's own generator when it is
seeded, so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from lowbit.runtime.backends.base import choose
from lowbit.runtime.backends.sampler import SAMPLER_BACKENDS
from lowbit.runtime.outputs import TokenLogprob
from lowbit.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_logit_bias(logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias.keys()), device=logits.device)
            bias = torch.tensor(list(row.params.logit_bias.values()), device=logits.device)
            logits[i].index_add_(0, ids, bias)


def apply_penalties(logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1:
            seen = torch.tensor(list(row.prompt_token_ids) + list(row.output_token_ids), dtype=torch.long)
            seen = seen.unique().to(logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            counts = torch.bincount(torch.tensor(list(row.output_token_ids)), minlength=vocab)[:vocab]
            counts = counts.to(logits.device, logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (already divided by temperature); top_k [R] (0 = off); top_p [R]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    remove = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Keep a token if the mass strictly before it is below top_p, so the top token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        # Row-wise argmax (greedy tokens and the exponential race), chosen once per engine.
        self.backend = choose("sampler", SAMPLER_BACKENDS)
        self.argmax = self.backend.argmax

    def __call__(self, logits: torch.Tensor, rows: Seq[SampleRequest]) -> SamplerOutput:
        """logits fp32 [R, V] (consumed) -> one token per row."""
        logits = logits.float().cpu()
        raw_logprobs = (
            logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        )
        apply_logit_bias(logits, rows)
        apply_penalties(logits, rows)
        tokens = self.argmax(logits)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            tokens[sampled] = self._sample([rows[i] for i in sampled], logits[sampled])
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, token_ids, rows))

    def _sample(self, rows: Seq[SampleRequest], logits: torch.Tensor) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature for r in rows])
        # Shift the max to 0 first: a tiny temperature then sends the others to -inf, never to nan.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1 for r in rows):
            top_k = torch.tensor([r.params.top_k for r in rows])
            top_p = torch.tensor([r.params.top_p for r in rows])
            logits = _filter_top_k_top_p(logits, top_k, top_p)
        if any(r.params.min_p > 0 for r in rows):
            logits = _filter_min_p(logits, torch.tensor([r.params.min_p for r in rows]))
        return self._draw(logits.softmax(dim=-1), rows)

    def _draw(self, probs: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=row.generator or self.generator)
        return self.argmax(probs / noise)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, token_ids: list[int], rows: Seq[SampleRequest]
    ) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = []
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if raw is None or k is None:
                out.append(None)
                continue
            top = raw[i].topk(k) if k else None
            alternatives = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else {}
            out.append(TokenLogprob(token_ids[i], raw[i, token_ids[i]].item(), alternatives))
        return out
