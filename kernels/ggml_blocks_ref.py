"""Reference meaning of GGUF (ggml) block-quantized weights: gguf-py's dequantizer, in torch terms.

The canonical layout of a GGUF block weight is the file's own bytes: uint8 [N, row_bytes], row n
holding weight row n as K / block_size consecutive blocks (gguf.GGML_QUANT_SIZES gives a type's
block size and bytes). The byte layout of each type is described in kernels/cpu/ggml_blocks.cpp.
gguf-py (`gguf.quants.dequantize`) is llama.cpp's own Python port of its dequantizers; the kernels
are tested against it.
"""

from __future__ import annotations

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# The block types lowbit keeps packed and computes (the CPU and Triton kernels run all of them).
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def row_bytes(name: str, in_features: int) -> int:
    """Bytes of one weight row of `in_features` weights (a multiple of the block size)."""
    block, type_size = GGML_QUANT_SIZES[qtype(name)]
    if in_features % block:
        raise ValueError(f"{name}: in_features {in_features} is not a multiple of the block size {block}")
    return in_features // block * type_size


def in_features(name: str, row_bytes: int) -> int:
    """Weights in a row of `row_bytes` bytes."""
    block, type_size = GGML_QUANT_SIZES[qtype(name)]
    return row_bytes // type_size * block


def dequantize_ref(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [N, row_bytes] -> fp32 [N, K], exactly gguf-py's values."""
    raw = blocks.detach().cpu().contiguous().numpy()
    values = gguf.quants.dequantize(raw, qtype(name)).astype(np.float32, copy=False)
    return torch.from_numpy(values.reshape(raw.shape[0], -1))


def ggml_matmul_ref(x: torch.Tensor, blocks: torch.Tensor, name: str) -> torch.Tensor:
    """x [M, K] @ dequantize(W).T in fp64 (the comparison point for kernels' fp32 sums)."""
    return x.double() @ dequantize_ref(blocks, name).double().T


def int8_activations_ref(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activations as the CPU kernels' int8 arithmetic sees them (llama.cpp's Q8_0 / Q8_K): per
    block of the weight type (32, or 256 for super-blocks), the scale d = amax / 127 in fp32 and x
    rounded to the nearest multiple of it (x * (1 / d) rounded half to even), dequantized in fp64.
    fp32 [M, K] -> fp64 [M, K]."""
    block = GGML_QUANT_SIZES[qtype(name)][0]
    xb = x.float().reshape(x.shape[0], -1, block)  # [M, K/block, block]
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv).double() * d.double()).reshape(x.shape)
