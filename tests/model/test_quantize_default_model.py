"""End to end on the default model (SmolLM2-135M, dequantized from its Q4_1 GGUF): GPTQ with
`lowbit quantize`'s defaults must beat round-to-nearest at the same bits and group size on text
it never saw (wiki windows; calibration is c4), scored by our engine in float32.

This is the case the defaults were chosen for (docs/accuracy.md): before them, GPTQ lost to RTN
here. A small calibration set keeps it affordable in CI; the margins at 16, 64 and 128 windows are
in the docs.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.loaders.registry import load_checkpoint
from lowbit.quantize.pipeline import QuantizeOptions, quantize_model
from lowbit.quantize.text_data import standard_text
from lowbit.runtime.config import EngineConfig
from lowbit.runtime.engine import Engine

pytestmark = pytest.mark.slow

GROUP = 64  # the largest power of two dividing SmolLM2-135M's hidden size 576
WINDOWS, WINDOW = 4, 512
# GPTQ's perplexity must be below this share of RTN's (measured 2026-12-07 on these windows with
# 16 x 128 calibration: 16.085 / 17.590 = 0.914; 1.0 would mean calibration bought nothing).
MARGIN = 0.97


def _perplexity(checkpoint, ids: list[int]) -> float:
    engine = Engine(EngineConfig(dtype="float32", kv_cache_memory=64 << 20), checkpoint)
    nll, count = 0.0, 0
    for start in range(0, WINDOWS * WINDOW, WINDOW):
        window = ids[start : start + WINDOW]
        logprobs = engine.score(window).log_softmax(dim=-1)[:-1]  # [WINDOW - 1, vocab]
        nll -= logprobs.gather(1, torch.tensor(window[1:])[:, None]).sum().item()
        count += WINDOW - 1
    return math.exp(nll / count)


def test_gptq_with_the_defaults_beats_round_to_nearest(default_gguf):
    source = load_checkpoint(default_gguf)
    ids = source.tokenizer.encode(standard_text("wiki")[: 12 * WINDOW * WINDOWS], add_special_tokens=False)
    rtn = quantize_model(source, QuantizeOptions("rtn", group_size=GROUP), progress=False)
    gptq = quantize_model(
        source, QuantizeOptions("gptq", group_size=GROUP, num_samples=16, seq_len=128), progress=False
    )
    rtn_ppl, gptq_ppl = _perplexity(rtn, ids), _perplexity(gptq, ids)
    assert gptq_ppl < MARGIN * rtn_ppl, (gptq_ppl, rtn_ppl)
