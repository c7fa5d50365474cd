"""The held-out calibration windows and the per-linear check against round-to-nearest:

- which windows are held out (by hand), and that every input row reaches the fit or the held-out
  rows by the window it came from;
- the check keeps GPTQ where it reproduces held-out rows better than RTN, and RTN's codes where a
  degenerate calibration (one repeated input) made GPTQ lose; errors come from plain matmuls here.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.quantize.gptq import gptq_quantize
from lowbit.quantize.holdout import MAX_HELD_ROWS, SplitRows, held_out_windows
from lowbit.quantize.pipeline import QuantizeOptions, _LayerResult, _no_worse_than_rtn
from lowbit.runtime.quant import method_for
from lowbit.runtime.quant.rtn import quantize_w4a16_rtn

N_OUT, K_IN, GROUP = 32, 64, 32


@pytest.mark.parametrize(
    ("windows", "held"),
    [(1, []), (2, [1]), (7, [6]), (8, [7]), (16, [7, 15]), (20, [7, 15]), (24, [7, 15, 23])],
)
def test_every_eighth_window_is_held_out(windows, held):
    assert held_out_windows(windows).nonzero().flatten().tolist() == held


def test_rows_go_to_the_fit_or_the_held_out_set_by_window():
    """16 windows of 3 tokens in batches of 4; each row's value is its window's index."""
    seq_len, batch = 3, 4
    fitted: list[torch.Tensor] = []
    split = SplitRows(held_out_windows(16), batch, lambda name, x: fitted.append(x))
    for first in range(0, 16, batch):
        window_of_row = torch.arange(first, first + batch).repeat_interleave(seq_len)  # [B * L]
        split("q", window_of_row[:, None].float().expand(-1, 5))
    fit_windows = torch.cat(fitted)[:, 0].unique().tolist()
    assert fit_windows == [w for w in range(16) if w not in (7, 15)]
    held = split.held_rows("q")
    assert held.shape == (2 * seq_len, 5) and held[:, 0].tolist() == [7.0] * 3 + [15.0] * 3
    assert split.held_rows("o") is None


def test_held_out_rows_are_capped():
    split = SplitRows(torch.ones(4, dtype=torch.bool), 2, lambda name, x: None)
    split("q", torch.zeros(2 * MAX_HELD_ROWS, 4))  # two windows of MAX_HELD_ROWS tokens
    split("q", torch.zeros(8, 4))
    assert split.held_rows("q").shape == (MAX_HELD_ROWS, 4)


def _dequantize(qw) -> torch.Tensor:
    return method_for(qw.config).dequantize(qw.tensors)


def _error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return (x.double() @ (weight.double() - approx.double()).T).pow(2).sum().item()


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(N_OUT, K_IN, generator=torch.Generator().manual_seed(0))


def _mixed(tokens: int, seed: int) -> torch.Tensor:
    """Correlated inputs (one fixed mixing matrix): a new seed is new text of the same kind."""
    mixing = torch.randn(K_IN, K_IN, generator=torch.Generator().manual_seed(1)) / K_IN**0.5 + torch.eye(K_IN)
    return torch.randn(tokens, K_IN, generator=torch.Generator().manual_seed(seed)) @ mixing


def test_gptq_that_loses_on_held_out_rows_falls_back_to_rtn(weight):
    """Calibrated on one input repeated (a text of one token): GPTQ spends every column's error on
    the directions that input never uses, and held-out text of the ordinary kind pays for it."""
    repeated = _mixed(1, seed=2).expand(256, -1)
    hessian = 2 * repeated.double().T @ repeated.double() / 256
    gptq = gptq_quantize(weight, hessian, GROUP, act_order="none")
    held_out = _mixed(256, seed=3)
    rtn = quantize_w4a16_rtn(weight, GROUP)
    assert _error(held_out, weight, _dequantize(gptq)) > _error(held_out, weight, _dequantize(rtn))

    result = _LayerResult()
    kept = _no_worse_than_rtn(
        "q_proj", gptq, weight, held_out, QuantizeOptions("gptq", group_size=GROUP), result
    )
    assert result.checked == 1 and result.fell_back == ["q_proj"]
    assert torch.equal(kept.tensors["qweight"], rtn.tensors["qweight"])
    assert torch.equal(kept.tensors["scales"], rtn.tensors["scales"])


def test_gptq_that_wins_on_held_out_rows_is_kept(weight):
    calibration = _mixed(1024, seed=4)
    gptq = gptq_quantize(weight, 2 * calibration.double().T @ calibration.double() / 1024, GROUP)
    held_out = _mixed(256, seed=5)
    rtn = quantize_w4a16_rtn(weight, GROUP)
    assert _error(held_out, weight, _dequantize(gptq)) < _error(held_out, weight, _dequantize(rtn))

    result = _LayerResult()
    kept = _no_worse_than_rtn(
        "q_proj", gptq, weight, held_out, QuantizeOptions("gptq", group_size=GROUP), result
    )
    assert result.checked == 1 and result.fell_back == [] and kept is gptq


def test_no_held_out_rows_means_no_check(weight):
    gptq = gptq_quantize(weight, torch.eye(K_IN), GROUP)
    result = _LayerResult()
    assert _no_worse_than_rtn("q_proj", gptq, weight, None, QuantizeOptions("gptq"), result) is gptq
    assert result.checked == 0
