"""Turns a `SchedulerOutput` into flat tensors, runs the model, samples.

Below this line nothing knows about requests: the model sees token ids, positions, slot mapping,
block tables and context lengths for the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.layers.attention_metadata import AttentionMetadata
from lowbit.runtime.sampler import Sampler, SampleRequest, SamplerOutput
from lowbit.runtime.scheduler import SchedulerOutput


@dataclass(frozen=True, eq=False)
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the step whose next token is sampled


def prepare_inputs(
    batch: SchedulerOutput, block_size: int, device: torch.device, all_logits: bool = False
) -> ModelInputs:
    """Flat step tensors. `all_logits` asks for logits at every position (scoring), not only at
    the last token of the sequences that sample."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    logits_indices: list[int] = []
    for item in batch.scheduled:
        table = item.seq.block_table
        span = range(item.start, item.start + item.num_tokens)
        input_ids.extend(item.token_ids)
        positions.extend(span)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
        query_start.append(query_start[-1] + item.num_tokens)
        context_lens.append(span.stop)
        if all_logits:
            logits_indices.extend(range(query_start[-2], query_start[-1]))
        elif item.samples:
            logits_indices.append(query_start[-1] - 1)
    width = max(len(item.seq.block_table) for item in batch.scheduled)
    tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch.scheduled]

    def tensor(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=tensor(slots),
        block_tables=tensor(tables, torch.int32),
        context_lens=tensor(context_lens, torch.int32),
        query_start=tuple(query_start),
        context_lens_host=tuple(context_lens),
        num_prefills=batch.num_prefills,
        has_padding=False,
    )
    return ModelInputs(tensor(input_ids), tensor(positions), meta, tensor(logits_indices))


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[LayerKVCache],
        block_size: int,
        device: torch.device,
        seed: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)

    @torch.inference_mode()
    def compute_logits(self, batch: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        """fp32 [S, vocab] for the sequences of `batch` that reach their last token (or for every
        scheduled token with `all_logits`)."""
        inputs = prepare_inputs(batch, self.block_size, self.device, all_logits)
        return self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, inputs.logits_indices
        )

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> SamplerOutput:
        """One step: forward for every scheduled token, then one sample per sequence that samples."""
        logits = self.compute_logits(batch)
        rows = [
            SampleRequest(s.seq.params, s.seq.prompt_token_ids, s.seq.output_token_ids, s.seq.generator)
            for s in batch.scheduled
            if s.samples
        ]
        return self.sampler(logits, rows)
