"""Whole-model logits on GGUF files of every preset llama.cpp's quantizer writes, against two
independent references shipped with them (tests/data/gguf/README.md):

- transformers in fp32 with every weight replaced by gguf-py's dequantization of the file's tensor
  (`hf_dequant`): the same math as lowbit's fp32 mode, so only summation order separates them;
- llama.cpp's own logits on the same file (`llamacpp_decode`, 16 single-token decodes), which
  quantizes activations to 8 bits for its quantized dot products, so it sits further away.

Bounds (docs/accuracy.md, "GGUF presets"): fp32 mode within EXACT_MAX of hf_dequant; both modes
within LLAMACPP_MAX / LLAMACPP_MEAN of llama.cpp, and llama.cpp's greedy token wherever its own
top-2 margin exceeds twice the max bound (a token can only flip below that).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import LLM

from .decode_paths import assert_compiled_decode_equals_eager

FIXTURES = Path(__file__).parents[1] / "data" / "gguf" / "llama3"
PRESETS = sorted(p.stem.removeprefix("llama3-") for p in FIXTURES.glob("llama3-*.gguf"))
KV_MEMORY = 8 << 20
# fp32 mode against the fp32 reference on dequantized weights: logits have std ~1.0; measured
# max 8.1e-6 over the 12 presets (docs/accuracy.md).
EXACT_MAX = 5e-5
# Against llama.cpp: its 8-bit activations put its own logits 0.08-0.14 (max) from the exact
# reference (README of the fixtures). fp32 mode sits at that distance; bf16 mode quantizes
# activations to int8 too, not identically, so the two roundings add. Measured over the 12
# presets: fp32 max 0.141, mean 0.023 (Q2_K); bf16 max 0.168 (Q5_K_M), mean 0.029 (Q2_K, Q6_K).
LLAMACPP_MAX = {"float32": 0.2, "bfloat16": 0.22}
LLAMACPP_MEAN = {"float32": 0.035, "bfloat16": 0.04}


@cache
def reference() -> dict:
    return json.loads((FIXTURES / "reference.json").read_text())


@cache
def engine(preset: str, dtype: str) -> LLM:
    return LLM(str(FIXTURES / f"llama3-{preset}.gguf"), dtype=dtype, kv_cache_memory=KV_MEMORY)


def logits(preset: str, dtype: str) -> torch.Tensor:
    """[16, 1024] fp32: row k after feeding ids[0..k] (teacher forcing)."""
    return engine(preset, dtype).engine.score(reference()["ids"])


def test_every_preset_is_shipped():
    assert (
        sorted(
            [
                "IQ4_NL",
                "IQ4_XS",
                "Q2_K",
                "Q3_K_M",
                "Q4_0",
                "Q4_1",
                "Q4_K_M",
                "Q5_0",
                "Q5_1",
                "Q5_K_M",
                "Q6_K",
                "Q8_0",
            ]
        )
        == PRESETS
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_logits_equal_dequantized_transformers(preset):
    expected = torch.from_numpy(np.load(FIXTURES / f"llama3-{preset}.hf_dequant.logits.npy"))
    got = logits(preset, "float32")
    assert (got - expected).abs().max().item() <= EXACT_MAX


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_logits_and_greedy_tokens_follow_llama_cpp(preset, dtype):
    expected = torch.from_numpy(np.load(FIXTURES / f"llama3-{preset}.llamacpp_decode.logits.npy"))
    got = logits(preset, dtype)
    diff = (got - expected).abs()
    assert diff.max().item() <= LLAMACPP_MAX[dtype]
    assert diff.mean().item() <= LLAMACPP_MEAN[dtype]
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LLAMACPP_MAX[dtype]
    assert clear.sum() >= 4, "guard: too few positions with a clear winner to test greedy tokens"
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["Q4_K_M", "IQ4_XS", "Q2_K", "Q5_0"])
def test_compiled_decode_steps_equal_eager_ones(preset, dtype):
    """Decode steps run each layer as one compiled call, with projections of several GGUF types
    (Q4_K_M's q/k are Q4_K, its v Q6_K: three GEMMs for qkv); its greedy tokens and their logits
    must be the eager layers' (same kernels, same roundings)."""
    assert_compiled_decode_equals_eager(engine(preset, dtype), reference()["ids"][:6], 10, dtype)
