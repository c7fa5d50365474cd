"""Which sequences run in the next step, and for how many tokens (continuous batching).

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). The order of service:
1. running sequences that decode (one token each), oldest first;
2. running sequences part-way through their prompt, one chunk each (chunked prefill);
3. waiting sequences, with what budget is left, those of the request with the fewest running
   sequences first (first come, first served among equals): a prompt is taken in chunks, so a long
   one never holds the decodes back by more than one chunk.
Requests share the running set fairly: when it is full and a waiting request has nothing running,
the request holding the most sequences, if more than its share (max_num_seqs / requests), gives up
its newest one (preempted as below). One request's n x prompts sequences can then delay a newcomer
by a step, not by its whole run (measured: 43 s to a newcomer's first token behind 64 sequences).
Prefixes already in the KV cache (prefix caching, or the prompt of completion 0 for the other
completions of an n > 1 request) count as computed and are skipped. When the pool runs out of
blocks the most recently admitted running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed (mostly from the prefix cache) later.
`SchedulerOutput` is the whole contract with the model runner.
"""

from __future__ import annotations

from collections import Counter, deque
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
    """Entries with several tokens (prefill chunks) come first, then single-token entries, which
    attention runs as one batched decode."""

    scheduled: tuple[ScheduledSequence, ...]
    num_prefills: int
    preempted: tuple[Sequence, ...] = ()  # for want of KV blocks
    yielded: tuple[Sequence, ...] = ()  # preempted to give a waiting request its share

    @classmethod
    def of(
        cls, entries: list[ScheduledSequence], preempted: list[Sequence], yielded: list[Sequence] = ()
    ) -> SchedulerOutput:
        multi = [e for e in entries if e.num_tokens > 1]
        single = [e for e in entries if e.num_tokens == 1]
        return cls(tuple(multi + single), len(multi), tuple(preempted), tuple(yielded))

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
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        entries: dict[Sequence, ScheduledSequence] = {}
        yielded = self._yield_to_newcomers()
        preempted: list[Sequence] = []
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            budget = self.config.max_num_batched_tokens - sum(e.num_tokens for e in entries.values())
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older sequence
                continue
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, seq.num_computed_tokens + count, preempted, entries):
                entries[seq] = ScheduledSequence.of(seq, count)
        scheduled = list(entries.values())
        if not preempted:  # a pool that just had to preempt has no room for newcomers
            scheduled += self._admit(
                self.config.max_num_batched_tokens - sum(e.num_tokens for e in scheduled)
            )
        return SchedulerOutput.of(scheduled, preempted, yielded)

    def _yield_to_newcomers(self) -> list[Sequence]:
        """Free running slots for waiting requests that have none, from requests over their share."""
        yielded: list[Sequence] = []
        for seq in list(self.waiting):
            if len(self.running) < self.config.max_num_seqs:
                break
            counts = Counter(s.request_id for s in self.running)
            if counts[seq.request_id] or self._waits_for_leader(seq):
                continue
            request, held = counts.most_common(1)[0]
            if held <= max(1, self.config.max_num_seqs // (len(counts) + 1)):
                break
            victim = next(s for s in reversed(self.running) if s.request_id == request)
            self._preempt(victim)
            yielded.append(victim)
        return yielded

    def _make_room(
        self,
        seq: Sequence,
        num_tokens: int,
        preempted: list[Sequence],
        entries: dict[Sequence, ScheduledSequence],
    ) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest sequences if needed (taking them out
        of this step if they were already in it); False if `seq` itself had to go."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            entries.pop(victim, None)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _admit(self, budget: int) -> list[ScheduledSequence]:
        entries: list[ScheduledSequence] = []
        running = Counter(s.request_id for s in self.running)
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            ready = [s for s in self.waiting if not self._waits_for_leader(s)]
            if not ready:
                break
            # The request with the fewest running sequences; among equals, the queue's order.
            seq = min(ready, key=lambda s: running[s.request_id])
            entry = self._try_admit(seq, budget)
            if entry is None:
                break  # nobody overtakes the chosen prompt while it waits for blocks
            running[seq.request_id] += 1
            entries.append(entry)
            budget -= entry.num_tokens
        return entries

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Completions 1..n-1 start once completion 0 has computed the shared prompt."""
        leader = seq.leader
        if leader is None or leader.finished:
            return False
        return leader.num_computed_tokens < len(leader.prompt_token_ids)

    def _try_admit(self, seq: Sequence, budget: int) -> ScheduledSequence | None:
        shared = self._shareable_leader_blocks(seq)
        prefix = [] if shared else self.blocks.cached_prefix(seq)
        cached = (shared or len(prefix)) * self.blocks.block_size
        count = min(seq.num_tokens - cached, budget)
        if shared:
            needed = self.blocks.blocks_for(cached + count) - shared
        else:
            needed = self.blocks.blocks_needed(seq, cached + count, prefix)
        if needed > self.blocks.num_free_blocks:
            return None
        if shared:
            self.blocks.fork(seq.leader, seq, shared)
        else:
            self.blocks.use_prefix(seq, prefix)
        seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
        self.blocks.grow(seq, cached + count)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledSequence.of(seq, count)

    def _shareable_leader_blocks(self, seq: Sequence) -> int:
        """Full prompt blocks of a running leader that `seq` can share (0 if none)."""
        leader = seq.leader
        if leader is None or leader.status is not SequenceStatus.RUNNING:
            return 0
        prompt = len(seq.prompt_token_ids)
        if seq.num_tokens != prompt:  # a preempted completion has its own tokens by now
            return 0
        return min(
            (prompt - 1) // self.blocks.block_size, leader.num_computed_tokens // self.blocks.block_size
        )

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and queue it first; what it computed is recomputed (or found in the
        prefix cache) when it is admitted again."""
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
