"""BlockManager bookkeeping: block counts, grow/free, exhaustion, the prefix cache (content-chain
names, lookup, LRU eviction of free cached blocks), fork, and invariants under random use.

The manager only touches a sequence's tokens, `block_table`, `block_hashes` and
`num_computed_tokens`, so the sequences here are real `Sequence` objects without a detokenizer.
"Computing" tokens is played by the tests: they set `num_computed_tokens` and call `commit`, the
way the engine does after a step."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lowbit.runtime.block_manager import BlockManager, block_hash
from lowbit.runtime.sampling_params import SamplingParams
from lowbit.runtime.sequence import Sequence


def make_seq(tokens: int | list[int] = 1, request_id: str = "r") -> Sequence:
    prompt = list(range(tokens)) if isinstance(tokens, int) else list(tokens)
    return Sequence(request_id, 0, prompt, SamplingParams(), None, 16)  # type: ignore[arg-type]


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Make room for and "compute" the first `num_tokens` tokens, then commit as the engine does."""
    bm.grow(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.commit(seq)


def chain(tokens: list[int], block_size: int) -> list[bytes]:
    """The expected names of the full blocks of `tokens`: each hashes its parent's name."""
    names: list[bytes] = []
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        names.append(block_hash(names[-1] if names else b"", tokens[start : start + block_size]))
    return names


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    held = [b for s in seqs for b in s.block_table]
    free = list(bm.free_blocks)
    for seq in seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), "a sequence holds a block twice"
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == held.count(b), f"block {b}: ref count != number of holders"
        assert (b in bm.free_blocks) == (bm.ref_counts[b] == 0)
    assert len(free) + len(set(held)) == bm.num_blocks
    assert bm.num_free_blocks == len(free)
    for name, b in bm.cached.items():
        assert bm.hashes[b] == name
    assert sum(h is not None for h in bm.hashes) == len(bm.cached)


# ---------------------------------------------------------------------------- counting and growing


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
    a, b = make_seq(8), make_seq(6)
    bm.grow(a, 7)
    bm.grow(b, 5)
    a.num_computed_tokens = 7
    bm.commit(a)
    assert len(a.block_hashes) == 3
    bm.free(a)
    assert a.block_table == [] and a.block_hashes == []
    assert a.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 - 3
    check_invariants(bm, [a, b])
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.ref_counts == [0] * 8
    check_invariants(bm, [a, b])


def test_freed_blocks_can_all_be_taken_again() -> None:
    bm = BlockManager(6, 4)
    a = make_seq(24)
    compute(bm, a, 24)  # every block named: cached blocks are still reusable space
    bm.free(a)
    b = make_seq()
    assert bm.can_grow(b, 24)
    bm.grow(b, 24)
    assert sorted(b.block_table) == list(range(6))
    assert bm.cached == {} and bm.hashes == [None] * 6  # all evicted
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


# ---------------------------------------------------------------------------- naming (commit)


def test_block_hash_depends_on_the_parent_and_every_token_in_order() -> None:
    base = block_hash(b"", [1, 2, 3, 4])
    assert base == block_hash(b"", [1, 2, 3, 4])
    assert len({base, block_hash(b"", [1, 2, 3, 5]), block_hash(b"", [2, 1, 3, 4])}) == 3
    assert block_hash(base, [1, 2, 3, 4]) != base
    assert block_hash(base, [1, 2, 3, 4]) != block_hash(block_hash(b"", [9]), [1, 2, 3, 4])
    # Large ids are not truncated.
    assert block_hash(b"", [1 << 40]) != block_hash(b"", [0])


def test_commit_names_only_full_computed_blocks() -> None:
    bm = BlockManager(8, 4)
    tokens = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    seq = make_seq(tokens)
    bm.grow(seq, 10)  # 3 blocks, the last one 2/4 full
    names = chain(tokens, 4)  # 2 full blocks
    for computed, expected in [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (10, 2)]:
        seq.num_computed_tokens = computed
        bm.commit(seq)
        assert seq.block_hashes == names[:expected]
        assert bm.cached == {names[i]: seq.block_table[i] for i in range(expected)}
        assert [bm.hashes[b] for b in seq.block_table] == [*names[:expected], *[None] * (3 - expected)]
    # Output tokens count as well once they fill a block.
    for t in (11, 12):
        seq.append(t)
    bm.grow(seq, 12)
    seq.num_computed_tokens = 12
    bm.commit(seq)
    assert seq.block_hashes == chain([*tokens, 11, 12], 4)
    assert bm.cached[seq.block_hashes[2]] == seq.block_table[2]
    check_invariants(bm, [seq])


