"""GGUF block types on CPU (kernels/cpu/ggml_blocks.cpp): the file's bytes are the packed weight.

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (blocks of 32) and the K-quants Q2_K..Q6_K and IQ4_XS
(super-blocks of 256) keep the layout kernels/ggml_blocks_ref.py defines, uint8 [N, row_bytes],
so a weight costs exactly its tensor bytes in the file. The blocked GEMM decodes each block once
per call for a tile of activation rows; from DENSE_ROWS rows on (DENSE_ROWS_INT8 for 16-bit
activations) the weight is instead dequantized a chunk of rows at a time and multiplied by torch's
dense fp32 matmul.

The blocked GEMM has two arithmetics (ggml_blocks.cpp). fp32 activations get fp32 products (only
the summation order differs from dequantize-then-matmul). bf16/fp16 activations, the fast mode,
are quantized to int8 per block of the weight type (32, or 256 as llama.cpp's Q8_K) and meet the
weights' small integers in integer dot products (AVX2 maddubs): several times less work per weight
than converting each weight to fp32, which is what lets decode approach memory speed.
Reference: ggml_blocks_ref.ggml_matmul_ref (tests/kernels/test_ggml_blocks.py).
"""

from __future__ import annotations

import torch

from lowbit.kernels import ggml_blocks_ref
from lowbit.kernels.cpu import extension

TYPES = ggml_blocks_ref.TYPES

# Activation rows from which the dense path takes over (see the module docstring): fp32 rows, and
# 16-bit rows, which below DENSE_ROWS_INT8 take the int8 path. Measured in the engine on the 1.7B
# shape's Q4_K_M (AMD EPYC, AVX2, 2 threads): 8 prompts of 16 tokens (128 rows) in 3.2 s on the
# int8 path against 5.4 s dense; a 512-token prompt at 24.2 / 33.2 tok/s against 22.4 / 30.8 (two
# alternating runs, within this machine's drift). Long prompts stay dense because it keeps the
# activations exact: on the int8 path the default model's 300-token fast-mode parity passage read
# mean |dlogit| 0.158 against transformers, past that test's 0.15 bound (tests/model/test_parity.py).
# Re-measured after the register kernels (same machine, 512-token prompts, dense / int8 throughout,
# two alternating runs): Q4_K_M 35.0, 33.3 / 34.3, 37.7 tok/s; Q6_K 35.7, 36.2 / 37.4, 37.1; the
# default model's Q4_0 232, 274 / 264, 265; IQ4_XS 249, 324 / 209, 263. No clear winner, so long
# prompts keep the exact activations.
DENSE_ROWS = 32
DENSE_ROWS_INT8 = 256
# Weight rows dequantized at a time on the dense path: bounds the fp32 temporary (~4 MiB at K=2048).
DENSE_CHUNK_BYTES = 4 << 20


def supports(name: str) -> str | None:
    """None if the compiled kernel runs this type, else why not."""
    if name not in TYPES:
        return f"no CPU kernel for {name}"
    if extension.load() is None:
        return "compiled CPU ops unavailable"
    return None


def type_id(name: str) -> int:
    """ggml's id of the type (gguf.GGMLQuantizationType): what the C++ kernels and the compiled
    decode layer (as -id) are told."""
    return ggml_blocks_ref.qtype(name).value


def dequantize(blocks: torch.Tensor, in_features: int, name: str) -> torch.Tensor:
    """uint8 [N, row_bytes] -> fp32 [N, K], equal to gguf-py's values."""
    return extension.load().ggml_dequantize(blocks.contiguous(), in_features, type_id(name))


def gemm(
    x: torch.Tensor,
    blocks: torch.Tensor,
    name: str,
    dense: bool | None = None,
    int8_activations: bool | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype. dense: force (True) or forbid (False) the dense path;
    by default it runs from DENSE_ROWS (16-bit x: DENSE_ROWS_INT8) rows on. int8_activations: by
    default for 16-bit x.
    portable: the plain C++ loops instead of AVX2 (tests run every path at every size)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if int8_activations is None:
        int8_activations = x.dtype != torch.float32
    if dense is None:
        dense = x2.shape[0] >= (DENSE_ROWS_INT8 if int8_activations else DENSE_ROWS)
    if dense:
        y = _dense_gemm(x2.float(), blocks, name)
    else:
        y = extension.load().ggml_gemm(x2, blocks, type_id(name), int8_activations, portable)
    return y.to(x.dtype).reshape(*lead, blocks.shape[0])


def _dense_gemm(x: torch.Tensor, blocks: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 x [M, K] @ dequantize(W).T, dequantizing the weight in row chunks."""
    n, k = blocks.shape[0], x.shape[1]
    step = max(1, DENSE_CHUNK_BYTES // (4 * k))
    out = x.new_empty(x.shape[0], n)
    for start in range(0, n, step):
        w = dequantize(blocks[start : start + step], k, name)  # fp32 [<=step, K]
        if step >= n:  # the whole weight at once: write the output in place
            torch.mm(x, w.t(), out=out)
        else:
            out[:, start : start + w.shape[0]] = torch.mm(x, w.t())
    return out


# ---------------------------------------------------------------- group-32 int4/int8 as GGUF blocks
# W4A16/W8A16 weights with groups of 32 whose scales (and mins) are fp16 values are exactly GGUF's
# Q4_0/Q4_1/Q8_0 blocks (that is where GGUF-loaded ones came from), so they can run on this GEMM.


def fp16_exact(*tensors: torch.Tensor) -> bool:
    return all(torch.equal(t.float().half().float(), t.float()) for t in tensors)


def int4_blocks(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, str] | None:
    """Canonical W4A16 g32 (qweight uint8 [N, K/2] low nibble first, scales/mins [N, K/32]) ->
    (uint8 [N, row_bytes], "Q4_0" where every min is -8 x scale, else "Q4_1"), or None where a
    scale or min is not an fp16 value."""
    if not fp16_exact(scales, mins):
        return None
    n, groups = scales.shape
    values = torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(n, groups, 2, 16)
    qs = values[:, :, 0] | (values[:, :, 1] << 4)  # GGUF: byte i = element i | element i+16 << 4
    fields = [scales.half().view(torch.uint8).reshape(n, groups, 2)]
    name = "Q4_0" if torch.equal(mins.float(), -8 * scales.float()) else "Q4_1"
    if name == "Q4_1":
        fields.append(mins.half().view(torch.uint8).reshape(n, groups, 2))
    return torch.cat([*fields, qs], dim=-1).reshape(n, -1).contiguous(), name


def int8_blocks(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """Canonical W8A16 g32 (qweight int8 [N, K], scales [N, K/32]) -> Q8_0 uint8 [N, row_bytes],
    or None where a scale is not an fp16 value."""
    if not fp16_exact(scales):
        return None
    n, groups = scales.shape
    d = scales.half().view(torch.uint8).reshape(n, groups, 2)
    return (
        torch.cat([d, qweight.view(torch.uint8).reshape(n, groups, 32)], dim=-1).reshape(n, -1).contiguous()
    )


def q8_0_rows(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q8_0 rows uint8 [R, row_bytes] -> canonical W8A16 (qweight int8 [R, K], scales fp32 [R, K/32])."""
    b = blocks.reshape(blocks.shape[0], -1, 34)
    scales = b[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    return {
        "qweight": b[..., 2:].contiguous().view(torch.int8).reshape(blocks.shape[0], -1),
        "scales": scales,
    }
