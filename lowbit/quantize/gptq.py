"""GPTQ (Frantar et al., 2022): quantize a linear layer's columns one at a time, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's inputs, H = 2 X^T X / n.

Follows the reference implementation (and AutoGPTQ's defaults): dampening of 1% of the mean
diagonal, Cholesky factor of H^-1, lazy batch updates of 128 columns, optional act-order
(columns in order of decreasing H diagonal, groups taken in that order, as GPTQ's g_idx), group
scales computed from the partially-updated weights when a group starts.
"""

from __future__ import annotations

import torch

from lowbit.runtime.quant.base import QuantizedWeight
from lowbit.runtime.quant.rtn import int4_grid, int4_round, int4_weight


class Hessian:
    """Running 2 X^T X / n over the rows of every input a layer sees."""

    def __init__(self, in_features: int):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, in_features]."""
        x = x.double()
        total = self.count + x.shape[0]
        self.matrix *= self.count / total
        self.matrix += (2.0 / total) * (x.T @ x)
        self.count = total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """weight [N, K] float, hessian [K, K] -> W4A16 (with `perm` when act_order)."""
    w = weight.double().clone()  # [N, K]
    h = hessian.double().clone()
    n_out, k_in = w.shape
    group_size = k_in if group_size == -1 else group_size
    if k_in % group_size:
        raise ValueError(f"in_features {k_in} is not a multiple of group size {group_size}")
    dead = torch.diag(h) == 0  # inputs that were always zero: any weight will do
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k_in, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(n_out, k_in, dtype=torch.uint8)
    groups = k_in // group_size
    scale = torch.zeros(n_out, groups, dtype=torch.float64)
    zero = torch.zeros(n_out, groups, dtype=torch.float64)
    for start in range(0, k_in, block_size):
        end = min(start + block_size, k_in)
        w1 = w[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # a group starts: its grid comes from the weights as they are now
                g = col // group_size
                current = torch.cat((w1[:, i:], w[:, end:]), dim=1)[:, :group_size]
                s, z = int4_grid(current, symmetric)
                scale[:, g], zero[:, g] = s.double(), z.double()
            g = col // group_size
            column = w1[:, i]
            qi = int4_round(column[:, None], scale[:, g], zero[:, g])[:, 0]
            q[:, col] = qi
            dequant = (qi.double() - zero[:, g]) * scale[:, g]
            err = (column - dequant) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return int4_weight(q, scale.float(), zero.float(), group_size, perm)