def test_equal_content_computed_twice_keeps_the_first_name() -> None:
    bm = BlockManager(8, 2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    compute(bm, a, 3)
    compute(bm, b, 3)  # computed independently (no lookup): its block is a duplicate
    assert a.block_hashes == b.block_hashes == chain([1, 2, 3], 2)
    assert bm.cached == {a.block_hashes[0]: a.block_table[0]}
    assert bm.hashes[b.block_table[0]] is None
    check_invariants(bm, [a, b])


# ---------------------------------------------------------------------------- prefix lookup


@pytest.mark.parametrize("length", [1, 4, 5, 8, 9, 12, 13, 14, 15, 20])
def test_cached_prefix_serves_full_blocks_but_never_the_last_token(length: int) -> None:
    bm = BlockManager(16, 4)
    tokens = [100 + i for i in range(20)]
    a = make_seq(tokens[:14])
    compute(bm, a, 14)  # 3 full named blocks, the 4th holds 2 tokens
    b = make_seq(tokens[:length])
    # Full blocks of b that do not hold b's last token, and that a has computed.
    expected = min(3, (length - 1) // 4)
    prefix = bm.cached_prefix(b)
    assert prefix == a.block_table[:expected]
    free_before = bm.num_free_blocks
    bm.use_prefix(b, prefix)
    assert b.block_table == a.block_table[:expected]
    assert b.num_computed_tokens == 4 * expected
    assert b.block_hashes == a.block_hashes[:expected]
    assert bm.num_free_blocks == free_before  # the blocks were held by a: nothing taken
    assert all(bm.ref_counts[blk] == 2 for blk in prefix)
    check_invariants(bm, [a, b])


@pytest.mark.parametrize("position", [0, 3, 4, 7, 8, 11])
def test_a_different_token_stops_the_chain_at_its_block(position: int) -> None:
    bm = BlockManager(16, 4)
    tokens = list(range(50, 66))  # 4 full blocks
    a = make_seq(tokens)
    compute(bm, a, 16)
    changed = [*tokens, 1]
    changed[position] = 999
    b = make_seq(changed)
    assert bm.cached_prefix(b) == a.block_table[: position // 4]
    same = make_seq([*tokens, 1])
    assert bm.cached_prefix(same) == a.block_table  # the control: all 4 match


def test_equal_blocks_after_different_parents_do_not_match() -> None:
    bm = BlockManager(16, 2)
    a = make_seq([1, 2, 5, 6, 0])
    compute(bm, a, 5)  # blocks [1, 2] and [5, 6] named
    # Same second block after another first block: a content-chain name differs.
    assert bm.cached_prefix(make_seq([3, 4, 5, 6, 0])) == []
    # a's second block's tokens at the start of a sequence: no parent, another name.
    assert bm.cached_prefix(make_seq([5, 6, 0])) == []
    assert bm.cached_prefix(make_seq([1, 2, 5, 6, 0])) == a.block_table[:2]


def test_a_missing_link_ends_the_chain_even_if_later_blocks_are_cached() -> None:
    bm = BlockManager(6, 2)
    a = make_seq([1, 2, 9])
    compute(bm, a, 3)  # block 0 named [1, 2]
    b = make_seq([1, 2, 3, 4, 5])
    compute(bm, b, 5)  # computed without a lookup: its [1, 2] is a duplicate, [3, 4] gets named
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3, 4])
    names = chain([1, 2, 3, 4, 5], 2)
    assert bm.cached == {names[0]: 0, names[1]: 3}
    bm.free(a)
    bm.grow(make_seq(), 6)  # takes 5, 1, 0: the first link is evicted
    assert names[0] not in bm.cached and bm.cached[names[1]] == 3
    # Block 3 holds tokens 2..3 of the chain: it must not be served as a first block.
    assert bm.cached_prefix(make_seq([1, 2, 3, 4, 5])) == []


def test_a_sequence_that_holds_blocks_gets_no_prefix() -> None:
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    b = make_seq([1, 2, 3, 4, 5])
    bm.grow(b, 1)
    assert bm.cached_prefix(b) == []


def test_blocks_needed_counts_cached_blocks_that_are_free() -> None:
    bm = BlockManager(10, 4)
    a = make_seq(list(range(12)))
    compute(bm, a, 12)
    b = make_seq(list(range(13)))
    prefix = bm.cached_prefix(b)
    assert prefix == a.block_table
    # Held by a: taking them costs nothing; the 13th..20th tokens need 2 new blocks.
    assert bm.blocks_needed(b, 20, prefix) == 2
    bm.free(a)
    prefix = bm.cached_prefix(b)
    assert len(prefix) == 3
    # Free now: the 3 cached blocks leave the free list as well.
    assert bm.blocks_needed(b, 20, prefix) == 5
    bm.use_prefix(b, prefix)
    bm.grow(b, 20)
    assert bm.num_free_blocks == 10 - 5
    assert b.block_table[:3] == prefix
    check_invariants(bm, [a, b])


def test_hit_rate_counts_queried_and_hit_prompt_tokens() -> None:
    bm = BlockManager(16, 4)
    assert bm.stats.hit_rate == 0.0
    a = make_seq(list(range(10)))
    bm.use_prefix(a, bm.cached_prefix(a))  # nothing cached yet
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (10, 0)
    compute(bm, a, 10)
    b = make_seq(list(range(14)))
    bm.use_prefix(b, bm.cached_prefix(b))  # a's 2 full blocks
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (24, 8)
    assert bm.stats.hit_rate == pytest.approx(8 / 24)


def test_disabled_prefix_caching_never_names_or_matches() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)
    assert a.block_hashes == [] and bm.cached == {} and bm.hashes == [None] * 8
    b = make_seq([1, 2, 3, 4, 5])
    assert bm.cached_prefix(b) == []
    bm.free(a)
    assert bm.cached_prefix(b) == []
    bm.use_prefix(b, [])
    assert b.num_computed_tokens == 0 and bm.stats.hit_tokens == 0


