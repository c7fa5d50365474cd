"""One layer's slice of the paged KV pool, as attention sees it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class LayerKVCache:
    """k, v [num_blocks, block_size, Hkv, D]; k_scale, v_scale [num_blocks, block_size, Hkv] for int8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled pool tensor. On CPU the pages come from calloc via numpy and are only touched
    (and counted as resident) when a block is first written, so a generous pool costs nothing
    until it is used. Zeros rather than empty: masked slots are still multiplied by a zero
    probability, and uninitialised memory may hold NaN (0 * NaN = NaN)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
