"""Scheduler without a model: `Sim` plays the model runner. After each `schedule()` it "computes" the
scheduled tokens into a fake per-sequence KV cache, advances `num_computed_tokens`, appends a fake
token to each sequence that samples and finishes sequences at max_tokens, the way the engine does.
Every step is checked against the scheduling contract."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.runtime.block_manager import BlockManager
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lowbit.runtime.sequence import Sequence, SequenceStatus


class Sim:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = BlockManager(num_blocks, block_size)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len=1 << 20)
        self.sched = Scheduler(self.config, self.blocks)
        self.seqs: list[Sequence] = []
        self.kv: dict[int, list[int]] = {}  # what the fake KV cache holds per sequence
        self.outputs: list[SchedulerOutput] = []
        self.preempted_at: dict[int, list[list[int]]] = {}  # seq_id -> token ids at each preemption
        self.reprefills: dict[int, list[tuple[int, ...]]] = {}  # seq_id -> tokens of each re-prefill

    def add(self, prompt_len: int, max_tokens: int) -> Sequence:
        n = len(self.seqs)
        prompt = [(n * 1000 + i) % 50000 for i in range(prompt_len)]
        seq = Sequence(f"req{n}", 0, prompt, SamplingParams(), None, max_tokens)  # type: ignore[arg-type]
        self.seqs.append(seq)
        self.kv[seq.seq_id] = []
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        self.outputs.append(out)
        self._check_output(out, running_before)
        for item in out.scheduled:
            seq = item.seq
            if item.start == 0 and seq.seq_id in self.preempted_at and seq.output_token_ids:
                self.reprefills.setdefault(seq.seq_id, []).append(item.token_ids)
            self.kv[seq.seq_id].extend(item.token_ids)
            seq.num_computed_tokens += item.num_tokens
        for item in out.scheduled:
            if item.samples:
                seq = item.seq
                seq.append(60000 + len(seq.output_token_ids))
                if len(seq.output_token_ids) >= seq.max_tokens:
                    seq.finish("length")
                    self.sched.finish(seq)
                    self.kv[seq.seq_id] = []  # its cache is gone
        self.check_state()
        return out

    def abort(self, seq: Sequence) -> None:
        seq.finish("abort")
        self.sched.finish(seq)
        self.kv[seq.seq_id] = []

    def run(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            out = self.step()
            assert not out.empty, "no progress with unfinished sequences"
            steps += 1
            assert steps < max_steps, "livelock"
        return steps

    def _check_output(self, out: SchedulerOutput, running_before: list[Sequence]) -> None:
        items = out.scheduled
        # Prefill entries (several tokens, starting at the first uncomputed one) first, then decodes.
        assert all(i.num_tokens == 1 for i in items[out.num_prefills :])
        for item in items[: out.num_prefills]:
            assert item.start == 0
            assert item.num_tokens == item.seq.num_tokens
        for item in items[out.num_prefills :]:
            assert item.start == item.seq.num_tokens - 1
        assert out.num_prefills in (0, len(items)), "prefill and decode steps are separate"
        # Limits.
        assert len(items) <= self.config.max_num_seqs
        assert len(self.sched.running) <= self.config.max_num_seqs
        assert out.num_tokens <= self.config.max_num_batched_tokens or len(items) == 1
        assert len({i.seq.seq_id for i in items}) == len(items)
        # Each entry continues exactly where the cache ends, has room for its tokens, and samples
        # iff it reaches the last token.
        for item in items:
            seq = item.seq
            assert seq.status is SequenceStatus.RUNNING
            assert item.start == len(self.kv[seq.seq_id]) == seq.num_computed_tokens
            assert item.token_ids == tuple(seq.token_ids[item.start : item.start + item.num_tokens])
            assert len(seq.block_table) * self.blocks.block_size >= item.start + item.num_tokens
            assert item.samples == (item.start + item.num_tokens == seq.num_tokens)
        # Preemption: the newest running sequences, freed, back at the front of the queue.
        if out.preempted:
            assert out.num_prefills == 0
            victims = list(out.preempted)
            assert set(victims) <= set(running_before)
            newest_first = running_before[::-1][: len(victims)]
            assert victims == newest_first
            assert list(self.sched.waiting)[: len(victims)] == victims[::-1]
            for seq in victims:
                assert seq.status is SequenceStatus.WAITING
                assert seq.block_table == []
                assert seq.num_computed_tokens == 0
                assert seq not in self.sched.running
                assert seq not in [i.seq for i in items]
                self.preempted_at.setdefault(seq.seq_id, []).append(list(seq.token_ids))
                self.kv[seq.seq_id] = []

    def check_state(self) -> None:
        owned: list[int] = []
        for seq in self.seqs:
            assert self.kv[seq.seq_id] == seq.token_ids[: seq.num_computed_tokens]
            if seq.status is SequenceStatus.RUNNING:
                assert seq in self.sched.running
                assert len(seq.block_table) == self.blocks.blocks_for(seq.num_computed_tokens)
                assert seq.num_computed_tokens == seq.num_tokens - 1  # its next token is sampled
            else:
                assert seq.block_table == []
                assert seq.num_computed_tokens == 0
                assert (seq in self.sched.waiting) == (seq.status is SequenceStatus.WAITING)
            owned.extend(seq.block_table)
        assert len(owned) == len(set(owned))
        assert self.blocks.num_free_blocks + len(owned) == self.blocks.num_blocks
        assert all(self.blocks.ref_counts[b] == 1 for b in owned)
        assert sum(self.blocks.ref_counts) == len(owned)

    def check_done(self) -> None:
        assert not self.sched.waiting and not self.sched.running
        assert self.blocks.num_free_blocks == self.blocks.num_blocks
        assert self.blocks.ref_counts == [0] * self.blocks.num_blocks
        for seq in self.seqs:
            assert seq.finished
            if seq.finish_reason == "length":
                assert len(seq.output_token_ids) == seq.max_tokens
            assert seq.block_table == []


def kinds(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_tokens) for item in out.scheduled]


def test_prefills_come_before_decodes() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    sim.add(5, max_tokens=10)
    assert kinds(sim.step()) == [("req0", 5)]
    assert kinds(sim.step()) == [("req0", 1)]
    sim.add(3, max_tokens=10)
    sim.add(4, max_tokens=10)
    out = sim.step()  # the newcomers' prefill wins over req0's decode
    assert kinds(out) == [("req1", 3), ("req2", 4)]
    assert out.num_prefills == 2
    out = sim.step()
    assert kinds(out) == [("req0", 1), ("req1", 1), ("req2", 1)]
    assert out.num_prefills == 0
    sim.run()
    sim.check_done()


def test_token_budget_limits_a_prefill_step() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    for _ in range(5):
        sim.add(4, max_tokens=3)
    assert kinds(sim.step()) == [("req0", 4), ("req1", 4)]  # a third would make 12 > 10
    assert kinds(sim.step()) == [("req2", 4), ("req3", 4)]
    assert kinds(sim.step()) == [("req4", 4)]
    assert sim.step().num_prefills == 0
    sim.run()
    sim.check_done()


def test_prompts_fill_the_budget_exactly() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    for n in (3, 7, 1):
        sim.add(n, max_tokens=2)
    assert kinds(sim.step()) == [("req0", 3), ("req1", 7)]
    assert kinds(sim.step()) == [("req2", 1)]


def test_max_num_seqs_caps_the_running_set() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    sim.add(2, max_tokens=2)
    sim.add(2, max_tokens=4)
    sim.add(2, max_tokens=4)
    assert kinds(sim.step()) == [("req0", 2), ("req1", 2)]
    assert kinds(sim.step()) == [("req0", 1), ("req1", 1)]  # req0 finishes: 2 tokens
    assert [s.request_id for s in sim.sched.running] == ["req1"]
    assert kinds(sim.step()) == [("req2", 2)]  # a slot is free again
    sim.run()
    sim.check_done()


def test_a_prompt_longer_than_the_budget_runs_alone() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    sim.add(3, max_tokens=2)
    sim.add(20, max_tokens=2)
    sim.add(2, max_tokens=2)
    assert kinds(sim.step()) == [("req0", 3)]
    assert kinds(sim.step()) == [("req1", 20)]
    assert kinds(sim.step()) == [("req2", 2)]
    sim.run()
    sim.check_done()


def test_a_lone_long_prompt_is_scheduled() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    sim.add(30, max_tokens=3)
    out = sim.step()
    assert kinds(out) == [("req0", 30)]
    assert out.scheduled[0].samples
    sim.run()
    sim.check_done()


def test_a_prompt_waits_for_blocks_without_blocking_decodes() -> None:
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a = sim.add(9, max_tokens=3)  # 3 blocks, enough for all its 9 + 3 tokens
    sim.add(6, max_tokens=1)  # 2 blocks: does not fit next to req0's 3
    assert kinds(sim.step()) == [("req0", 9)]
    assert [s.request_id for s in sim.sched.waiting] == ["req1"]
    assert kinds(sim.step()) == [("req0", 1)]
    assert kinds(sim.step()) == [("req0", 1)]
    assert a.finished
    assert kinds(sim.step()) == [("req1", 6)]
    assert sim.sched.num_preemptions == 0
    assert not sim.sched.has_unfinished()
    sim.check_done()


def test_preemption_with_a_tiny_block_pool() -> None:
    # Each sequence needs up to ceil((3 + 6) / 2) = 5 of the 6 blocks: they cannot all run at once.
    sim = Sim(num_blocks=6, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [sim.add(3, max_tokens=6) for _ in range(3)]
    sim.run()
    assert sim.sched.num_preemptions > 0
    assert sim.sched.num_preemptions == sum(len(v) for v in sim.preempted_at.values())
    assert sim.preempted_at, "preemptions were seen in the outputs"
    for seq_id, snapshots in sim.preempted_at.items():
        # Rescheduled later as one prefill over the prompt plus the outputs it had.
        redone = sim.reprefills.get(seq_id, [])
        with_outputs = [tuple(s) for s in snapshots if len(s) > 3]
        assert redone == with_outputs
    sim.check_done()
    assert [len(s.output_token_ids) for s in seqs] == [6, 6, 6]


def test_preempted_sequence_is_requeued_first_and_recomputed() -> None:
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
    assert sim.blocks.num_free_blocks == 1
    # b needs 2 blocks for its 3 tokens: it waits while a decodes and finishes.
    assert kinds(sim.step()) == [("req0", 1)]
    assert a.finished and sim.blocks.num_free_blocks == 3
    # Then b is recomputed as a prefill over prompt + its output so far, and samples.
    out = sim.step()
    assert kinds(out) == [("req1", 3)]
    item = out.scheduled[0]
    assert item.start == 0 and item.samples
    assert item.token_ids == (*b.prompt_token_ids, b.output_token_ids[0])
    assert kinds(sim.step()) == [("req1", 1)]
    assert not sim.sched.has_unfinished()
    sim.check_done()


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
    sim.check_done()


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
    assert out.empty and out.num_tokens == 0 and out.num_prefills == 0
    assert not sim.sched.has_unfinished()


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 48),
    requests=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 12)), min_size=1, max_size=8),
    extra_blocks=st.integers(0, 12),
    arrivals=st.lists(st.integers(0, 6), max_size=8),
)
def test_random_workloads_finish_with_every_invariant(
    block_size: int,
    max_num_seqs: int,
    budget: int,
    requests: list[tuple[int, int]],
    extra_blocks: int,
    arrivals: list[int],
) -> None:
    # The pool always fits the largest request alone, as the engine guarantees on admission; a
    # decode step of max_num_seqs tokens fits the budget (decodes are not budgeted separately).
    largest = max(math.ceil((p + m) / block_size) for p, m in requests)
    sim = Sim(largest + extra_blocks, block_size, max_num_seqs, max(budget, max_num_seqs))
    pending = list(requests)
    delays = list(arrivals)
    steps = 0
    while pending or sim.sched.has_unfinished():
        # Requests arrive over time, some while others are mid-generation.
        while pending and (not delays or delays[0] <= 0 or not sim.sched.has_unfinished()):
            sim.add(*pending.pop(0))
            if delays:
                delays.pop(0)
        if delays:
            delays[0] -= 1
        if sim.sched.has_unfinished():
            assert not sim.step().empty
        steps += 1
        assert steps < 2000, "livelock"
    sim.check_done()