# ---------------------------------------------------------------------------- LRU eviction


def test_free_cached_blocks_survive_until_needed_least_recently_freed_first() -> None:
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5, 6])  # 3 full blocks
    b = make_seq([7, 8, 9, 10, 11, 12])
    compute(bm, a, 6)
    compute(bm, b, 6)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    bm.free(a)
    bm.free(b)
    # Unnamed blocks first (never used), then each sequence's blocks tail first, a before b.
    assert list(bm.free_blocks) == [6, 7, 2, 1, 0, 5, 4, 3]
    a2, b2 = make_seq([1, 2, 3, 4, 5, 6, 0]), make_seq([7, 8, 9, 10, 11, 12, 0])
    assert bm.cached_prefix(a2) == [0, 1, 2]  # free, but still cached
    assert bm.cached_prefix(b2) == [3, 4, 5]
    other = make_seq([50] * 16)
    expected_a = {2: [0, 1, 2], 3: [0, 1], 4: [0], 5: [], 6: [], 7: []}
    for blocks, a_prefix in expected_a.items():
        bm.grow(other, 2 * blocks)
        assert bm.cached_prefix(a2) == a_prefix
    # Evictions went 6, 7, 2, 1, 0, 5, 4: only b's first block is left.
    assert other.block_table == [6, 7, 2, 1, 0, 5, 4]
    assert bm.cached_prefix(b2) == [3]
    assert bm.cached == {chain(b2.token_ids, 2)[0]: 3}
    assert [bm.hashes[blk] for blk in (0, 1, 2, 4, 5, 6, 7)] == [None] * 7
    check_invariants(bm, [a, b, other])


def test_reusing_a_cached_block_makes_it_recently_used() -> None:
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3])
    b = make_seq([4, 5, 6])
    compute(bm, a, 3)  # blocks 0, 1
    compute(bm, b, 3)  # blocks 2, 3
    bm.free(a)  # free: 1 (partial, unnamed), 0 (named)
    bm.free(b)  # then 3, 2 (named)
    assert list(bm.free_blocks) == [1, 0, 3, 2]
    a2 = make_seq([1, 2, 3])
    prefix = bm.cached_prefix(a2)
    assert prefix == [0]
    bm.use_prefix(a2, prefix)
    bm.grow(a2, 3)  # takes 1
    bm.free(a2)  # 1 then 0 go to the back
    assert list(bm.free_blocks) == [3, 2, 1, 0]
    other = make_seq()
    bm.grow(other, 4)  # takes 3 (b's partial block) and 2: b's prefix is evicted, a's is kept
    assert bm.cached_prefix(make_seq([4, 5, 6])) == []
    assert bm.cached_prefix(make_seq([1, 2, 3])) == [0]


