"""Scheduler without a model: `Sim` plays the model runner and the engine's `_advance`.

After each `schedule()` it writes the scheduled tokens into a fake paged KV pool through each
sequence's block table (like the runner's slot mapping), advances `num_computed_tokens`, commits the
blocks to the prefix cache, and for each sequence that samples "runs the model": the next token is a
deterministic function of the token history *read back from the fake pool* (and the completion
index, like a per-completion seed). A wrong cached or shared block, a lost token or a wrong chunk
therefore changes the generated tokens, which are compared with a plain reference loop that never
touches the scheduler. Every step is also checked against the scheduling contract."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.runtime.block_manager import BlockManager
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lowbit.runtime.sequence import Sequence, SequenceStatus


def fake_model(index: int, history: list[int]) -> int:
    """The next token after `history` for completion `index`: depends on every token and position."""
    h = 17 + index
    for t in history:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return 50_000 + h % 10_000


def reference_output(index: int, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_model(index, tokens))
    return tokens[len(prompt) :]


class Sim:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
    ):
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.bs = block_size
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len=1 << 20)
        self.sched = Scheduler(self.config, self.blocks)
        self.seqs: list[Sequence] = []
        self.pool: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.outputs: list[SchedulerOutput] = []
        self.num_requests = 0
        self.admitted_before: set[Sequence] = set()

    # ------------------------------------------------------------------ requests

    def add(
        self, prompt: int | list[int], max_tokens: int, n: int = 1, request_id: str | None = None
    ) -> Sequence:
        """Queue a request of `n` completions (prompt: a length for distinct tokens, or token ids);
        returns completion 0, the leader of the others, like `Engine.prepare`."""
        r = self.num_requests
        self.num_requests += 1
        if isinstance(prompt, int):
            prompt = [(r * 1000 + i) % 50_000 for i in range(prompt)]
        seqs = [
            Sequence(request_id or f"req{r}", i, prompt, SamplingParams(), None, max_tokens)  # type: ignore[arg-type]
            for i in range(n)
        ]
        for seq in seqs[1:]:
            seq.leader = seqs[0]
        for seq in seqs:
            self.seqs.append(seq)
            self.sched.add(seq)
        return seqs[0]

    def followers(self, leader: Sequence) -> list[Sequence]:
        return [s for s in self.seqs if s.leader is leader]

    def abort(self, seq: Sequence) -> None:
        seq.finish("abort")
        self.sched.finish(seq)

    # ------------------------------------------------------------------ stepping

    def cache_contents(self, seq: Sequence, stop: int) -> list[int | None]:
        table = seq.block_table
        return [self.pool[table[p // self.bs]][p % self.bs] for p in range(stop)]

    def history(self, seq: Sequence, stop: int) -> list[int]:
        """What attention over the first `stop` positions would see: the fake cache's contents."""
        tokens = self.cache_contents(seq, stop)
        assert None not in tokens, "reading a slot nothing was written to"
        return tokens  # type: ignore[return-value]

    def step(self) -> SchedulerOutput:
        before = {s: (s.status, s.num_computed_tokens, s.num_tokens) for s in self.seqs}
        running_before = list(self.sched.running)
        waiting_before = list(self.sched.waiting)
        out = self.sched.schedule()
        self.outputs.append(out)
        self._check_output(out, before, running_before, waiting_before)
        # The runner: write every scheduled token through the block table, then read for logits.
        for item in out.scheduled:
            table = item.seq.block_table
            for p, token in zip(range(item.start, item.start + item.num_tokens), item.token_ids, strict=True):
                block = table[p // self.bs]
                # Shared or cached blocks are full and computed: nobody writes to them again.
                assert self.blocks.ref_counts[block] == 1, "write into a shared block"
                assert self.blocks.hashes[block] is None, "write into a named block"
                self.pool[block][p % self.bs] = token
        sampled = {
            item.seq: fake_model(item.seq.index, self.history(item.seq, item.start + item.num_tokens))
            for item in out.scheduled
            if item.samples
        }
        # The engine's _advance.
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.blocks.commit(item.seq)
        for seq, token in sampled.items():
            seq.append(token)
            if len(seq.output_token_ids) >= seq.max_tokens:
                seq.finish("length")
                self.sched.finish(seq)
        self.check_state()
        return out

    def run(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            out = self.step()
            assert not out.empty, "no progress with unfinished sequences"
            steps += 1
            assert steps < max_steps, "livelock"
        return steps

    # ------------------------------------------------------------------ checks

    def _check_output(
        self,
        out: SchedulerOutput,
        before: dict[Sequence, tuple[SequenceStatus, int, int]],
        running_before: list[Sequence],
        waiting_before: list[Sequence],
    ) -> None:
        items = out.scheduled
        budget = self.config.max_num_batched_tokens
        # Several-token entries first, then single-token ones.
        assert all(i.num_tokens > 1 for i in items[: out.num_prefills])
        assert all(i.num_tokens == 1 for i in items[out.num_prefills :])
        # Limits.
        assert out.num_tokens <= budget
        assert len(items) <= self.config.max_num_seqs
        assert len(self.sched.running) <= self.config.max_num_seqs
        assert len({i.seq for i in items}) == len(items)
        # Each entry continues exactly where the cache ends, over the right tokens, has room for
        # them, and samples iff it reaches the last token.
        for item in items:
            seq = item.seq
            assert item.num_tokens >= 1
            assert seq.status is SequenceStatus.RUNNING and seq in self.sched.running
            assert item.start == seq.num_computed_tokens
            assert item.token_ids == tuple(seq.token_ids[item.start : item.start + item.num_tokens])
            assert len(seq.block_table) == self.blocks.blocks_for(item.start + item.num_tokens)
            assert item.samples == (item.start + item.num_tokens == seq.num_tokens)
            # What the cache already holds for it (computed, cached or shared) is its tokens.
            assert self.cache_contents(seq, item.start) == seq.token_ids[: item.start]

        # Fair share: with the running set full, a waiting request that has nothing running takes
        # the newest sequence of the request holding the most, if that holds more than its share.
        yielded = list(out.yielded)
        holding = list(running_before)
        for seq in yielded:
            counts = Counter(s.request_id for s in holding)
            assert len(holding) == self.config.max_num_seqs
            assert counts[seq.request_id] == max(counts.values())
            assert counts[seq.request_id] > max(1, self.config.max_num_seqs // (len(counts) + 1))
            assert seq is [s for s in holding if s.request_id == seq.request_id][-1]
            assert any(w.request_id not in counts for w in waiting_before)
            holding.remove(seq)
        # Preemption for blocks: the newest running sequences, freed, back at the front of the
        # queue, and nothing admitted in the same step.
        victims = list(out.preempted)
        assert victims == holding[::-1][: len(victims)]
        assert list(self.sched.waiting)[: len(victims)] == victims[::-1]
        for seq in victims + yielded:
            assert seq.status is SequenceStatus.WAITING or seq in [i.seq for i in items]
            if seq.status is SequenceStatus.WAITING:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
                assert seq not in self.sched.running
        for seq in victims:
            assert seq not in [i.seq for i in items]
        preemptions = sum(len(o.preempted) + len(o.yielded) for o in self.outputs)
        assert self.sched.num_preemptions == preemptions
        running_before = holding

        # Service order: decodes (oldest first), then running prompts (oldest first), then the
        # queue. A sequence is only skipped when the budget ran out (or it was preempted).
        scheduled = {i.seq: i for i in items}
        remaining = {s: before[s][2] - before[s][1] for s in running_before}
        order = [s for s in running_before if remaining[s] == 1] + [
            s for s in running_before if remaining[s] > 1
        ]
        order = [s for s in order if s not in victims]
        served = [s in scheduled for s in order]
        assert served == sorted(served, reverse=True), "a running sequence was overtaken"
        if not all(served):
            assert out.num_tokens == budget
        for seq in order:
            if seq in scheduled:
                item = scheduled[seq]
                assert item.num_tokens == remaining[seq] or (
                    item.num_tokens < remaining[seq] and (out.num_tokens == budget or victims)
                )
        queue = yielded[::-1] + waiting_before  # the queue at admission: the yielded went first
        admitted = [scheduled[s] for s in queue if s in scheduled]
        assert len(admitted) + sum(served) == len(items)
        if admitted:
            assert not victims and all(served)

        # What the scheduler knew of a leader when it came to a follower: a leader admitted
        # earlier in this step counts with the prefix it found cached.
        def leader_then(seq: Sequence) -> tuple[bool, int]:
            leader = seq.leader
            assert leader is not None
            if (
                leader in scheduled
                and leader in waiting_before
                and waiting_before.index(leader) < waiting_before.index(seq)
            ):
                return True, scheduled[leader].start
            return before[leader][0] is SequenceStatus.RUNNING, before[leader][1]

        def waits_for_leader(seq: Sequence) -> bool:
            if seq.leader is None or seq.leader.finished:
                return False
            return leader_then(seq)[1] < len(seq.leader.prompt_token_ids)

        # The request with the fewest running sequences first, first come first served among
        # equals, of those free to start (followers wait for their leader).
        counts = Counter(s.request_id for s in running_before if s not in victims)
        eligible = [s for s in queue if not waits_for_leader(s)]
        picks: list[Sequence] = []
        for _ in admitted:
            fewest = min(counts[s.request_id] for s in eligible)
            picks.append(next(s for s in eligible if counts[s.request_id] == fewest))
            eligible.remove(picks[-1])
            counts[picks[-1].request_id] += 1
        assert {i.seq for i in admitted} == set(picks)
        admitted = [scheduled[s] for s in picks]  # in the order they were admitted
        for n, item in enumerate(admitted):
            seq = item.seq
            # Starts after what it found cached: whole blocks, never its last token.
            assert item.start % self.bs == 0 and item.start < seq.num_tokens
            assert item.start <= seq.num_cached_tokens
            if seq not in self.admitted_before:
                assert item.start == seq.num_cached_tokens
            self.admitted_before.add(seq)
            leader = seq.leader
            shared = 0
            if leader is not None and leader_then(seq)[0] and not seq.output_token_ids:
                # n > 1: the leader's full prompt blocks are shared, not recomputed.
                shared = min((len(seq.prompt_token_ids) - 1) // self.bs, leader_then(seq)[1] // self.bs)
            if shared:
                assert item.start == shared * self.bs
                assert seq.block_table[:shared] == leader.block_table[:shared]  # type: ignore[union-attr]
            elif not self.blocks.enable_prefix_caching:
                assert item.start == 0
            # A prompt is cut short only by the budget.
            if item.start + item.num_tokens < seq.num_tokens:
                assert out.num_tokens == budget and n == len(admitted) - 1
        # Listed in service order, several-token entries first.
        service = [scheduled[s] for s in order if s in scheduled] + admitted
        assert list(items) == [i for i in service if i.num_tokens > 1] + [
            i for i in service if i.num_tokens == 1
        ]

    def check_state(self) -> None:
        holders: list[int] = []
        for seq in self.seqs:
            if seq.status is SequenceStatus.RUNNING:
                assert seq in self.sched.running and seq not in self.sched.waiting
                assert len(seq.block_table) == self.blocks.blocks_for(seq.num_computed_tokens)
                assert 0 < seq.num_computed_tokens < seq.num_tokens  # something is left to compute
                # The fake KV cache holds exactly the sequence's computed tokens.
                assert (
                    self.cache_contents(seq, seq.num_computed_tokens)
                    == seq.token_ids[: seq.num_computed_tokens]
                )
                for k, block in enumerate(seq.block_table):
                    if self.blocks.ref_counts[block] > 1:  # shared: full and computed
                        assert (k + 1) * self.bs <= seq.num_computed_tokens
            else:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
                assert seq not in self.sched.running
                assert (seq in self.sched.waiting) == (seq.status is SequenceStatus.WAITING)
            holders.extend(seq.block_table)
        for b in range(self.blocks.num_blocks):
            assert self.blocks.ref_counts[b] == holders.count(b)
            assert (b in self.blocks.free_blocks) == (holders.count(b) == 0)
        assert self.blocks.num_free_blocks + len(set(holders)) == self.blocks.num_blocks
        for name, b in self.blocks.cached.items():
            assert self.blocks.hashes[b] == name
        assert 0 <= self.blocks.stats.hit_tokens <= self.blocks.stats.queried_tokens
        assert len(self.sched.running) + len(self.sched.waiting) == sum(not s.finished for s in self.seqs)

    def check_done(self) -> None:
        assert not self.sched.waiting and not self.sched.running
        assert self.blocks.num_free_blocks == self.blocks.num_blocks
        assert self.blocks.ref_counts == [0] * self.blocks.num_blocks
        for seq in self.seqs:
            assert seq.finished and seq.block_table == []
            if seq.finish_reason == "length":
                assert seq.output_token_ids == reference_output(
                    seq.index, seq.prompt_token_ids, seq.max_tokens
                )


def kinds(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_tokens) for item in out.scheduled]


def spans(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(i.seq.request_id, i.start, i.num_tokens, i.samples) for i in out.scheduled]


# ---------------------------------------------------------------------------- order and limits


def test_decodes_are_served_first_and_prefills_listed_first() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    sim.add(5, max_tokens=10)
    assert kinds(sim.step()) == [("req0", 5)]
    assert kinds(sim.step()) == [("req0", 1)]
    sim.add(3, max_tokens=10)
    sim.add(4, max_tokens=10)
    out = sim.step()  # one mixed step: req0's decode and the newcomers' prompts
    assert kinds(out) == [("req1", 3), ("req2", 4), ("req0", 1)]
    assert out.num_prefills == 2
    out = sim.step()
    assert kinds(out) == [("req0", 1), ("req1", 1), ("req2", 1)]
    assert out.num_prefills == 0
    sim.run()
    sim.check_done()


def test_token_budget_limits_every_step() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    for _ in range(5):
        sim.add(4, max_tokens=3)
    # 4 + 4, then the third prompt gets the 2 tokens left.
    assert spans(sim.step()) == [("req0", 0, 4, True), ("req1", 0, 4, True), ("req2", 0, 2, False)]
    # Decodes (2), the rest of req2 (2), then the queue with the 6 left: req3 whole, req4 in part.
    out = sim.step()
    assert spans(out) == [
        ("req2", 2, 2, True),
        ("req3", 0, 4, True),
        ("req4", 0, 2, False),
        ("req0", 4, 1, True),
        ("req1", 4, 1, True),
    ]
    assert out.num_prefills == 3 and out.num_tokens == 10
    # req0 and req1 finish here (3 tokens each).
    assert kinds(sim.step()) == [("req4", 2), ("req0", 1), ("req1", 1), ("req2", 1), ("req3", 1)]
    assert kinds(sim.step()) == [("req2", 1), ("req3", 1), ("req4", 1)]
    assert kinds(sim.step()) == [("req4", 1)]
    assert not sim.sched.has_unfinished()
    sim.check_done()


def test_prompts_fill_the_budget_exactly() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    for n in (3, 7, 1):
        sim.add(n, max_tokens=2)
    assert kinds(sim.step()) == [("req0", 3), ("req1", 7)]
    out = sim.step()  # two decodes and a one-token prompt: all single-token entries
    assert spans(out) == [("req0", 3, 1, True), ("req1", 7, 1, True), ("req2", 0, 1, True)]
    assert out.num_prefills == 0
    sim.run()
    sim.check_done()


def test_max_num_seqs_caps_the_running_set() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    sim.add(2, max_tokens=2)
    sim.add(2, max_tokens=4)
    sim.add(2, max_tokens=4)
    assert kinds(sim.step()) == [("req0", 2), ("req1", 2)]
    assert kinds(sim.step()) == [("req0", 1), ("req1", 1)]  # req0 finishes: 2 tokens
    assert [s.request_id for s in sim.sched.running] == ["req1"]
    assert kinds(sim.step()) == [("req2", 2), ("req1", 1)]  # a slot is free again
    sim.run()
    sim.check_done()


# ---------------------------------------------------------------------------- chunked prefill


def test_a_long_prompt_is_chunked_over_steps() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    seq = sim.add(30, max_tokens=3)
    assert [spans(sim.step()) for _ in range(4)] == [
        [("req0", 0, 8, False)],
        [("req0", 8, 8, False)],
        [("req0", 16, 8, False)],
        [("req0", 24, 6, True)],
    ]
    assert len(seq.output_token_ids) == 1 and seq.num_cached_tokens == 0
    assert spans(sim.step()) == [("req0", 30, 1, True)]
    sim.run()
    sim.check_done()


def test_a_prompt_longer_than_the_budget_is_chunked_between_others() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    sim.add(3, max_tokens=2)
    sim.add(20, max_tokens=2)
    sim.add(2, max_tokens=2)
    assert spans(sim.step()) == [("req0", 0, 3, True), ("req1", 0, 5, False)]
    assert spans(sim.step()) == [("req1", 5, 7, False), ("req0", 3, 1, True)]  # req0 finishes
    assert spans(sim.step()) == [("req1", 12, 8, True)]  # no budget left for req2
    assert spans(sim.step()) == [("req2", 0, 2, True), ("req1", 20, 1, True)]
    assert spans(sim.step()) == [("req2", 2, 1, True)]
    assert not sim.sched.has_unfinished()
    sim.check_done()


def test_a_decode_gets_a_token_every_step_while_a_long_prompt_is_chunked() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=4)
    decoder = sim.add(2, max_tokens=20)
    assert kinds(sim.step()) == [("req0", 2)]
    sim.add(30, max_tokens=2)
    for k in range(10):  # 30 = 10 chunks of the 3 tokens the decode leaves
        out = sim.step()
        assert spans(out) == [("req1", 3 * k, 3, k == 9), ("req0", 2 + k, 1, True)]
        assert out.num_prefills == 1
    assert len(decoder.output_token_ids) == 11
    assert kinds(sim.step()) == [("req0", 1), ("req1", 1)]
    sim.run()
    sim.check_done()


def test_a_chunk_of_one_token_is_a_single_token_entry_that_does_not_sample() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=2)
    sim.add(1, max_tokens=4)
    sim.add(3, max_tokens=1)
    out = sim.step()
    assert spans(out) == [("req0", 0, 1, True), ("req1", 0, 1, False)] and out.num_prefills == 0
    assert spans(sim.step()) == [("req0", 1, 1, True), ("req1", 1, 1, False)]
    assert spans(sim.step()) == [("req0", 2, 1, True), ("req1", 2, 1, True)]  # req1 finishes
    sim.run()
    sim.check_done()


# ---------------------------------------------------------------------------- prefix caching


def test_an_identical_prompt_starts_after_the_cached_blocks() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    first = sim.add(prompt, max_tokens=2)
    assert spans(sim.step()) == [("req0", 0, 10, True)]
    full_blocks = first.block_table[:2]
    sim.run()
    # The last token (in the third block) always runs: 2 full blocks = 8 tokens are cached.
    second = sim.add(prompt, max_tokens=2)
    out = sim.step()
    assert spans(out) == [("req1", 8, 2, True)]
    assert second.num_cached_tokens == 8 and first.num_cached_tokens == 0
    assert second.block_table[:2] == full_blocks
    assert sim.blocks.stats.queried_tokens == 20 and sim.blocks.stats.hit_tokens == 8
    sim.run()
    sim.check_done()
    assert second.output_token_ids == first.output_token_ids


def test_a_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    sim.add(list(range(8)), max_tokens=1)
    sim.run()
    sim.add(list(range(8)), max_tokens=1)
    assert spans(sim.step()) == [("req1", 4, 4, True)]
    sim.check_done()


def test_a_prompt_shares_the_blocks_of_a_running_sequence() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    common = list(range(100, 112))
    first = sim.add([*common, 1, 2], max_tokens=5)
    sim.step()
    second = sim.add([*common, 3], max_tokens=5)  # same 3 first blocks, another tail
    out = sim.step()
    assert spans(out) == [("req0", 14, 1, True), ("req1", 12, 1, True)]  # both single-token
    assert second.block_table[:3] == first.block_table[:3]
    assert [sim.blocks.ref_counts[b] for b in first.block_table[:3]] == [2, 2, 2]
    sim.run()
    sim.check_done()


def test_without_prefix_caching_every_prompt_is_computed() -> None:
    sim = Sim(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    prompt = list(range(10))
    sim.add(prompt, max_tokens=2)
    sim.run()
    second = sim.add(prompt, max_tokens=2)
    assert spans(sim.step()) == [("req1", 0, 10, True)]
    assert second.num_cached_tokens == 0 and sim.blocks.stats.hit_tokens == 0
    sim.run()
    sim.check_done()


def test_a_chunked_prompt_is_cached_chunk_by_chunk() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=6)
    prompt = list(range(200, 220))
    sim.add(prompt, max_tokens=1)
    sim.step()  # 6 tokens computed: block 0 is cached
    sim.step()  # 12: blocks 0..2
    # A newcomer with the same prompt finds the 3 blocks already; the budget is spent by req0.
    second = sim.add(prompt, max_tokens=1)
    assert spans(sim.step()) == [("req0", 12, 6, False)]
    out = sim.step()
    assert spans(out) == [("req0", 18, 2, True), ("req1", 16, 4, True)]
    assert second.num_cached_tokens == 16  # blocks 0..3 by then
    sim.check_done()


# ---------------------------------------------------------------------------- preemption


def test_preempted_sequence_is_requeued_first_and_resumed_from_the_cache() -> None:
    sim = Sim(num_blocks=3, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    a = sim.add(2, max_tokens=3)
    b = sim.add(2, max_tokens=3)
    assert kinds(sim.step()) == [("req0", 2), ("req1", 2)]  # one block each, one left
    # Both now hold 3 tokens and need a second block; only one is free: a (older) takes it and the
    # newest, b, is preempted.
    out = sim.step()
    assert kinds(out) == [("req0", 1)]
    assert out.preempted == (b,)
    assert sim.sched.num_preemptions == 1
    assert list(sim.sched.waiting) == [b]
    assert (b.status, b.block_table, b.num_computed_tokens) == (SequenceStatus.WAITING, [], 0)
    assert len(b.output_token_ids) == 1  # its sampled token is kept
    assert sim.blocks.num_free_blocks == 1  # b's block: free, but still cached
    # b needs 2 blocks (its cached one and a new one) but only 1 is free: it waits while a finishes.
    assert kinds(sim.step()) == [("req0", 1)]
    assert a.finished and sim.blocks.num_free_blocks == 3
    # Then b resumes: its prompt block is still cached, only its sampled token is recomputed.
    out = sim.step()
    assert spans(out) == [("req1", 2, 1, True)]
    assert b.num_cached_tokens == 2
    assert kinds(sim.step()) == [("req1", 1)]
    assert not sim.sched.has_unfinished()
    sim.check_done()


def test_without_the_cache_a_preempted_sequence_is_recomputed_whole() -> None:
    sim = Sim(
        num_blocks=3, block_size=2, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    sim.add(2, max_tokens=3)
    b = sim.add(2, max_tokens=3)
    sim.step()
    assert sim.step().preempted == (b,)
    sim.step()
    out = sim.step()
    assert spans(out) == [("req1", 0, 3, True)]
    assert out.scheduled[0].token_ids == (*b.prompt_token_ids, b.output_token_ids[0])
    sim.run()
    sim.check_done()


def test_preemption_with_a_tiny_pool_gives_the_same_tokens() -> None:
    # Each sequence needs up to ceil((3 + 6) / 2) = 5 of the 6 blocks: they cannot all run at once.
    # (Sim checks at every step that the victims are the newest running sequences, freed and put
    # at the front of the queue, and that nothing is admitted in that step.)
    for caching in (True, False):
        sim = Sim(6, block_size=2, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=caching)
        seqs = [sim.add(3, max_tokens=6) for _ in range(3)]
        sim.run()
        assert sim.sched.num_preemptions > 0
        for k, out in enumerate(sim.outputs):
            for victim in out.preempted:
                assert victim is not seqs[0]  # the oldest never is the newest while others run
                # Re-admitted later.
                assert any(i.seq is victim for o in sim.outputs[k + 1 :] for i in o.scheduled)
        sim.check_done()  # every output equals the uninterrupted reference
        assert [len(s.output_token_ids) for s in seqs] == [6, 6, 6]


def test_a_preempted_victim_already_in_the_step_is_taken_out() -> None:
    # Build the order "older prompt part-way, newer decode" by hand: y then x are admitted, then
    # the running order is swapped so that x counts as the older one. (Otherwise a running prompt
    # part-way through is always newer than every decode: it was cut short by the budget, so
    # nothing was admitted after it. Random workloads never reach this branch.)
    sim = Sim(num_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=6)
    y = sim.add(2, max_tokens=4)
    x = sim.add(8, max_tokens=1)
    assert spans(sim.step()) == [("req0", 0, 2, True), ("req1", 0, 4, False)]
    # y: 3 tokens, 2 computed (1 block); x: 4 of 8 computed (2 blocks); 1 block free.
    sim.sched.running = [x, y]
    # y (a decode) is served first and takes the free block; x then needs 2 more blocks for the
    # rest of its prompt (4 tokens left, 5 of budget left): the newest, y, is preempted although
    # scheduled already, its token is refunded, and x gets its whole remaining prompt.
    out = sim.step()
    assert out.preempted == (y,)
    assert spans(out) == [("req1", 4, 4, True)]
    assert list(sim.sched.waiting) == [y]
    sim.run()
    sim.check_done()


def test_a_sequence_that_cannot_grow_preempts_itself_when_newest() -> None:
    sim = Sim(num_blocks=2, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    a = sim.add(1, max_tokens=2)
    b = sim.add(2, max_tokens=2)
    sim.step()  # a: 1 block, b: 1 block, none free
    out = sim.step()  # a needs nothing new; b (3 tokens) needs a second block: preempts itself
    assert spans(out) == [("req0", 1, 1, True)]
    assert out.preempted == (b,)
    assert a.finished
    sim.run()
    sim.check_done()


# ---------------------------------------------------------------------------- n > 1


def test_followers_wait_for_the_leader_prompt_then_share_its_blocks() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    leader = sim.add(10, max_tokens=3, n=3)
    f1, f2 = sim.followers(leader)
    other = sim.add(3, max_tokens=3)
    out = sim.step()  # the followers wait; the request behind them does not
    assert spans(out) == [("req0", 0, 10, True), ("req1", 0, 3, True)]
    assert [i.seq for i in out.scheduled] == [leader, other]
    assert list(sim.sched.waiting) == [f1, f2]
    out = sim.step()
    # Both fork the leader's 2 full prompt blocks and compute the 2 tokens after them.
    assert [(i.seq, i.start, i.num_tokens, i.samples) for i in out.scheduled] == [
        (f1, 8, 2, True),
        (f2, 8, 2, True),
        (leader, 10, 1, True),
        (other, 3, 1, True),
    ]
    assert f1.block_table[:2] == f2.block_table[:2] == leader.block_table[:2]
    assert [sim.blocks.ref_counts[b] for b in leader.block_table] == [3, 3, 1]
    assert f1.num_cached_tokens == f2.num_cached_tokens == 8
    assert len({f1.block_table[2], f2.block_table[2], leader.block_table[2]}) == 3
    sim.run()
    sim.check_done()
    assert len({tuple(s.output_token_ids) for s in (leader, f1, f2)}) == 3


def test_followers_of_a_chunked_leader_start_once_its_prompt_is_computed() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=4)
    leader = sim.add(10, max_tokens=3, n=3)
    f1, f2 = sim.followers(leader)
    assert [(i.seq, i.start, i.num_tokens) for i in sim.step().scheduled] == [(leader, 0, 4)]
    assert [(i.seq, i.start, i.num_tokens) for i in sim.step().scheduled] == [(leader, 4, 4)]
    # 2 tokens of budget are left, but the leader's prompt is not computed yet.
    assert [(i.seq, i.start, i.num_tokens) for i in sim.step().scheduled] == [(leader, 8, 2)]
    out = sim.step()  # the leader's decode, then f1 (2 tokens) and f2 (the 1 token left)
    assert [(i.seq, i.start, i.num_tokens, i.samples) for i in out.scheduled] == [
        (f1, 8, 2, True),
        (leader, 10, 1, True),
        (f2, 8, 1, False),
    ]
    assert [sim.blocks.ref_counts[b] for b in leader.block_table[:2]] == [3, 3]
    sim.run()
    sim.check_done()


def test_a_follower_needs_free_blocks_only_for_what_it_does_not_share() -> None:
    # The leader holds 3 of the 4 blocks; the follower shares 2 of them and needs only 1 new one.
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    leader = sim.add(9, max_tokens=3, n=2)
    (follower,) = sim.followers(leader)
    sim.step()
    assert sim.blocks.num_free_blocks == 1
    out = sim.step()
    assert [(i.seq, i.start, i.num_tokens) for i in out.scheduled] == [(leader, 9, 1), (follower, 8, 1)]
    assert sim.blocks.num_free_blocks == 0
    sim.run()
    assert sim.sched.num_preemptions == 0
    sim.check_done()


def test_followers_of_a_finished_leader_use_the_prefix_cache() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    leader = sim.add(10, max_tokens=2, n=2)
    (follower,) = sim.followers(leader)
    sim.step()
    sim.step()  # max_num_seqs=1: the follower waits until the leader is done
    assert leader.finished and follower.status is SequenceStatus.WAITING
    assert spans(sim.step()) == [("req0", 8, 2, True)]
    assert follower.num_cached_tokens == 8
    sim.run()
    sim.check_done()


def test_followers_share_a_leader_prompt_without_prefix_caching() -> None:
    sim = Sim(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False
    )
    leader = sim.add(9, max_tokens=3, n=2)
    (follower,) = sim.followers(leader)
    sim.step()
    out = sim.step()
    assert [(i.seq, i.start, i.num_tokens) for i in out.scheduled] == [(leader, 9, 1), (follower, 8, 1)]
    assert sim.blocks.ref_counts[leader.block_table[0]] == 2
    sim.run()
    sim.check_done()


# ---------------------------------------------------------------------------- finishing


def test_finish_frees_the_blocks_of_a_running_sequence() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a = sim.add(9, max_tokens=10)
    b = sim.add(3, max_tokens=10)
    sim.step()
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    sim.abort(a)
    assert a.block_table == [] and a not in sim.sched.running
    assert sim.blocks.num_free_blocks == 16 - 1
    sim.check_state()
    sim.abort(b)
    assert sim.blocks.num_free_blocks == 16
    assert not sim.sched.has_unfinished()
    sim.check_state()


def test_finish_removes_a_waiting_sequence() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    sim.add(3, max_tokens=2)
    b = sim.add(3, max_tokens=2)
    sim.step()
    assert list(sim.sched.waiting) == [b]
    sim.abort(b)
    assert not sim.sched.waiting
    sim.run()
    sim.check_done()


def test_empty_scheduler_schedules_nothing() -> None:
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    out = sim.sched.schedule()
    assert out.empty and out.num_tokens == 0 and out.num_prefills == 0 and out.preempted == ()
    assert not sim.sched.has_unfinished()


# ---------------------------------------------------------------------------- random workloads

PREFIXES = [[7000 + i for i in range(24)], [8000 + i for i in range(24)]]


@settings(max_examples=150, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 48),
    caching=st.booleans(),
    requests=st.lists(
        st.tuples(
            st.integers(0, len(PREFIXES)),  # which shared prefix (the last: none)
            st.integers(0, 24),  # how much of it
            st.integers(1, 8),  # own tokens after it
            st.integers(1, 10),  # max_tokens
            st.sampled_from([1, 1, 2, 3]),  # n
        ),
        min_size=1,
        max_size=8,
    ),
    extra_blocks=st.integers(0, 6),
    arrivals=st.lists(st.integers(0, 6), max_size=8),
)
def test_random_workloads_finish_with_every_invariant(
    block_size: int,
    max_num_seqs: int,
    budget: int,
    caching: bool,
    requests: list[tuple[int, int, int, int, int]],
    extra_blocks: int,
    arrivals: list[int],
) -> None:
    prompts = [
        ([*PREFIXES[p][:k]] if p < len(PREFIXES) else []) + [9000 + 10 * r + i for i in range(own)]
        for r, (p, k, own, _, _) in enumerate(requests)
    ]
    # The pool always fits the largest completion alone, as the engine checks on admission.
    largest = max(
        math.ceil((len(prompt) + m) / block_size)
        for prompt, (*_, m, _) in zip(prompts, requests, strict=True)
    )
    sim = Sim(largest + extra_blocks, block_size, max_num_seqs, budget, caching)
    pending = [(prompt, m, n) for prompt, (*_, m, n) in zip(prompts, requests, strict=True)]
    delays = list(arrivals)
    steps = 0
    while pending or sim.sched.has_unfinished():
        # Requests arrive over time, some while others are mid-generation.
        while pending and (not delays or delays[0] <= 0 or not sim.sched.has_unfinished()):
            prompt, m, n = pending.pop(0)
            sim.add(prompt, max_tokens=m, n=n)
            if delays:
                delays.pop(0)
        if delays:
            delays[0] -= 1
        if sim.sched.has_unfinished():
            assert not sim.step().empty
        steps += 1
        assert steps < 3000, "livelock"
    sim.check_done()


def test_a_newcomer_gets_its_share_of_a_full_running_set() -> None:
    """One request's six completions fill the running set; a request arriving later is admitted
    at the next step (its share), the big request's newest completion waiting instead, and every
    completion still gets its reference tokens."""
    sim = Sim(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=100)
    big = sim.add(6, max_tokens=12, n=6)
    while len(sim.sched.running) < 4:
        sim.step()
    sim.step()
    assert {s.request_id for s in sim.sched.running} == {big.request_id}
    newcomer = sim.add(5, max_tokens=3)
    out = sim.step()
    assert [s.request_id for s in out.yielded] == [big.request_id]
    assert newcomer in [i.seq for i in out.scheduled]
    assert not sim.step().yielded  # the newcomer has its share now: no more yielding
    sim.run()
    sim.check_done()
