"""Tolerances shared by the matmul kernel tests."""

from __future__ import annotations

import torch

# Relative tolerances per activation dtype, against the largest |reference| output.
# bf16: the CPU kernels round scales/zeros and their output to bf16 (eps 2^-8 ~ 4e-3).
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Element-wise |actual - expected| <= rel * (|expected| + max|expected|)."""
    actual, expected = actual.float(), expected.float()
    bound = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * bound)
