"""What paging hands attention for one step: slots, block tables, context lengths, query spans.

The runner builds one per step (runtime/model_runner.py) and every layer's attention backend reads
it (runtime/backends/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lowbit.kernels.paged_attention_ref import decode_padding_mask


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """Everything paging hands to attention for one step (built once, shared by all layers).

    Sequences [0, num_prefills) may have several query tokens and run the prefill path; the rest
    have exactly one query token each and run the batched decode path.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: cached tokens per sequence after this step
    query_start: tuple[int, ...]  # B + 1 host ints: sequence b owns tokens [qs[b], qs[b + 1])
    context_lens_host: tuple[int, ...]  # context_lens on the host
    num_prefills: int
    has_padding: bool = True  # slot_mapping may hold -1 (the engine's never does)

    @property
    def num_prefill_tokens(self) -> int:
        return self.query_start[self.num_prefills]

    @cached_property
    def query_start_tensor(self) -> torch.Tensor:
        """[B + 1] int32 on the device, for kernels that take a whole mixed batch in one launch."""
        return torch.tensor(self.query_start, dtype=torch.int32, device=self.slot_mapping.device)

    @cached_property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))

    @cached_property
    def decode_block_tables(self) -> torch.Tensor:
        """[B_decode, max_blocks] int64: indexing wants int64, so convert once per step, not per layer."""
        return self.block_tables[self.num_prefills :].long()

    @cached_property
    def _decode_masks(self) -> dict[tuple[int, int], torch.Tensor]:
        return {}

    def decode_mask(self, block_size: int, window: int = 0) -> torch.Tensor:
        """[B_decode, max_blocks * block_size] bool, True past each context (and before its sliding
        window); built once per step and window."""
        masks = self._decode_masks
        if (block_size, window) not in masks:
            length = self.block_tables.shape[1] * block_size
            lens = self.context_lens[self.num_prefills :]
            masks[block_size, window] = decode_padding_mask(lens, length, window)
        return masks[block_size, window]
