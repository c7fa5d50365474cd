"""lowbit's quantizers against an independent implementation (llm-compressor) on the default model:
the same float model, the same calibration windows, the same scheme; per-linear output error on
held-out activations and held-out perplexity (docs/accuracy.md, "Against llm-compressor").

    python -P benchmarks/gptq_reference.py export WORK --num-samples 16 --seq-len 256
    /tmp/refvenv/bin/python benchmarks/gptq_reference_llmcompressor.py WORK --out WORK/ref.safetensors
    python -P benchmarks/gptq_reference.py compare WORK --ref llmc-gptq=WORK/ref.safetensors \\
        --lowbit gptq --lowbit gptq:act_order=1 --lowbit rtn

Errors are ||W X - W_q X||^2 / ||W X||^2 for every projection, X the float model's inputs to it on
held-out text (wiki windows; calibration comes from c4), summed over each kind of projection.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lowbit.loaders.default_model import default_model_path
from lowbit.loaders.registry import load_checkpoint
from lowbit.quantize.calibration import calibration_samples, watch_inputs
from lowbit.quantize.pipeline import QuantizeOptions, hf_model, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.quant import method_for

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WINDOW, WINDOWS = 512, 8


def export(work: Path, num_samples: int, seq_len: int, seed: int) -> None:
    checkpoint = load_checkpoint(default_model_path())
    model = hf_model(checkpoint)
    model.save_pretrained(work / "model")
    checkpoint.tokenizer.hf.save_pretrained(work / "model")
    windows = calibration_samples(checkpoint.tokenizer, standard_text("c4"), num_samples, seq_len, seed)
    (work / "calibration.json").write_text(json.dumps(windows.tolist()))
    print(f"exported the float model and {num_samples} x {seq_len} calibration windows to {work}")


def _held_out(checkpoint) -> torch.Tensor:
    ids = checkpoint.tokenizer.encode(
        standard_text("wiki")[: 12 * WINDOW * WINDOWS], add_special_tokens=False
    )
    return torch.tensor(ids[: WINDOW * WINDOWS]).reshape(WINDOWS, WINDOW)


@torch.no_grad()
def _projection_inputs(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every projection's inputs on the held-out windows, from the float model: [tokens, in]."""
    seen: dict[str, list[torch.Tensor]] = {}
    projections = {n: m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}
    with watch_inputs(projections, lambda name, x: seen.setdefault(name, []).append(x)):
        for window in windows:
            model(window[None])
    return {name: torch.cat(xs) for name, xs in seen.items()}


@torch.no_grad()
def _perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows:
        logprobs = model(window[None]).logits[0, :-1].log_softmax(-1)  # [L - 1, vocab]
        total -= logprobs.gather(1, window[1:, None]).sum().item()
        count += len(window) - 1
    return math.exp(total / count)


def _lowbit_state(checkpoint, spec: str, work: Path) -> dict[str, torch.Tensor]:
    """`method[:key=value,...]` quantized by lowbit on the exported calibration windows."""
    method, _, rest = spec.partition(":")
    fields = dict(kv.split("=") for kv in rest.split(",") if kv)
    windows = json.loads((work / "calibration.json").read_text())
    opts = QuantizeOptions(
        method, group_size=64, num_samples=len(windows), seq_len=len(windows[0]), batch_size=4,
        **{f: _parse(v) for f, v in fields.items()},
    )  # fmt: skip
    text = standard_text("c4")  # the windows are drawn from it again with the same seed
    quantized = quantize_model(checkpoint, opts, calibration_text=text, progress=False)
    state = {}
    for name, w in quantized.weights.items():
        dense = w if isinstance(w, torch.Tensor) else method_for(w.config).dequantize(w.tensors)
        state[name] = dense.float()
    return state


def _parse(value: str):
    """A field value from the command line: a number, a flag (0/1) or a word."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def compare(work: Path, refs: list[str], lowbits: list[str]) -> None:
    from safetensors.torch import load_file

    checkpoint = load_checkpoint(default_model_path())
    model = hf_model(checkpoint)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = _held_out(checkpoint)
    inputs = _projection_inputs(model, held_out)
    kinds = sorted({n.split(".")[-1] for n in inputs}, key=PROJECTIONS.index)
    print("| variant | perplexity | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 2) + "|", flush=True)
    variants = [("float", lambda: float_state)]
    variants += [
        (f"lowbit {spec}", lambda spec=spec: _lowbit_state(checkpoint, spec, work)) for spec in lowbits
    ]
    variants += [
        (label, lambda path=path: load_file(path)) for label, path in (r.split("=", 1) for r in refs)
    ]
    for label, make in variants:  # one at a time: each row prints as soon as it is measured
        state = make()
        model.load_state_dict({**float_state, **{k: v for k, v in state.items() if k in float_state}})
        ppl = _perplexity(model, held_out)
        errors = {kind: _error(float_state, state, inputs, kind) for kind in kinds}
        print(f"| {label} | {ppl:.3f} | " + " | ".join(f"{errors[k]:.4f}" for k in kinds) + " |", flush=True)


def _error(float_state, state, inputs, kind: str) -> float:
    """sum ||(W - W_q) X||^2 / sum ||W X||^2 over the projections of one kind."""
    num = den = 0.0
    for name, x in inputs.items():
        if name.split(".")[-1] != kind:
            continue
        w, wq = float_state[f"{name}.weight"], state.get(f"{name}.weight", float_state[f"{name}.weight"])
        num += ((x @ (w - wq).T) ** 2).sum().item()
        den += ((x @ w.T) ** 2).sum().item()
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("work", type=Path)
    ex.add_argument("--num-samples", type=int, default=16)
    ex.add_argument("--seq-len", type=int, default=256)
    ex.add_argument("--seed", type=int, default=0)
    cmp = sub.add_parser("compare")
    cmp.add_argument("work", type=Path)
    cmp.add_argument("--ref", action="append", default=[], help="LABEL=weights.safetensors")
    cmp.add_argument("--lowbit", action="append", default=[], help="method[:field=value,...]")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.command == "export":
        export(args.work, args.num_samples, args.seq_len, args.seed)
    else:
        compare(args.work, args.ref, args.lowbit)


if __name__ == "__main__":
    main()
