"""`KVCacheSpec`: the shape and storage dtype of the paged KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_STORAGE = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
# int8 caches keep one fp32 scale per (token, head) for K and for V.
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class KVCacheSpec:
    dtype: str
    block_size: int
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.dtype not in _STORAGE:
            raise ValueError(f"KV cache dtype must be one of {sorted(_STORAGE)}, got {self.dtype!r}")
        for name in ("block_size", "num_blocks", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _STORAGE[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    def bytes_per_token(self) -> int:
        """K and V for one token across all layers, scales included."""
        per_head = self.head_dim * self.torch_dtype.itemsize
        if self.quantized:
            per_head += SCALE_DTYPE.itemsize
        return 2 * self.num_layers * self.num_kv_heads * per_head

    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token()

    def with_num_blocks(self, num_blocks: int) -> KVCacheSpec:
        return KVCacheSpec(
            self.dtype, self.block_size, num_blocks, self.num_layers, self.num_kv_heads, self.head_dim
        )
