"""The independent side of `benchmarks/gptq_reference.py`: llm-compressor's GPTQ (or AWQ) on an HF
model directory and calibration windows that lowbit exported, writing the fake-quantized
projection weights it produced. Runs in its own virtual environment, with no lowbit import:

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/refvenv/bin/python benchmarks/gptq_reference_llmcompressor.py WORKDIR --method gptq \
        --group-size 64 [--symmetric] [--actorder weight] [--damp 0.01] --out WORKDIR/ref.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _scheme(group_size: int, symmetric: bool, actorder: str | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size,
        actorder=actorder,
    )  # fmt: skip
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(args):
    groups = _scheme(args.group_size, args.symmetric, args.actorder)
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(
            config_groups=groups, ignore=["lm_head"], dampening_frac=args.damp, actorder=args.actorder,
            block_size=128,
        )  # fmt: skip
    from llmcompressor.modifiers.awq import AWQModifier

    return AWQModifier(config_groups=groups, ignore=["lm_head"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--actorder", choices=("weight",), default=None)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--calibration", default="calibration.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--projections-only", action="store_true", help="only the quantized projections")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.workdir / "model", dtype=torch.float32)
    windows = json.loads((args.workdir / args.calibration).read_text())  # [S][L] token ids
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    oneshot(
        model=model, dataset=data, recipe=_recipe(args), num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]), shuffle_calibration_samples=False, pipeline="sequential",
    )  # fmt: skip
    _fake_quantize_in_place(model)
    dtype = getattr(torch, args.dtype)
    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if _kept(k) and (not args.projections_only or k.split(".")[-2] in PROJECTIONS)
    }
    save_file(state, str(args.out))
    print(f"wrote {len(state)} tensors to {args.out}")


def _kept(name: str) -> bool:
    """The model's own weights (AWQ folds scales into norms too), not the quantization params;
    the tied output projection is the embedding."""
    return name != "lm_head.weight" and not any(
        part in name for part in ("weight_scale", "weight_zero_point", "weight_g_idx")
    )


@torch.no_grad()
def _fake_quantize_in_place(model) -> None:
    """Round each projection onto its own grid: GPTQ already left its weights there, AWQ only
    computed the grid (the weights are rounded when compressed on save)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    for name, module in model.named_modules():
        if name.split(".")[-1] in PROJECTIONS:
            args = module.quantization_scheme.weights
            zero = getattr(module, "weight_zero_point", None)
            module.weight.copy_(fake_quantize(module.weight, module.weight_scale, zero, args))


if __name__ == "__main__":
    main()
