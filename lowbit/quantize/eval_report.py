"""`lowbit eval`: perplexity and memory per quantization scheme, one table with deltas against
the reference (the source model, dequantized, fp KV cache)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowbit.loaders.base import Checkpoint
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine
from lowbit.runtime.models.config import ModelConfig

from .evaluate import EvalResult, perplexity, weights_bytes
from .pipeline import QuantizeOptions, fitting_group_sizes, quantize_model


@dataclass(frozen=True)
class Scheme:
    name: str
    options: QuantizeOptions | None = None  # None: the checkpoint as loaded
    kv_cache_dtype: str = "auto"


def schemes(group_size: int, num_samples: int, seq_len: int) -> dict[str, Scheme]:
    calib = {"num_samples": num_samples, "seq_len": seq_len}
    w4 = {"bits": 4, "group_size": group_size}
    return {
        s.name: s
        for s in (
            Scheme("reference"),
            Scheme(f"rtn-w4-g{group_size}", QuantizeOptions("rtn", **w4)),
            Scheme(f"gptq-w4-g{group_size}", QuantizeOptions("gptq", **w4, **calib)),
            Scheme(
                f"gptq-w4-g{group_size}-desc-act", QuantizeOptions("gptq", **w4, act_order="group", **calib)
            ),
            Scheme(f"awq-w4-g{group_size}", QuantizeOptions("awq", **w4, **calib)),
            Scheme("smoothquant-w8a8", QuantizeOptions("smoothquant", bits=8, activations=8, **calib)),
            Scheme("rtn-w8a8", QuantizeOptions("rtn", bits=8, activations=8)),
            Scheme("int8-kv", kv_cache_dtype="int8"),
        )
    }


def run(
    source: Checkpoint,
    chosen: list[Scheme],
    token_ids_for: Callable[[Engine], list[int]],
    window: int,
    num_windows: int,
    dtype: str,
    on_result: Callable[[EvalResult], None] = lambda r: None,
) -> list[EvalResult]:
    results = []
    for scheme in chosen:
        checkpoint: Checkpoint = quantize_model(source, scheme.options) if scheme.options else source
        engine = _engine(checkpoint, dtype, scheme.kv_cache_dtype)
        ppl, tokens = perplexity(engine, token_ids_for(engine), window, num_windows)
        del engine
        # Memory is what serving the scheme costs: the default (packed) engine, not the float32 one
        # that may hold dequantized copies to isolate quantization error.
        served = _engine(checkpoint, "auto", scheme.kv_cache_dtype)
        kv_per_1k = served.kv_spec.bytes_per_token() * 1000
        result = EvalResult(scheme.name, ppl, tokens, weights_bytes(served), kv_per_1k)
        del served
        results.append(result)
        on_result(result)
    return results


def _engine(checkpoint: Checkpoint, dtype: str, kv_cache_dtype: str) -> Engine:
    config = EngineConfig(dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=256 << 20)
    return Engine(config, checkpoint=checkpoint)


def fitting_group_size(config: ModelConfig, preferred: int = 128) -> int:
    """The largest power-of-two group size in [32, `preferred`] dividing every projection's input
    (SmolLM2's hidden size 576 takes 64, not the usual 128); -1 (per channel) if none does."""
    return next((g for g in fitting_group_sizes(config) if 32 <= g <= preferred), -1)
