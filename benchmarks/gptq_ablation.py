"""GPTQ on the default model, varied one way at a time, scored like `lowbit eval` (wiki windows).

Why GPTQ without act-order does not beat RTN on SmolLM2 (docs/accuracy.md): is it the calibration
domain (calibrate on held-out wiki text instead of c4), or the attention-sink rows (leave the first
`--skip` tokens of every calibration window out of the Hessian)?

    python benchmarks/gptq_ablation.py --calibration wiki
    python benchmarks/gptq_ablation.py --skip 8
    python benchmarks/gptq_ablation.py --act-order group
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lowbit.loaders.default_model import default_model_path
from lowbit.loaders.registry import load_checkpoint
from lowbit.quantize import calibration, pipeline
from lowbit.quantize.evaluate import perplexity
from lowbit.quantize.pipeline import QuantizeOptions, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine

WINDOW, WINDOWS = 512, 8
HELD_OUT_WIKI = 200_000  # characters: calibration text starts well past the scored windows


def _skip_first_tokens(skip: int, seq_len: int) -> None:
    """Make GPTQ's Hessians ignore the first `skip` positions of every calibration window."""
    watch = calibration.watch_inputs

    @contextmanager
    def watch_skipping(modules, observe) -> Iterator[None]:
        def keep_later_rows(name, x):  # x [windows * seq_len, features]
            observe(name, x.reshape(-1, seq_len, x.shape[-1])[:, skip:].reshape(-1, x.shape[-1]))

        with watch(modules, keep_later_rows):
            yield

    pipeline.watch_inputs = watch_skipping


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration", choices=("c4", "wiki"), default="c4")
    parser.add_argument("--skip", type=int, default=0, help="calibration positions left out of the Hessian")
    parser.add_argument("--act-order", choices=("none", "weight", "group"), default="none")
    parser.add_argument(
        "--guard", action="store_true", help="the held-out check against RTN (off: as measured)"
    )
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()

    seq_len = 512
    if args.skip:
        _skip_first_tokens(args.skip, seq_len)
    wiki = standard_text("wiki")
    text = wiki[HELD_OUT_WIKI:] if args.calibration == "wiki" else None
    opts = QuantizeOptions("gptq", bits=4, group_size=args.group_size, num_samples=args.num_samples,
                           seq_len=seq_len, act_order=args.act_order, guard=args.guard)  # fmt: skip
    start = time.perf_counter()
    source = load_checkpoint(default_model_path())
    checkpoint = quantize_model(source, opts, calibration_text=text, progress=False)
    engine = Engine(EngineConfig(dtype="float32", kv_cache_memory=256 << 20), checkpoint=checkpoint)
    ids = engine.tokenizer.encode(wiki[: 12 * WINDOW * WINDOWS])
    ppl, _ = perplexity(engine, ids, WINDOW, WINDOWS)
    print(f"{vars(args)}: perplexity {ppl:.3f} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
