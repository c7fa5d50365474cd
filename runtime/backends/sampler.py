"""Sampler backends: the row-wise argmax over fp32 host logits that picks greedy tokens and decides
the exponential race of sampled ones (argmax p / E).

One is chosen per engine, first of `SAMPLER_BACKENDS` that can run: `compiled-cpu` (argmax_rows in
kernels/cpu/decode_layer.cpp: two AVX-512 passes, ~6 us over a 49k vocabulary on 2 threads against
torch's ~90 us) or `torch` (torch.argmax, the reference). Both return the first maximum of each
row, a NaN counting as the maximum. The sampler always runs on the host (it moves logits there
first), so the choice does not depend on the engine's device.
"""

from __future__ import annotations

import torch

from lowbit.kernels.cpu import extension

from .base import Backend


class SamplerBackend(Backend):
    @classmethod
    def can_implement(cls) -> str | None:
        return None

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """logits fp32 [R, V] on the host -> int64 [R]: the first maximum of each row."""
        raise NotImplementedError


class CompiledCPUSampler(SamplerBackend):
    name = "compiled-cpu"

    @classmethod
    def can_implement(cls):
        return None if extension.load() is not None else "compiled CPU ops unavailable"

    def __init__(self) -> None:
        self.argmax = extension.load().argmax_rows  # called with no Python frame between


class TorchSampler(SamplerBackend):
    name = "torch"

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


# In order of preference: the first that can run is the engine's.
SAMPLER_BACKENDS: tuple[type[SamplerBackend], ...] = (CompiledCPUSampler, TorchSampler)
