"""Group-quantized int4/int8 GEMM for CPU (kernels/cpu/gemm.cpp): packing and calls.

The kernels keep a checkpoint's groups (GGUF Q4_0/Q4_1/Q8_0 blocks of 32, GPTQ/AWQ groups of 64 or
128) and compute in fp32 from any float activation dtype. Packed layout, from the canonical ones of
kernels/w4a16_matmul.py and kernels/w8a16_matmul.py (N a multiple of 16, G a multiple of 32):
  int4: q uint8 [N/16, K/8, 64]: per block of 16 rows, 64 bytes per 8 input features; byte
        int4_byte(r, f) of chunk c holds feature 8c+f of row r, f < 4 in the low nibble
        (the order AVX-512's byte unpacks turn into per-row feature pairs; see gemm.cpp)
  int8: q int8  [N/16, K, 16]
  scales, mins  [N/16, K/G, 16], fp16 when every value converts exactly (GGUF stores fp16), else fp32
References: w4a16_matmul_ref and w8a16_matmul_ref (tests/kernels/test_cpu_gemm.py).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from lowbit.kernels.cpu import extension
from lowbit.kernels.w4a16_matmul import unpack_int4

LANES = 16  # output rows per packed block


def load() -> ModuleType | None:
    """The compiled GEMMs (part of the extension kernels/cpu/extension.py builds), or None where
    unavailable."""
    return extension.load()


def supports(out_features: int, in_features: int, group_size: int) -> str | None:
    """None if the packed layout fits this weight, else why not."""
    if out_features % LANES:
        return f"out_features {out_features} not a multiple of {LANES}"
    if group_size % 32 or in_features % group_size:
        return f"group size {group_size} must be a multiple of 32 dividing in_features {in_features}"
    if load() is None:
        return "compiled CPU ops unavailable"
    return None


def _by_block(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N/16, C, 16]: the 16 rows of a block side by side for each column."""
    return t.reshape(-1, LANES, t.shape[-1]).transpose(1, 2).contiguous()


