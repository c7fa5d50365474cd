"""Calibration windows held out of the fit, and the per-linear check they serve: a calibrated
method's codes are kept only where they do no worse than round-to-nearest on rows it never saw.

GPTQ minimises a layer's output error on its calibration rows; with few rows per Hessian dimension
it fits those rows at the expense of others (measured on the default model: docs/accuracy.md).
Comparing on held-out windows, per linear, makes "never worse than RTN" true layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

HELD_OUT_EVERY = 8  # every 8th calibration window is held out of the fit
MAX_HELD_ROWS = 8192  # input rows kept per linear for the check


def held_out_windows(num_windows: int) -> torch.Tensor:
    """bool [S]: windows 7, 15, 23, ... (the last one when fewer than 8); none for one window."""
    held = torch.zeros(num_windows, dtype=torch.bool)
    held[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] = True
    if num_windows > 1 and not held.any():
        held[-1] = True
    return held


class SplitRows:
    """An observer for `calibration.watch_inputs` that sends each input row to `fit` or to the
    held-out rows by the window it belongs to. Every watched module sees the batches in order, one
    call per batch, each x [batch * seq_len, in] window-major."""

    def __init__(self, held: torch.Tensor, batch_size: int, fit: Callable[[str, torch.Tensor], None]):
        self.held, self.batch_size, self.fit = held, batch_size, fit
        self.calls: dict[str, int] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        batch = self.calls.get(name, 0)
        self.calls[name] = batch + 1
        first = batch * self.batch_size
        windows = self.held[first : first + self.batch_size]  # [B]
        rows = windows.repeat_interleave(x.shape[0] // len(windows))  # [B * L]
        if (~rows).any():
            self.fit(name, x[~rows])
        kept = self.rows.setdefault(name, [])
        room = MAX_HELD_ROWS - sum(len(r) for r in kept)
        if rows.any() and room > 0:
            kept.append(x[rows][:room].clone())

    def held_rows(self, name: str) -> torch.Tensor | None:
        """[rows, in], or None when no window was held out."""
        return torch.cat(self.rows[name]) if self.rows.get(name) else None


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """||x W^T - x A^T||^2 for weight, approx [N, K] and x [rows, K]."""
    return (x @ (weight.float() - approx.float()).T).pow(2).sum().item()
