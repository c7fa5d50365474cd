"""KV block accounting: which physical blocks each sequence owns. Pure bookkeeping, no tensors."""

from __future__ import annotations

from collections import deque

from lowbit.runtime.sequence import Sequence


class BlockManager:
    """Fixed-size blocks of `block_size` token slots; a sequence's tokens fill its blocks in order.

    Ref counts are kept per block so that later sharing (prefix caching, forked sequences) can free
    a block only when its last user lets go.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total; the caller checked `can_grow`."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"KV pool exhausted: need {missing} blocks, {self.num_free_blocks} free")
        seq.block_table.extend(self._take() for _ in range(missing))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (most recent first, so they are reused last)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