def _pack_scales(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp16 halves the bytes read per group; used only when it changes no value."""
    exact = all(torch.equal(t.float().half().float(), t.float()) for t in tensors)
    return [_by_block(t.to(torch.float16 if exact else torch.float32)) for t in tensors]


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical W4A16 (qweight uint8 [N, K/2] low nibble first, scales/mins [N, K/G])."""
    q = unpack_int4(qweight)  # uint8 [N, K]
    n, k = q.shape
    # feature 8c + 4 plane + 2h + e of row 16b + 4l + i -> byte 16l + 8h + 2i + e of chunk c
    q = q.reshape(n // LANES, 4, 4, k // 8, 2, 2, 2)  # [b, l, i, c, plane, h, e]
    q = q.permute(0, 3, 1, 5, 2, 6, 4)  # [b, c, l, h, i, e, plane]
    chunks = (q[..., 0] | (q[..., 1] << 4)).reshape(n // LANES, k // 8, 64)
    packed_scales, packed_mins = _pack_scales(scales, mins)
    return {"q": chunks.contiguous(), "scales": packed_scales, "mins": packed_mins}


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical W8A16 (qweight int8 [N, K], scales [N, K/G])."""
    (packed_scales,) = _pack_scales(scales)
    return {"q": _by_block(qweight), "scales": packed_scales}


def gather_int8_rows(packed: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical W8A16 tensors (qweight int8 [R, K], scales fp32 [R, K/G]) of the given weight rows,
    read from the packed layout: a tied embedding table can share the vocabulary projection's."""
    blocks, lanes = rows // LANES, rows % LANES
    return {"qweight": packed["q"][blocks, :, lanes], "scales": packed["scales"][blocks, :, lanes].float()}


def gemm(
    x: torch.Tensor,
    packed: dict[str, torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in out_dtype (default x's), for weights from pack_int4 (they have
    mins) or pack_int8. portable: the portable loops instead of AVX-512, and never the dense
    path (tests run every path)."""
    out_dtype = out_dtype or x.dtype
    if not portable and x.numel() >= DENSE_ROWS * x.shape[-1] and not _on_amx(x):
        return _dense_gemm(x, packed, group_size).to(out_dtype)
    ops, q, scales = load(), packed["q"], packed["scales"]
    if "mins" in packed:
        return ops.int4_gemm(x, q, scales, packed["mins"], group_size, out_dtype, portable)
    return ops.int8_gemm(x, q, scales, group_size, out_dtype, portable)


def _on_amx(x: torch.Tensor) -> bool:
    """Whether the kernel runs these rows on AMX tiles (bf16 or fp16 rows, a CPU and kernel that
    allow AMX). It does at any row count: at 512 rows of the default model's int4 projections it
    took 1.4-3.4 ms against the dense path's 1.9-6.6, and 3-9x less at 32-128 rows, without the
    dense path's dequantized weight chunks; and it keeps the weights exact."""
    return x.dtype in (torch.bfloat16, torch.float16) and _has_amx()


@cache
def _has_amx() -> bool:
    return load().has_amx()


# From this many activation rows on (prefill, long batches), dequantizing the weight and running
# torch's dense matmul is faster than the per-row kernel (without AMX). Measured on a 2-core Xeon (AMX), a
# 512x576 @ 576x3072 product: 11 ms in gemm.cpp, 1.5-2.6 ms as one bf16 matmul, 7.4 ms in fp32.
# bf16 activations use a split weight (hi + lo, two bf16 halves, summed inside one matmul): a
# bf16-rounded weight alone moved the default model's logits by up to 1.8 over a 300-token
# passage, against 0.7 with exact fp32 weights (a later run read 0.75 for it: that maximum is
# mostly rounding noise at a few positions, docs/accuracy.md; the split weight stays exact).
DENSE_ROWS = 32
# The weight is dequantized about this many bytes at a time (even chunks of 16-row blocks), which
# bounds that temporary: the default model's fused gate/up (3072 x 1152 split bf16, 6.75 MiB) takes
# two chunks; each serves every row chunk before the next is made.
DENSE_CHUNK_BYTES = 4 << 20
# Activation rows go through the matmul in chunks of two sizes: whole chunks of the large, then
# the rest in small ones, the last padded with zero rows. oneDNN JIT-compiles and caches a
# primitive per GEMM shape (~0.6 MB each; unpadded prompt lengths grew a process by ~100 MB over
# 40 lengths), so two row sizes per weight shape bound that whatever the prompt lengths. The rows
# are fed one chunk at a time, so the [x, x] input of the split weight is never whole-prompt sized.
# 256-row matmuls measured as fast as whole 512-row ones; 64-row ones ~1.5x slower per row, which
# at most three per call (plus one padded) keep small. The large chunk is halved until its input
# fits DENSE_CHUNK_INPUT_BYTES: for the default model's down projection (K = 2 x 1536 split bf16)
# that is 128 rows, where oneDNN also skips a ~2.8 MiB weight reorder it makes at 192+ rows.
DENSE_SMALL_CHUNK, DENSE_LARGE_CHUNK = 64, 256
DENSE_CHUNK_INPUT_BYTES = 1 << 20


def _row_chunks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """(start, size) of each matmul's rows; the last may reach past `rows` (zero padding)."""
    size = DENSE_LARGE_CHUNK
    while size > DENSE_SMALL_CHUNK and size * row_bytes > DENSE_CHUNK_INPUT_BYTES:
        size //= 2
    large = rows - rows % size
    chunks = [(start, size) for start in range(0, large, size)]
    return chunks + [(start, DENSE_SMALL_CHUNK) for start in range(large, rows, DENSE_SMALL_CHUNK)]


def _dense_gemm(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """x [..., K] @ dequant(W).T in x's dtype, in fixed-shape matmuls over dequantized weight chunks."""
    lead, k = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, k)
    rows = x.shape[0]
    # bf16 activations meet a split weight (hi + lo halves, [n, 2K]): rows are doubled to [x, x].
    split = x.dtype == torch.bfloat16
    width = 2 * k if split else k
    chunks = _row_chunks(rows, width * x.element_size())
    xs = x.new_empty(max(size for _, size in chunks), width)  # one row chunk's input
    blocks = packed["q"].shape[0]
    pieces = -(-blocks * LANES * xs.shape[1] * x.element_size() // DENSE_CHUNK_BYTES)
    step = -(-blocks // max(1, pieces))  # 16-row blocks per weight chunk
    out = x.new_empty(chunks[-1][0] + chunks[-1][1], blocks * LANES)  # [padded rows, N]
    ops = load()
    for start in range(0, blocks, step):
        part = {name: t[start : start + step] for name, t in packed.items()}
        w = ops.dequantize(part["q"], part["scales"], part.get("mins"), group_size, x.dtype, split)
        columns = slice(start * LANES, start * LANES + w.shape[0])
        for r, size in chunks:
            _fill_rows(xs[:size], x[r : r + size], split)
            if step >= blocks:  # the whole weight at once: each row chunk of out is contiguous
                torch.mm(xs[:size], w.t(), out=out[r : r + size])
            else:
                out[r : r + size, columns] = torch.mm(xs[:size], w.t())
        del w  # before the next chunk is made, not after: one chunk alive at a time
    return out[:rows].reshape(*lead, -1)


def _fill_rows(xs: torch.Tensor, x: torch.Tensor, split: bool) -> None:
    """xs [size, K or 2K] <- x [n <= size, K] (twice side by side if split), zero rows after n."""
    n, k = x.shape
    xs[:n, :k] = x
    if split:
        xs[:n, k:] = x
    xs[n:] = 0
