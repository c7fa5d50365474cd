"""BlockManager bookkeeping: block counts, grow/free, exhaustion, and invariants under random use.

The manager only touches a sequence's `block_table` and `num_computed_tokens`, so the sequences here
are real `Sequence` objects without a detokenizer."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lowbit.runtime.block_manager import BlockManager
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.sequence import Sequence


def make_seq(num_prompt_tokens: int = 1, request_id: str = "r") -> Sequence:
    return Sequence(request_id, 0, list(range(num_prompt_tokens)), SamplingParams(), None, 16)  # type: ignore[arg-type]


def owned(seqs: list[Sequence]) -> list[int]:
    return [b for s in seqs for b in s.block_table]


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    blocks = owned(seqs)
    free = list(bm.free_blocks)
    assert len(blocks) == len(set(blocks)), "a block is owned twice"
    assert len(free) == len(set(free)), "a block is free twice"
    assert not set(blocks) & set(free), "a block is both owned and free"
    assert sorted(blocks + free) == list(range(bm.num_blocks))
    assert bm.num_free_blocks == len(free) == bm.num_blocks - len(blocks)
    assert all(bm.ref_counts[b] == 0 for b in free)
    assert all(bm.ref_counts[b] == 1 for b in blocks)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_blocks_for_is_the_ceiling(block_size: int) -> None:
    bm = BlockManager(8, block_size)
    for n in range(0, 5 * block_size + 2):
        assert bm.blocks_for(n) == math.ceil(n / block_size)


def test_can_allocate_up_to_the_free_capacity() -> None:
    bm = BlockManager(5, 4)
    assert bm.can_allocate(0)
    assert bm.can_allocate(20)
    assert not bm.can_allocate(21)
    seq = make_seq()
    bm.grow(seq, 9)  # 3 blocks
    assert bm.can_allocate(8)
    assert not bm.can_allocate(9)


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 17, 32])
def test_grow_allocates_exactly_the_needed_blocks(num_tokens: int) -> None:
    bm = BlockManager(10, 4)
    seq = make_seq()
    bm.grow(seq, num_tokens)
    assert len(seq.block_table) == -(-num_tokens // 4)
    assert bm.num_free_blocks == 10 - len(seq.block_table)
    check_invariants(bm, [seq])


def test_grow_token_by_token_adds_a_block_only_when_one_fills() -> None:
    bm, seq = BlockManager(10, 4), make_seq()
    for n in range(1, 41):
        before = list(seq.block_table)
        bm.grow(seq, n)
        assert seq.block_table[: len(before)] == before  # existing blocks keep their place
        assert len(seq.block_table) == len(before) + (1 if n % 4 == 1 else 0)
    assert bm.num_free_blocks == 0
    check_invariants(bm, [seq])


def test_grow_to_fewer_tokens_keeps_the_blocks() -> None:
    bm, seq = BlockManager(10, 4), make_seq()
    bm.grow(seq, 12)
    table = list(seq.block_table)
    bm.grow(seq, 5)
    bm.grow(seq, 0)
    assert seq.block_table == table


def test_free_returns_every_block_and_resets_the_sequence() -> None:
    bm = BlockManager(8, 2)
    a, b = make_seq(), make_seq()
    bm.grow(a, 7)
    bm.grow(b, 5)
    a.num_computed_tokens = 7
    bm.free(a)
    assert a.block_table == []
    assert a.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 - 3
    check_invariants(bm, [a, b])
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.ref_counts == [0] * 8
    check_invariants(bm, [a, b])


def test_freed_blocks_can_all_be_taken_again() -> None:
    bm = BlockManager(6, 4)
    a = make_seq()
    bm.grow(a, 24)
    bm.free(a)
    b = make_seq()
    bm.grow(b, 24)
    assert sorted(b.block_table) == list(range(6))
    check_invariants(bm, [a, b])


def test_free_of_a_sequence_without_blocks_is_harmless() -> None:
    bm, seq = BlockManager(3, 4), make_seq()
    bm.free(seq)
    assert bm.num_free_blocks == 3
    check_invariants(bm, [seq])


def test_grow_without_room_raises_and_changes_nothing() -> None:
    bm = BlockManager(4, 4)
    a, b = make_seq(), make_seq()
    bm.grow(a, 12)  # 3 of 4 blocks
    bm.grow(b, 4)  # the last one
    assert not bm.can_grow(b, 5)
    free_before, table_before, refs_before = list(bm.free_blocks), list(b.block_table), list(bm.ref_counts)
    with pytest.raises(RuntimeError):
        bm.grow(b, 5)
    assert list(bm.free_blocks) == free_before
    assert b.block_table == table_before
    assert bm.ref_counts == refs_before
    check_invariants(bm, [a, b])


def test_can_grow_counts_the_blocks_already_owned() -> None:
    bm = BlockManager(4, 4)
    a, b = make_seq(), make_seq()
    bm.grow(a, 8)
    bm.grow(b, 4)
    # b owns 1 block, 1 is free: 8 tokens fit, 9 do not.
    assert bm.can_grow(b, 8)
    assert not bm.can_grow(b, 9)
    assert not bm.can_allocate(8)  # a fresh sequence would need 2


def test_a_shared_block_is_freed_only_by_its_last_user() -> None:
    """Sharing (prefix caching, forks) is not implemented yet, but the ref counts already promise
    it: set up a shared block by hand as such a feature would."""
    bm = BlockManager(4, 4)
    a, b = make_seq(), make_seq()
    bm.grow(a, 8)
    shared = a.block_table[0]
    b.block_table.append(shared)
    bm.ref_counts[shared] += 1
    bm.grow(b, 8)  # b now owns [shared, one new block]
    assert bm.num_free_blocks == 1
    bm.free(a)
    assert shared not in bm.free_blocks
    assert bm.ref_counts[shared] == 1
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == 4
    assert bm.ref_counts == [0] * 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Random grow/free over a few sequences; the expected table sizes are tracked independently."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 16]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.seqs = [make_seq(request_id=str(i)) for i in range(4)]
        self.expected = [0] * 4

    @rule(i=st.integers(0, 3), num_tokens=st.integers(0, 60))
    def grow(self, i: int, num_tokens: int) -> None:
        seq = self.seqs[i]
        need = math.ceil(num_tokens / self.bm.block_size)
        fits = need - self.expected[i] <= self.bm.num_blocks - sum(self.expected)
        assert self.bm.can_grow(seq, num_tokens) == fits
        free_before = set(self.bm.free_blocks)
        old = list(seq.block_table)
        if fits:
            self.bm.grow(seq, num_tokens)
            self.expected[i] = max(self.expected[i], need)
            assert seq.block_table[: len(old)] == old
            assert set(seq.block_table[len(old) :]) <= free_before
        else:
            with pytest.raises(RuntimeError):
                self.bm.grow(seq, num_tokens)
            assert seq.block_table == old
        assert len(seq.block_table) == self.expected[i]

    @rule(i=st.integers(0, 3))
    def free(self, i: int) -> None:
        self.bm.free(self.seqs[i])
        self.expected[i] = 0
        assert self.seqs[i].block_table == []

    @invariant()
    def consistent(self) -> None:
        check_invariants(self.bm, self.seqs)
        assert [len(s.block_table) for s in self.seqs] == self.expected


BlockManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
