"""GGUF block formats -> lowbit's canonical quantized layouts (no dequantization).

  Q4_0  {f16 d; u8 qs[16]}        x[j] = (nibble_j - 8) * d     -> W4A16 g32, min = -8 d
  Q4_1  {f16 d; f16 m; u8 qs[16]} x[j] = nibble_j * d + m       -> W4A16 g32, min = m
  Q8_0  {f16 d; i8 qs[32]}        x[j] = qs[j] * d              -> W8A16 g32
In Q4 blocks, byte i holds element i in its low nibble and element i + 16 in its high nibble.

Every other supported block type (Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS) has no exact form in
those layouts at the same size (a Q4_K sub-block's 6-bit scale and min would widen to fp16 or fp32
pairs per 32 weights, +11..33%), so its rows are kept as the file's bytes: the ggml scheme.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from lowbit.kernels.ggml_blocks_ref import in_features
from lowbit.kernels.w4a16_matmul import pack_int4
from lowbit.runtime.quant import GGMLConfig, QuantizedWeight, W4A16Config, W8A16Config
from lowbit.runtime.quant.ggml import TYPES as GGML_TYPES

BLOCK = 32
DENSE = {Q.F32: np.float32, Q.F16: np.float16}


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """uint8 [rows, row_bytes] -> uint8 [rows, blocks, block_bytes]."""
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _f16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The f16 field at byte `start` of every block, as fp32 [rows, blocks]."""
    field = np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(field.astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """uint8 [rows, blocks, 16] -> canonical packed int4 [rows, blocks * 16]."""
    values = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)  # [rows, blocks, 32], element order
    return pack_int4(torch.from_numpy(values.reshape(qs.shape[0], -1)))


def decode_q4_0(raw: np.ndarray) -> QuantizedWeight:
    blocks = _blocks(raw, 18)
    scales = _f16(blocks, 0)
    tensors = {"qweight": _nibbles(blocks[..., 2:]), "scales": scales, "mins": -8.0 * scales}
    return QuantizedWeight(W4A16Config(BLOCK), raw.shape[0], blocks.shape[1] * BLOCK, tensors)


def decode_q4_1(raw: np.ndarray) -> QuantizedWeight:
    blocks = _blocks(raw, 20)
    tensors = {"qweight": _nibbles(blocks[..., 4:]), "scales": _f16(blocks, 0), "mins": _f16(blocks, 2)}
    return QuantizedWeight(W4A16Config(BLOCK), raw.shape[0], blocks.shape[1] * BLOCK, tensors)


def decode_q8_0(raw: np.ndarray) -> QuantizedWeight:
    blocks = _blocks(raw, 34)
    qweight = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)
    tensors = {"qweight": torch.from_numpy(qweight), "scales": _f16(blocks, 0)}
    return QuantizedWeight(W8A16Config(BLOCK), raw.shape[0], qweight.shape[1], tensors)


def decode_dense(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    if qtype == Q.BF16:
        bits = np.ascontiguousarray(raw).view(np.int16).reshape(shape)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(raw).view(DENSE[qtype]).reshape(shape).astype(np.float32))


def ggml_blocks(raw: np.ndarray, qtype: Q) -> QuantizedWeight:
    """The rows' bytes, copied out of the file mapping (which is released after each tensor) into
    memory torch allocates (64-byte aligned; a numpy copy starts 16 bytes past a cache line)."""
    blocks = torch.empty(raw.shape, dtype=torch.uint8)
    blocks.numpy()[...] = raw
    k = in_features(qtype.name, raw.shape[1])
    return QuantizedWeight(GGMLConfig(qtype.name), raw.shape[0], k, {"blocks": blocks})


QUANTIZED = {
    **{Q[name]: (lambda raw, qtype=Q[name]: ggml_blocks(raw, qtype)) for name in GGML_TYPES},
    # Exact in the W4A16/W8A16 layouts, whose kernels have AVX-512 and AMX paths.
    Q.Q4_0: decode_q4_0,
    Q.Q4_1: decode_q4_1,
    Q.Q8_0: decode_q8_0,
}
SUPPORTED = (Q.F32, Q.F16, Q.BF16, *QUANTIZED)


def decode_tensor(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> QuantizedWeight | torch.Tensor:
    """raw uint8 [..., row_bytes] of a tensor of `shape` -> dense fp32 tensor or QuantizedWeight."""
    if qtype in QUANTIZED:
        if len(shape) != 2:
            raise ValueError(f"quantized GGUF tensors must be 2-D, got shape {shape}")
        return QUANTIZED[qtype](raw)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return decode_dense(raw, qtype, shape)
    raise ValueError(
        f"GGUF tensor type {qtype.name} is not supported (supported: {', '.join(t.name for t in SUPPORTED)})"
    )
