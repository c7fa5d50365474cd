"""Which sequences run in the next step, and for how many tokens.

This version runs prefills (whole prompts, several at once when they fit the token budget) and
decodes in separate steps, preempting the newest running sequence by recomputation when the KV
pool is full. `SchedulerOutput` is the whole contract with the model runner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lowbit.runtime.block_manager import BlockManager
from lowbit.runtime.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class ScheduledSequence:
    """Compute tokens [start, start + num_tokens) of `seq`. A snapshot taken at scheduling time:
    the sequence itself moves on once the step's results are applied."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the step reaches the sequence's last token, so the next one gets sampled
    token_ids: tuple[int, ...]

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        tokens = tuple(seq.token_ids[start : start + num_tokens])
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens, tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    """Prefill-style entries (several tokens) come first, then single-token decodes."""

    scheduled: tuple[ScheduledSequence, ...]
    num_prefills: int
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        prefills = self._admit_waiting()
        if prefills:
            return SchedulerOutput(tuple(prefills), num_prefills=len(prefills))
        return self._schedule_decodes()

    def _admit_waiting(self) -> list[ScheduledSequence]:
        scheduled: list[ScheduledSequence] = []
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            needed = seq.num_tokens - seq.num_computed_tokens
            # One prompt longer than the budget still runs, alone, or it would never run at all.
            if scheduled and needed > budget:
                break
            if not self.blocks.can_grow(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence.of(seq, needed))
            budget -= needed
        return scheduled

    def _schedule_decodes(self) -> SchedulerOutput:
        preempted: list[Sequence] = []
        scheduled: list[ScheduledSequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an older one
                continue
            while not self.blocks.can_grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.grow(seq, seq.num_tokens)
                scheduled.append(ScheduledSequence.of(seq, 1))
        return SchedulerOutput(tuple(scheduled), num_prefills=0, preempted=tuple(preempted))

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and queue it first; its tokens so far are recomputed as a prompt."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
