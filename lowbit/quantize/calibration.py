"""Layer-by-layer calibration over an HF transformers Llama: the vehicle GPTQ, AWQ and SmoothQuant
run on (as AutoGPTQ, AutoAWQ and llm-compressor do).

Only one decoder layer's inputs are held at a time: the calibration batch is embedded once, each
layer turns its inputs into the next layer's, and quantized layers produce those outputs with
their quantized weights, so every layer is calibrated on what it will really see.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from lowbit.loaders.tokenizer import Tokenizer


def calibration_samples(
    tokenizer: Tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """num_samples windows of seq_len tokens at random (seeded) offsets in `text`: [S, L]."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len + 1) for _ in range(num_samples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts])


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, samples: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering decoder layer 0 for each batch of samples, and per layer the
    keyword arguments (position embeddings, mask) the model passes it for that batch shape. Layers
    of different types (Gemma's sliding and full layers: their own masks and rotary tables) get
    different ones, so the forward runs on to the first layer of the last type."""
    layers = model.model.layers
    types = list(getattr(model.config, "layer_types", None) or [None] * len(layers))
    firsts = sorted({types.index(t) for t in types})  # the first layer of each type
    inputs: list[torch.Tensor] = []
    by_type: dict[Any, dict[str, Any]] = {}

    def catch(i: int):
        def hook(module, args, kw):
            if i == 0:
                inputs.append(args[0] if args else kw["hidden_states"])
            by_type[types[i]] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == firsts[-1]:
                raise _Stop

        return hook

    handles = [layers[i].register_forward_pre_hook(catch(i), with_kwargs=True) for i in firsts]
    try:
        for batch in samples.split(batch_size):
            with suppress(_Stop):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if len({t.shape for t in inputs}) != 1:
        raise ValueError("calibration batches must all have the same shape (num_samples % batch_size != 0?)")
    # No KV cache between calibration batches: a cache kept from one batch would let the next one
    # attend to it. transformers 5.24 passes it as `cache` (earlier: `past_key_values`), so drop
    # it by type, not by name.
    from transformers.cache_utils import Cache

    for kind, kwargs in by_type.items():
        kept = {k: v for k, v in kwargs.items() if k != "past_key_values" and not isinstance(v, Cache)}
        by_type[kind] = {**kept, "use_cache": False}
    return inputs, [by_type[t] for t in types]


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@contextmanager
def watch_inputs(
    modules: dict[str, nn.Module], observe: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call observe(name, x [tokens, in_features]) with every input each module sees meanwhile."""

    def hook(name):
        def fn(module, args):
            x = args[0]
            observe(name, x.reshape(-1, x.shape[-1]).float())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
