"""One generation stream: its tokens, its place in the KV cache and its sampling state."""

from __future__ import annotations

import enum
import itertools

import torch

from lowbit.runtime.detokenizer import Detokenizer
from lowbit.runtime.outputs import TokenLogprob
from lowbit.runtime.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens are prompt + output. `num_computed_tokens` of them have K/V in the cache, stored in
    the blocks of `block_table` in order."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: Detokenizer,
        max_tokens: int,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.max_tokens = max_tokens
        self.detokenizer = detokenizer
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # names of the full, computed blocks (prefix cache)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache or a fork
        self.leader: Sequence | None = None  # for n > 1: completion 0, whose prompt blocks we share
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.generator = self._make_generator()
        self.emitted_tokens = 0

    def _make_generator(self) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        generator = torch.Generator()
        # n > 1 with one seed must still give n different, reproducible completions.
        generator.manual_seed(self.params.seed + self.index)
        return generator

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def take_new_tokens(self) -> list[int]:
        new = self.output_token_ids[self.emitted_tokens :]
        self.emitted_tokens = len(self.output_token_ids)
        return new
