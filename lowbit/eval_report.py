"""`lowbit eval`: perplexity and memory per quantization scheme, one table with deltas against
the reference (the source model, dequantized, fp KV cache)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowbit.loaders import load_checkpoint
from lowbit.loaders.base import Checkpoint
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine
from lowbit.runtime.evaluate import EvalResult, evaluate
from lowbit.runtime.quant.pipeline import QuantizeOptions, quantize_model


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
                f"gptq-w4-g{group_size}-act-order", QuantizeOptions("gptq", **w4, act_order=True, **calib)
            ),
            Scheme(f"awq-w4-g{group_size}", QuantizeOptions("awq", **w4, **calib)),
            Scheme("smoothquant-w8a8", QuantizeOptions("smoothquant", bits=8, activations=8, **calib)),
            Scheme("rtn-w8a8", QuantizeOptions("rtn", bits=8, activations=8)),
            Scheme("int8-kv", kv_cache_dtype="int8"),
        )
    }


def run(
    model: str | None,
    chosen: list[Scheme],
    token_ids_for: Callable[[Engine], list[int]],
    window: int,
    num_windows: int,
    dtype: str,
    on_result: Callable[[EvalResult], None] = lambda r: None,
) -> list[EvalResult]:
    from lowbit.default_model import default_model_path

    source = load_checkpoint(model or default_model_path())
    results = []
    for scheme in chosen:
        checkpoint: Checkpoint = quantize_model(source, scheme.options) if scheme.options else source
        engine = Engine(
            EngineConfig(dtype=dtype, kv_cache_dtype=scheme.kv_cache_dtype, kv_cache_memory=256 << 20),
            checkpoint=checkpoint,
        )
        result = evaluate(engine, scheme.name, token_ids_for(engine), window, num_windows)
        results.append(result)
        on_result(result)
        del engine
    return results
