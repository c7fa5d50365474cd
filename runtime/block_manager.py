"""KV block accounting: which physical blocks each sequence owns, and which full blocks can be
reused by a later sequence with the same prefix. Pure bookkeeping, no tensors.

Prefix caching: once every slot of a block is computed, the block is named by a hash of its
parent's hash and its token ids, so equal prefixes hash equally whatever comes after them. A
free block keeps its name and contents until it is handed out again; free blocks are handed out
least recently freed first, and a sequence frees its blocks tail first, so the shared beginning
of a prompt is the last thing evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from lowbit.runtime.sequence import Sequence


def block_hash(parent: bytes, token_ids: Seq[int]) -> bytes:
    """sha256 over the parent's hash and this block's tokens: collision-free in practice, unlike
    Python's 64-bit hash, and it costs ~1 µs per 16-token block."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # tokens looked up at admission (a returning preempted sequence: its output too)
    hit_tokens: int = 0  # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included: they are reusable."""
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    # ------------------------------------------------------------------ growing and freeing

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total; the caller checked `can_grow`."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"KV pool exhausted: need {missing} blocks, {self.num_free_blocks} free")
        seq.block_table.extend(self._take_free() for _ in range(missing))

    def _take_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        self._forget(block)
        self.ref_counts[block] = 1
        return block

    def _forget(self, block: int) -> None:
        name = self.hashes[block]
        if name is not None and self.cached.get(name) == block:
            del self.cached[name]
        self.hashes[block] = None

    def _share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first, and reset it to "nothing computed"."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let an empty `child` share `parent`'s first `num_blocks` blocks, which must be full and
        computed: shared blocks are never written again, so no copy-on-write is needed."""
        if child.block_table:
            raise ValueError("fork needs a child that holds no blocks")
        if num_blocks * self.block_size > parent.num_computed_tokens:
            raise ValueError(
                f"fork of {num_blocks} blocks, but only {parent.num_computed_tokens} tokens computed"
            )
        for block in parent.block_table[:num_blocks]:
            self._share(block)
        child.block_table = parent.block_table[:num_blocks]
        child.block_hashes = parent.block_hashes[:num_blocks]
        child.num_computed_tokens = num_blocks * self.block_size

    # ------------------------------------------------------------------ prefix cache

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding a prefix of `seq`'s tokens. The last token is never served from
        the cache: it has to run through the model to produce the next token's logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        tokens = seq.token_ids
        blocks: list[int] = []
        parent = b""
        for start in range(0, (len(tokens) - 1) // self.block_size * self.block_size, self.block_size):
            parent = block_hash(parent, tokens[start : start + self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int, prefix: list[int]) -> int:
        """Free blocks that admitting `seq` with `prefix` and room for `num_tokens` would use up."""
        reused_free = sum(1 for b in prefix if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(prefix) + reused_free

    def use_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        """Take the cached blocks found by `cached_prefix`; they count as computed."""
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += len(prefix) * self.block_size
        for block in prefix:
            self._share(block)
        seq.block_table = list(prefix)
        seq.block_hashes = [self.hashes[b] for b in prefix]
        seq.num_computed_tokens = len(prefix) * self.block_size

    def reset_prefix_cache(self) -> None:
        """Forget the names of free blocks (vLLM's `reset_prefix_cache`): later requests compute
        those prefixes again. Blocks that sequences hold keep theirs."""
        for block in self.free_blocks:
            self._forget(block)

    def commit(self, seq: Sequence) -> None:
        """Name the blocks that this step filled, so later sequences can find them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if len(seq.block_hashes) >= full:
            return
        tokens = seq.token_ids
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            name = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(name)
            block = seq.block_table[i]
            if name not in self.cached and self.hashes[block] is None:
                self.cached[name] = block
                self.hashes[block] = name
