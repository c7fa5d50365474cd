"""Perplexity on fixed windows of text, and the memory a model takes: what `lowbit eval` reports."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.runtime.engine import Engine


@dataclass(frozen=True)
class EvalResult:
    name: str
    perplexity: float
    tokens: int  # tokens scored
    weights_bytes: int  # every weight as the engine holds it (packed where it is packed)
    kv_bytes_per_1k_tokens: int


def perplexity(engine: Engine, token_ids: list[int], window: int, num_windows: int) -> tuple[float, int]:
    """exp(mean NLL) over `num_windows` consecutive, non-overlapping windows of `window` tokens;
    each window is scored on its own (no context carried across windows)."""
    if len(token_ids) < window * num_windows:
        raise ValueError(f"text has {len(token_ids)} tokens, fewer than {num_windows} windows of {window}")
    total, count = 0.0, 0
    for start in range(0, window * num_windows, window):
        ids = token_ids[start : start + window]
        logprobs = engine.score(ids).log_softmax(dim=-1)[:-1]  # [window - 1, vocab]
        targets = torch.tensor(ids[1:])[:, None]
        total -= logprobs.gather(1, targets).sum().item()
        count += len(ids) - 1
    return math.exp(total / count), count


def weights_bytes(engine: Engine) -> int:
    """Bytes of every parameter, buffer and packed weight the model holds (rotary tables excluded)."""
    model = engine.model
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None:
            for t in packed.tensors.values():
                add(t)
        for t in getattr(module, "tensors", {}).values():  # quantized embedding tables
            add(t)
    for p in model.parameters():
        add(p)
    return total
