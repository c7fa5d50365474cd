"""`lowbit quantize` and `lowbit eval` run as a user runs them (a subprocess), on a tiny random Llama
made by transformers itself with the default model's tokenizer:

- quantize writes a GPTQ directory that LLM loads and that generates, greedily, the same text as the
  same quantization done in memory (with the fp16 the directory stores its weights and scales in);
- bad options exit with status 2 and a one-line error, no traceback, nothing written;
- eval prints a row per scheme whose perplexity matches transformers on the same windows with the
  float weights (reference) and with RTN-dequantized weights (rtn-w4-g32).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from lowbit import LLM
from lowbit.loaders.base import Checkpoint
from lowbit.loaders.gguf_file import read_gguf
from lowbit.loaders.registry import load_checkpoint
from lowbit.loaders.tokenizer import tokenizer_from_gguf
from lowbit.quantize.pipeline import QuantizeOptions, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine
from lowbit.runtime.quant import method_for
from lowbit.runtime.quant.rtn import quantize_w4a16_rtn
from lowbit.runtime.sampling_params import SamplingParams
from tests.stored_checkpoint import as_stored_fp16
from tests.tiny_llama import save_tiny_llama

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KV = 16 << 20
TIMEOUT = 300
PROMPT = "The capital of France is"


def _lowbit() -> list[str]:
    exe = shutil.which("lowbit")
    return [exe] if exe else [sys.executable, "-m", "lowbit.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables to the terminal's width
    return subprocess.run([*_lowbit(), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf) -> tuple:
    """A random Llama (hidden 128, intermediate 256, 2 layers) saved as an HF directory, and the
    transformers model itself."""
    path = tmp_path_factory.mktemp("tiny")
    return path, save_tiny_llama(path, tokenizer_from_gguf(read_gguf(default_gguf).metadata).hf)


def _greedy_in_memory(checkpoint: Checkpoint, params: SamplingParams) -> str:
    engine = Engine(EngineConfig(dtype="float32", kv_cache_memory=KV), checkpoint)
    engine.add_request("0", PROMPT, params)
    text = None
    while engine.has_unfinished():
        for output in engine.step():
            text = output.outputs[0].text
    assert text is not None
    return text


def _quantize(path, out, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`lowbit quantize path ... -o out`, which must succeed; and the quantization_config it wrote."""
    result = _run("quantize", str(path), *args, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote gptq checkpoint to {out}" in result.stdout
    return result, json.loads((out / "config.json").read_text())["quantization_config"]


def test_quantize_writes_a_gptq_directory_that_generates_like_the_in_memory_model(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "out"
    _, config = _quantize(
        path, out, "--method", "rtn", "--bits", "4", "--group-size", "32", "--format", "gptq"
    )
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert config["sym"] is False and config["desc_act"] is False  # the CLI's defaults: --asym, no desc-act

    in_memory = quantize_model(load_checkpoint(path), QuantizeOptions("rtn", group_size=32, symmetric=False))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    loaded = LLM(str(out), dtype="float32", kv_cache_memory=KV).generate(PROMPT, params)[0].outputs[0]
    assert len(loaded.token_ids) == 24
    assert loaded.text == _greedy_in_memory(as_stored_fp16(in_memory), params)


def test_gptq_with_the_defaults_reports_its_check_and_warns_of_little_calibration(tiny, tmp_path):
    args = ("--method", "gptq", "--group-size", "32", "--num-samples", "8", "--seq-len", "64")
    result, config = _quantize(tiny[0], tmp_path / "out", *args)
    assert re.search(r"gptq: \d+ of 14 checked linears kept round-to-nearest codes", result.stdout), (
        result.stdout
    )
    # 8 x 64 tokens for the 256-wide down projection: 2 per input dimension.
    assert (
        "calibration has 512 tokens, 2.0 per input dimension of the widest projection (256)" in result.stderr
    )
    # The default column order keeps groups in place: no desc_act (g_idx) in the checkpoint.
    assert config["sym"] is False and config["desc_act"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "foo"], "method must be one of"),
        (["--method", "rtn", "--bits", "3"], r"rtn supports bits/activations .* got \(3, 16\)"),
        (["--method", "rtn", "--group-size", "48"], "group size 48"),  # 128 and 256 inputs
        (
            ["--method", "gptq", "--act-order", "desc"],
            r"act_order must be one of \('none', 'weight', 'group'\)",
        ),
    ],
    ids=["method", "bits", "group-size", "act-order"],
)
def test_bad_quantize_options_are_clear_errors(tiny, tmp_path, args, message):
    out = tmp_path / "out"
    result = _run("quantize", str(tiny[0]), *args, "-o", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(f"^error: .*{message}", result.stderr, re.MULTILINE), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


def _perplexity(model: LlamaForCausalLM, ids: list[int], window: int, windows: int) -> float:
    """exp(mean NLL) over consecutive windows, each scored on its own."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, window * windows, window):
            chunk = torch.tensor(ids[start : start + window])
            logprobs = model(chunk[None]).logits[0, :-1].float().log_softmax(dim=-1)
            total -= logprobs.gather(1, chunk[1:, None]).sum().item()
            count += window - 1
    return math.exp(total / count)


def _with_rtn_weights(model: LlamaForCausalLM, group: int) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name.split(".")[-2] in PROJECTIONS:
                q = quantize_w4a16_rtn(p.data, group, symmetric=False)
                p.copy_(method_for(q.config).dequantize(q.tensors))
    return clone


def test_eval_reports_each_scheme_with_the_perplexity_transformers_gets(tiny):
    path, model = tiny
    windows, window = 2, 64
    result = _run("eval", str(path), "--scheme", "reference", "--scheme", "rtn-w4-g32", "--group-size", "32",
                  "--windows", str(windows), "--window-len", str(window))  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = dict(re.findall(r"^(\S+): perplexity (\S+) ", result.stdout, re.MULTILINE))
    assert set(printed) == {"reference", "rtn-w4-g32"}, result.stdout
    table_rows = [line for line in result.stdout.splitlines() if "│" in line or "|" in line]
    for name in printed:
        assert any(name in row and printed[name] in row for row in table_rows), result.stdout

    # The same windows of the same text (eval reads the first 12 characters per token it needs).
    ids = load_checkpoint(path).tokenizer.encode(standard_text("wiki")[: 12 * window * windows])
    expected = {
        "reference": _perplexity(model, ids, window, windows),
        "rtn-w4-g32": _perplexity(_with_rtn_weights(model, 32), ids, window, windows),
    }
    for name, value in expected.items():
        got = float(printed[name])
        assert math.isfinite(got) and got > 1
        assert got == pytest.approx(value, rel=1e-4), name
    assert float(printed["rtn-w4-g32"]) != float(printed["reference"])
