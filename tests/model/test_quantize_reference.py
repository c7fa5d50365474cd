"""lowbit's GPTQ against an independent implementation, llm-compressor 0.14 (vLLM's quantizer), on
the tiny random Llama of tests/tiny_llama.py with the same calibration windows and the same scheme
(4 bit, group 32, symmetric, columns by decreasing Hessian with groups kept: llm-compressor's
default `actorder="weight"`, ours `act_order="weight"`; our held-out check off, as it has none).

llm-compressor is too heavy for the test install, so its output is stored: the fake-quantized
projections it wrote (tests/data/quantize_reference, remade by make_fixture.py there). Each
projection's output error ||W X - W_q X||^2 / ||W X||^2 on held-out wiki text (float-model inputs)
must be within 5% of llm-compressor's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.loaders.registry import load_checkpoint
from lowbit.quantize.calibration import calibration_samples, watch_inputs
from lowbit.quantize.pipeline import QuantizeOptions, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.quant import method_for
from tests.tiny_llama import PROJECTIONS

FIXTURE = Path(__file__).parents[1] / "data" / "quantize_reference"
NUM_SAMPLES, SEQ_LEN, TEXT_CHARS = 16, 64, 200_000  # as make_fixture.py drew them
OPTIONS = QuantizeOptions(
    "gptq", group_size=32, symmetric=True, act_order="weight", guard=False,
    num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=4,
)  # fmt: skip
WITHIN = 1.05


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(FIXTURE / "llmcompressor_gptq_w4_g32_sym.safetensors").items()}


@pytest.fixture(scope="module")
def ours(tiny) -> dict[str, torch.Tensor]:
    quantized = quantize_model(
        load_checkpoint(tiny[0]), OPTIONS, standard_text("c4")[:TEXT_CHARS], progress=False
    )
    return {
        name: method_for(w.config).dequantize(w.tensors).float()
        for name, w in quantized.weights.items()
        if not isinstance(w, torch.Tensor)
    }


@pytest.fixture(scope="module")
def held_out_inputs(tiny, tokenizer) -> dict[str, torch.Tensor]:
    """Each projection's inputs in the float model on 4 windows of wiki text: [tokens, in]."""
    model = tiny[1]
    ids = tokenizer.encode(standard_text("wiki")[:20_000], add_special_tokens=False)[: 4 * SEQ_LEN]
    seen: dict[str, torch.Tensor] = {}
    projections = {n: m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}
    with torch.no_grad(), watch_inputs(projections, seen.__setitem__):
        model(torch.tensor(ids).reshape(4, SEQ_LEN))
    return seen


def test_the_fixture_was_made_from_this_model_and_these_windows(tiny, tokenizer, reference):
    windows = calibration_samples(tokenizer, standard_text("c4")[:TEXT_CHARS], NUM_SAMPLES, SEQ_LEN)
    assert windows.tolist() == json.loads((FIXTURE / "calibration.json").read_text())
    weights = dict(tiny[1].named_parameters())
    assert set(reference) == {n for n in weights if n.split(".")[-2] in PROJECTIONS}
    for name, quantized in reference.items():  # 4-bit codes of these weights, not of other ones
        relative = (quantized - weights[name]).norm() / weights[name].norm()
        assert relative < 0.2, (name, relative.item())


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_gptq_layer_errors_match_llm_compressor(ours, reference, held_out_inputs, tiny, projection):
    weights = dict(tiny[1].named_parameters())
    for module, x in held_out_inputs.items():
        if not module.endswith(projection):
            continue
        name = f"{module}.weight"
        w = weights[name].detach()
        exact = (x @ w.T).pow(2).sum()
        ours_error = ((x @ (w - ours[name]).T).pow(2).sum() / exact).item()
        ref_error = ((x @ (w - reference[name]).T).pow(2).sum() / exact).item()
        assert ours_error <= WITHIN * ref_error, (name, ours_error, ref_error)
