"""SmoothQuant W8A8 on the default model with alpha searched per layer (the default) against fixed
alphas and plain W8A8 RTN, scored like `lowbit eval` (wiki windows, float32 compute, our W8A8 path
with per-token int8 activations):

    python -P benchmarks/smoothquant_alpha.py --num-samples 64 --alpha 0.5 --alpha 0.8
"""

from __future__ import annotations

import argparse

from lowbit.loaders.default_model import default_model_path
from lowbit.loaders.registry import load_checkpoint
from lowbit.quantize.eval_report import Scheme, run
from lowbit.quantize.pipeline import QuantizeOptions
from lowbit.quantize.text_data import standard_text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--alpha", type=float, action="append", default=[])
    args = parser.parse_args()
    w8a8 = {"bits": 8, "activations": 8, "num_samples": args.num_samples, "seq_len": args.seq_len}
    chosen = [Scheme("reference"), Scheme("smoothquant searched", QuantizeOptions("smoothquant", **w8a8))]
    chosen += [
        Scheme(f"smoothquant alpha {a}", QuantizeOptions("smoothquant", alpha=a, **w8a8)) for a in args.alpha
    ]
    chosen += [Scheme("rtn-w8a8", QuantizeOptions("rtn", bits=8, activations=8))]
    wiki = standard_text("wiki")
    reference: list[float] = []

    def show(result) -> None:
        reference.append(reference[0] if reference else result.perplexity)
        change = (result.perplexity / reference[0] - 1) * 100
        print(f"| {result.name} | {result.perplexity:.3f} | {change:+.2f}% |", flush=True)

    def token_ids(engine) -> list[int]:
        return engine.tokenizer.encode(wiki[: 12 * 512 * args.windows])  # as lowbit eval does

    run(load_checkpoint(default_model_path()), chosen, token_ids, 512, args.windows, "float32", show)


if __name__ == "__main__":
    main()