# ---------------------------------------------------------------------------- fork


def test_fork_shares_full_computed_blocks_and_frees_at_the_last_release() -> None:
    bm = BlockManager(8, 4)
    parent = make_seq(list(range(10)))
    compute(bm, parent, 10)  # 3 blocks, 2 full
    child = make_seq(list(range(10)))
    bm.fork(parent, child, 2)
    assert child.block_table == parent.block_table[:2]
    assert child.block_hashes == parent.block_hashes[:2]
    assert child.num_computed_tokens == 8
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 5  # nothing new taken
    bm.grow(child, 10)  # the child writes its own third block
    assert child.block_table[2] != parent.block_table[2]
    check_invariants(bm, [parent, child])
    shared, own = parent.block_table[:2], parent.block_table[2]
    bm.free(parent)
    assert own in bm.free_blocks
    assert all(bm.ref_counts[b] == 1 and b not in bm.free_blocks for b in shared)
    assert bm.num_free_blocks == 5
    check_invariants(bm, [parent, child])
    bm.free(child)
    assert bm.num_free_blocks == 8 and bm.ref_counts == [0] * 8
    check_invariants(bm, [parent, child])


def test_fork_freeing_the_child_first_keeps_the_parent_blocks() -> None:
    bm = BlockManager(4, 2)
    parent = make_seq([1, 2, 3, 4, 5])
    compute(bm, parent, 5)
    child = make_seq([1, 2, 3, 4, 5])
    bm.fork(parent, child, 2)
    bm.free(child)
    assert [bm.ref_counts[b] for b in parent.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 1
    check_invariants(bm, [parent, child])


def test_fork_of_more_blocks_than_computed_raises() -> None:
    bm = BlockManager(8, 4)
    parent = make_seq(list(range(10)))
    bm.grow(parent, 10)
    parent.num_computed_tokens = 7  # only the first block is fully computed
    bm.commit(parent)
    child = make_seq(list(range(10)))
    with pytest.raises(ValueError):
        bm.fork(parent, child, 2)
    assert child.block_table == [] and child.num_computed_tokens == 0
    assert bm.ref_counts[parent.block_table[1]] == 1
    bm.fork(parent, child, 1)
    with pytest.raises(ValueError):  # the child already holds blocks
        bm.fork(parent, child, 1)
    assert bm.ref_counts[parent.block_table[0]] == 2
    check_invariants(bm, [parent, child])


def test_a_forked_block_is_found_by_the_prefix_cache_while_shared() -> None:
    bm = BlockManager(8, 2)
    parent = make_seq([1, 2, 3, 4, 5])
    compute(bm, parent, 5)
    child = make_seq([1, 2, 3, 4, 5])
    bm.fork(parent, child, 2)
    third = make_seq([1, 2, 3, 4, 9])
    prefix = bm.cached_prefix(third)
    assert prefix == parent.block_table[:2]
    assert bm.blocks_needed(third, 5, prefix) == 1
    bm.use_prefix(third, prefix)
    assert [bm.ref_counts[b] for b in prefix] == [3, 3]
    check_invariants(bm, [parent, child, third])


# ---------------------------------------------------------------------------- random use

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # few distinct tokens: many hits


class BlockManagerMachine(RuleBasedStateMachine):
    """Random grow / compute+commit / fork / free / prefix reuse over a few sequences. A fake KV pool
    records what was written to each slot, so cached and shared blocks can be checked against the
    tokens they must hold; table sizes, free-list order and stats are tracked independently."""

    @initialize(
        num_blocks=st.integers(2, 10),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.booleans(),
        prompts=st.lists(TOKENS, min_size=4, max_size=4),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool, prompts: list[list[int]]) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.bs = block_size
        self.caching = caching
        self.seqs = [make_seq(p, request_id=str(i)) for i, p in enumerate(prompts)]
        self.pool: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.expected_len = [0] * 4
        self.queried = self.hit = 0

    def _held(self) -> set[int]:
        return {b for s in self.seqs for b in s.block_table}

    def _free_slot(self, i: int) -> None:
        seq = self.seqs[i]
        before = list(self.bm.free_blocks)
        holders = [b for s in self.seqs for b in s.block_table]
        released = [b for b in reversed(seq.block_table) if holders.count(b) == 1]
        self.bm.free(seq)
        # Released blocks join the back of the free list, the sequence's tail first.
        assert list(self.bm.free_blocks) == before + released
        assert seq.block_table == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0
        self.expected_len[i] = 0

    def _source(self, i: int, j: int) -> Sequence:
        """The j-th most computed sequence other than slot i: prefixes worth sharing."""
        others = sorted((s for k, s in enumerate(self.seqs) if k != i), key=lambda s: -s.num_computed_tokens)
        return others[j]

    def _replace(self, i: int, tokens: list[int]) -> Sequence:
        self._free_slot(i)
        self.seqs[i] = make_seq(tokens, request_id=str(i))
        return self.seqs[i]

    def _grow(self, i: int, target: int) -> bool:
        """Grow slot i to `target` tokens if the pool allows (checked independently)."""
        seq = self.seqs[i]
        missing = max(0, math.ceil(target / self.bs) - self.expected_len[i])
        free_before = list(self.bm.free_blocks)
        fits = missing <= self.bm.num_blocks - len(self._held())
        assert self.bm.can_grow(seq, target) == fits
        old = list(seq.block_table)
        if not fits:
            with pytest.raises(RuntimeError):
                self.bm.grow(seq, target)
            assert seq.block_table == old
            return False
        names = {b: self.bm.hashes[b] for b in free_before[:missing]}
        self.bm.grow(seq, target)
        self.expected_len[i] += missing
        # Least recently freed first; a taken block loses its name.
        assert seq.block_table == old + free_before[:missing]
        for b, name in names.items():
            assert self.bm.hashes[b] is None
            if name is not None:
                assert name not in self.bm.cached
        return True

    @rule(i=st.integers(0, 3), extra=st.integers(0, 8))
    def grow(self, i: int, extra: int) -> None:
        self._grow(i, self.seqs[i].num_computed_tokens + extra)

    @rule(i=st.integers(0, 3), count=st.integers(1, 12))
    def compute(self, i: int, count: int) -> None:
        self._compute(i, count)

    def _compute(self, i: int, count: int) -> None:
        """Mark up to `count` more tokens computed (growing first when the pool allows) and commit."""
        seq = self.seqs[i]
        start = seq.num_computed_tokens
        stop = min(start + count, seq.num_tokens)
        if len(seq.block_table) * self.bs < stop and not self._grow(i, stop):
            stop = min(stop, len(seq.block_table) * self.bs)
        tokens = seq.token_ids
        for p in range(start, stop):
            block = seq.block_table[p // self.bs]
            # Only a block this sequence alone holds, and nobody can look up, is ever written.
            assert self.bm.ref_counts[block] == 1
            assert self.bm.hashes[block] is None
            self.pool[block][p % self.bs] = tokens[p]
        seq.num_computed_tokens = stop
        self.bm.commit(seq)
        expected = chain(tokens, self.bs)[: stop // self.bs] if self.caching else []
        assert seq.block_hashes == expected

    @rule(i=st.integers(0, 3), token=st.integers(0, 2))
    def append(self, i: int, token: int) -> None:
        self.seqs[i].append(token)

    @rule(i=st.integers(0, 3))
    def free(self, i: int) -> None:
        self._free_slot(i)

    @rule(i=st.integers(0, 3), j=st.integers(0, 2), fewer=st.integers(0, 2), over=st.booleans(), extra=TOKENS)
    def fork(self, i: int, j: int, fewer: int, over: bool, extra: list[int]) -> None:
        parent = self._source(i, j)
        # Up to all of the parent's full computed blocks, or one too many.
        num_blocks = max(0, parent.num_computed_tokens // self.bs - fewer) + over
        # The child's prompt starts with the parent's tokens up to the shared blocks at least.
        child = self._replace(i, parent.token_ids[: num_blocks * self.bs] + extra)
        if num_blocks * self.bs > parent.num_computed_tokens:
            with pytest.raises(ValueError):
                self.bm.fork(parent, child, num_blocks)
            assert child.block_table == [] and child.num_computed_tokens == 0
            return
        refs = list(self.bm.ref_counts)
        free_before = self.bm.num_free_blocks
        self.bm.fork(parent, child, num_blocks)
        assert child.block_table == parent.block_table[:num_blocks]
        assert child.num_computed_tokens == num_blocks * self.bs
        assert self.bm.num_free_blocks == free_before
        for b in child.block_table:
            assert self.bm.ref_counts[b] == refs[b] + 1
        self.expected_len[i] = num_blocks

    @rule(
        i=st.integers(0, 3),
        j=st.integers(0, 2),
        keep=st.integers(0, 14),
        extra=st.lists(st.integers(0, 2), max_size=6),  # none: a copy of (the start of) j
        more=st.integers(0, 6),
    )
    def reuse(self, i: int, j: int, keep: int, extra: list[int], more: int) -> None:
        """A new sequence in slot i (often starting like slot j's) takes what the cache has."""
        seq = self._replace(i, self._source(i, j).token_ids[:keep] + extra or [0])
        tokens = seq.token_ids
        prefix = self.bm.cached_prefix(seq)
        names = chain(tokens, self.bs)
        usable = (len(tokens) - 1) // self.bs
        if not self.caching:
            assert prefix == []
        assert len(prefix) <= usable
        for k, b in enumerate(prefix):
            assert self.bm.cached[names[k]] == b
            assert self.pool[b] == tokens[k * self.bs : (k + 1) * self.bs]  # real content
        if len(prefix) < usable:
            assert names[len(prefix)] not in self.bm.cached  # the longest match
        target = len(prefix) * self.bs + more
        refs = list(self.bm.ref_counts)
        # New blocks beyond the prefix, plus the prefix blocks that have to leave the free list.
        new = max(0, math.ceil(target / self.bs) - len(prefix))
        needed = new + sum(refs[b] == 0 for b in prefix)
        assert self.bm.blocks_needed(seq, target, prefix) == needed
        if needed > self.bm.num_free_blocks:
            return
        free_before = self.bm.num_free_blocks
        self.bm.use_prefix(seq, prefix)
        self.bm.grow(seq, target)
        self.queried += len(tokens)
        self.hit += len(prefix) * self.bs
        assert seq.block_table[: len(prefix)] == prefix
        assert seq.num_computed_tokens == len(prefix) * self.bs
        assert self.bm.num_free_blocks == free_before - needed
        for b in prefix:
            assert self.bm.ref_counts[b] == refs[b] + 1
        self.expected_len[i] = len(seq.block_table)
        assert len(seq.block_table) == max(len(prefix), math.ceil(target / self.bs))
        self._compute(i, more)  # admitted: compute (some of) the rest

    @invariant()
    def consistent(self) -> None:
        check_invariants(self.bm, self.seqs)
        assert [len(s.block_table) for s in self.seqs] == self.expected_len
        if not self.caching:
            assert self.bm.cached == {}
        for seq in self.seqs:
            tokens = seq.token_ids
            # The fake cache holds the sequence's computed tokens.
            for p in range(seq.num_computed_tokens):
                assert self.pool[seq.block_table[p // self.bs]][p % self.bs] == tokens[p]
            names = chain(tokens, self.bs)
            for k, b in enumerate(seq.block_table):
                name = self.bm.hashes[b]
                if name is not None and self.bm.cached.get(name) == b:
                    assert (k + 1) * self.bs <= seq.num_computed_tokens  # never written again
                    assert name == names[k]
        # Every named block holds real tokens, free or not.
        for b in self.bm.cached.values():
            assert None not in self.pool[b]
        assert (self.bm.stats.queried_tokens, self.bm.stats.hit_tokens) == (self.queried, self.hit)


BlockManagerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_reset_prefix_cache_forgets_free_blocks_and_keeps_held_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    held, freed = make_seq(list(range(9)), "held"), make_seq(list(range(100, 109)), "freed")
    compute(bm, held, 9)
    compute(bm, freed, 9)
    bm.free(freed)
    assert len(bm.cached_prefix(make_seq(list(range(100, 109))))) == 2  # cached before the reset
    bm.reset_prefix_cache()
    assert bm.cached_prefix(make_seq(list(range(100, 109)))) == []
    assert bm.cached_prefix(make_seq(list(range(9)))) == held.block_table[:2]
    check_invariants(bm, [held])
