"""Linear layers over packed weights (any scheme, any kernel), and fused projections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.runtime.quant import QuantizedWeight, WeightLike, dense_weight, pack_linear


def joint_bias(biases: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> torch.Tensor | None:
    """One bias for outputs of these widths side by side (zeros where one has none), or None where
    none has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(n) if b is None else b.float() for b, n in zip(biases, sizes, strict=True)])


def _as_quantized(weight: WeightLike) -> QuantizedWeight:
    return dense_weight(weight) if isinstance(weight, torch.Tensor) else weight


class Linear(nn.Module):
    """y = x @ W.T (+ bias) through the kernel the weight's scheme chose at load. The bias (Qwen2's
    q/k/v, Llama's attention_bias / mlp_bias) stays dense in the compute dtype, added after the
    kernel: every scheme and kernel then takes it the same way."""

    def __init__(
        self, weight: WeightLike, device: torch.device, dtype: torch.dtype, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.packed = pack_linear(weight, device, dtype)
        if bias is not None and tuple(bias.shape) != (self.packed.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {self.packed.out_features} outputs")
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x)
        return y if self.bias is None else y.add_(self.bias)  # the kernel's output is a new tensor

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step

    def extra_repr(self) -> str:
        p = self.packed
        return f"in={p.in_features}, out={p.out_features}, {p.kernel.config.name} via {p.kernel.name}"


class FusedLinear(nn.Module):
    """Several projections of the same input (q/k/v, gate/up) in one kernel call when they share a
    scheme; otherwise one call each. forward returns the outputs in the order given."""

    def __init__(
        self,
        weights: Sequence[WeightLike],
        device: torch.device,
        dtype: torch.dtype,
        biases: Sequence[torch.Tensor | None] | None = None,
        sizes: Sequence[int] | None = None,
    ):
        """sizes: the outputs' widths when `weights` is one weight already fused in the checkpoint
        (Phi-3's qkv_proj, gate_up_proj); else each weight is one output."""
        super().__init__()
        parts = [_as_quantized(w) for w in weights]
        biases = list(biases) if biases is not None else [None] * len(parts)
        self.sizes = list(sizes) if sizes is not None else [w.out_features for w in parts]
        if sizes is not None and (len(parts) != 1 or sum(sizes) != parts[0].out_features):
            raise ValueError(
                f"a fused weight of {parts[0].out_features} rows cannot split into {list(sizes)}"
            )
        if QuantizedWeight.can_concat(parts):  # one bias add for the fused output
            bias = joint_bias(biases, self.sizes)
            self.parts = nn.ModuleList([Linear(QuantizedWeight.concat_rows(parts), device, dtype, bias)])
        else:
            self.parts = nn.ModuleList(
                [Linear(w, device, dtype, b) for w, b in zip(parts, biases, strict=True)]
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self.parts) == 1:
            return list(self.parts[0](x).split(self.sizes, dim=-1))
        return [part(x) for part in self.parts]

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """All outputs side by side: [T, sum(sizes)] (a copy only when the parts are not fused)."""
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([part(x) for part in self.parts], dim=-1)
