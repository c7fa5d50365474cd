"""AWQ (Lin et al., 2023): scale up the input channels that carry large activations before
rounding, so their weights lose less precision, and fold the inverse scale into the op that
produces those inputs (an RMSNorm, or the up projection in front of down_proj).

Per group of linears sharing an input X: s = mean|X|^alpha (normalised), alpha searched on a
grid of `grid` points in [0, 1) for the least output error ||X W^T - (X / s) Q(W s)^T||^2, with
Q the group-wise int4 round-to-nearest that is applied afterwards. (AutoAWQ's weight-clipping
search is not done.)
"""

from __future__ import annotations

import torch

from lowbit.runtime.quant.rtn import int4_grid, int4_round

MAX_SEARCH_TOKENS = 4096  # tokens of X used to score each alpha


def fake_int4(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """w [N, K] quantized and dequantized group-wise, fp32."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    scale, zero = int4_grid(groups, symmetric)
    q = int4_round(groups, scale, zero).float()
    return ((q - zero[..., None]) * scale[..., None]).reshape(n, k)


def scaled_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, group_size: int, symmetric: bool
) -> float:
    """sum ||x W^T - (x / s) Q(W s)^T||^2 over the weights sharing x [rows, K]; s [K]."""
    w = torch.cat([t.float() for t in weights])  # [sum N_i, K]
    x = x.float()
    return _scaled_error(x, w, x @ w.T, s, group_size, symmetric)


def _scaled_error(
    x: torch.Tensor,
    w: torch.Tensor,
    reference: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    symmetric: bool,
) -> float:
    """scaled_error with w [N, K] concatenated and reference = x @ w^T [rows, N] already made."""
    return (reference - (x / s) @ fake_int4(w * s, group_size, symmetric).T).pow(2).sum().item()


def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], group_size: int, symmetric: bool, grid: int = 20
) -> torch.Tensor:
    """x [tokens, K] inputs; weights [N_i, K] sharing them -> per-input-channel scales s [K]."""
    x = x[:MAX_SEARCH_TOKENS].float()
    w = torch.cat([t.float() for t in weights])  # [sum N_i, K]
    reference = x @ w.T  # made once: every candidate scale is scored against it
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)  # [K]
    best_error, best = float("inf"), torch.ones_like(x_mean)
    for step in range(grid):
        alpha = step / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = _scaled_error(x, w, reference, s, group_size, symmetric)
        if error < best_error:
            best_error, best = error, s
    return best
