"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For a group of linears sharing input X: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over input
channel j (max|W_j| across every weight of the group), then X' = X / s (folded into the RMSNorm
or the up projection that produces X) and W' = W * s: X'W'^T = XW^T exactly before rounding.
"""

from __future__ import annotations

import torch


def smoothing_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """act_absmax [K] (max |X_j| over calibration tokens); weights [N_i, K] -> s [K]."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)
