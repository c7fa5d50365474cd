"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For a group of linears sharing input X: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over input
channel j (max|W_j| across every weight of the group), then X' = X / s (folded into the RMSNorm
or the up projection that produces X) and W' = W * s: X'W'^T = XW^T exactly before rounding.
Unless alpha is given, it is searched per group on calibration rows (the paper tunes it per model),
with no smoothing among the candidates.
"""

from __future__ import annotations

import torch

from lowbit.kernels.w8a8_matmul import dequantize_w8a8_weight_ref, quantize_per_token_ref
from lowbit.runtime.quant.rtn import quantize_w8a8_rtn

# Migration strengths tried per input group (the paper's 0.5 and its range for larger models).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_SEARCH_TOKENS = 4096


def smoothing_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """act_absmax [K] (max |X_j| over calibration tokens); weights [N_i, K] -> s [K]."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


def fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [rows, K] @ w [N, K]^T as W8A8 computes it: int8 per-token activations, int8 per-channel
    weights (RTN W8A8's rounding), the kernel spec's quantizers, summed in fp32 rather than the
    spec's exact integers (fast enough to score every candidate)."""
    xq, x_scale = quantize_per_token_ref(x)  # int8 [rows, K], [rows, 1]
    qw = quantize_w8a8_rtn(w)
    return (xq.float() * x_scale) @ dequantize_w8a8_weight_ref(qw.tensors["qweight"], qw.tensors["scales"]).T


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """The smoothing factors s [K] of the alpha in ALPHAS, or no smoothing (s = 1), whose W8A8
    output on x [rows, K] is closest to the float output."""
    x = x[:MAX_SEARCH_TOKENS].float()
    w = torch.cat([t.float() for t in weights])  # [sum N_i, K]
    reference = x @ w.T
    candidates = [torch.ones_like(act_absmax, dtype=torch.float32)]
    candidates += [smoothing_factors(act_absmax, weights, alpha) for alpha in ALPHAS]
    errors = [(reference - fake_w8a8(x / s, w * s)).pow(2).sum().item() for s in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]
