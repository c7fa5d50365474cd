"""GPU kernel benchmark: our Triton W4A16 / W8A8 GEMMs and the GGUF-block GEMM (triton_ggml, per
type) against torch fp16/bf16 matmul, and int8 against fp16 paged decode attention, with the memory
bandwidth measured in the same run.

Linear shapes are Llama-3-8B's (K x N): o_proj 4096x4096, gate/up 4096x14336, down 14336x4096,
qkv 4096x6144, at M = 1 ... 4096. Printed per row: time, speed-up over the dense matmul in the same
run, and for the weight-only GEMM the share of the measured bandwidth its bytes would need.
Attention: Llama-3-8B heads (32 query, 8 kv, head_dim 128), block size 16, batch 8, contexts 1k-32k.

    python benchmarks/kernels.py                     # CUDA
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # tiny shapes on CPU: the script
                                                     # runs; its times mean nothing
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from lowbit.kernels.ggml_blocks_ref import row_bytes
from lowbit.kernels.triton_decode_attention import paged_decode_attention_triton
from lowbit.kernels.triton_ggml import ggml_matmul_triton
from lowbit.kernels.triton_kv_store import kv_store_triton
from lowbit.kernels.triton_w4a16 import pack_w4a16_triton, w4a16_matmul_triton
from lowbit.kernels.triton_w8a8 import pack_w8a8_triton, w8a8_matmul_triton

LINEAR_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 6144))  # (K, N)
BATCH_SIZES = (1, 4, 16, 64, 256, 1024, 4096)
CONTEXTS = (1024, 4096, 8192, 32768)
SMOKE_LINEAR, SMOKE_BATCH, SMOKE_CONTEXTS = ((128, 96),), (1, 20, 80), (64,)
# The block types of the GGUF files people download (Q4_K_M = Q4_K + Q6_K, Q3_K_M = Q3_K + ...).
GGML_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "IQ4_XS", "Q8_0", "Q5_0")
GGML_BATCH_SIZES = (1, 16, 256, 4096)
SMOKE_GGML = ((256, 96),), ("Q4_K", "Q5_0"), (1, 20, 300)


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of `fn` (CUDA events through triton's do_bench on GPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write), the roofline for memory-bound kernels."""
    n = (1 << 30) if device.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3) / 1e9


def random_w4a16(n: int, k: int, group: int, device: torch.device) -> dict[str, torch.Tensor]:
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scales = torch.rand(n, k // group, device=device) * 0.02 + 0.001
    mins = -8 * scales
    return pack_w4a16_triton(qweight, scales, mins, group, torch.float16)


def random_w8a8(n: int, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return pack_w8a8_triton(qweight, torch.rand(n, 1, device=device) * 0.01 + 1e-4)


def linear_rows(device: torch.device, shapes, batch_sizes, bandwidth: float, group: int = 128) -> None:
    print("| K x N | M | fp16 ms | W4A16 ms | W4A16 / fp16 | W4A16 % of bandwidth | bf16 ms | W8A8 ms "
          "| W8A8 / bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n in shapes:
        w16 = torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
        wbf = w16.to(torch.bfloat16)
        w4, w8 = random_w4a16(n, k, group, device), random_w8a8(n, k, device)
        for m in batch_sizes:
            x = torch.randn(m, k, dtype=torch.float16, device=device)
            xbf = x.to(torch.bfloat16)
            fp16 = bench(partial(torch.matmul, x, w16.T), device)
            q4 = bench(partial(w4a16_matmul_triton, x, w4, group), device)
            bf16 = bench(partial(torch.matmul, xbf, wbf.T), device)
            q8 = bench(partial(w8a8_matmul_triton, xbf, w8), device)
            # Bytes the W4A16 GEMM must move at least: int4 weights, fp16 scale + min per group, x, y.
            moved = n * k / 2 + 2 * 2 * n * k / group + 2 * m * (k + n)
            share = moved / (q4 * 1e-3) / 1e9 / bandwidth
            print(f"| {k}x{n} | {m} | {fp16:.4f} | {q4:.4f} | {fp16 / q4:.2f}x | {100 * share:.0f}% "
                  f"| {bf16:.4f} | {q8:.4f} | {bf16 / q8:.2f}x |")  # fmt: skip


def ggml_rows(device: torch.device, shapes, types, batch_sizes, bandwidth: float) -> None:
    """GGUF blocks on kernels/triton_ggml.py against fp16 matmul; random bytes (values do not change
    the time), and the share of the measured bandwidth the block bytes read per call would need."""
    print("| type | K x N | M | fp16 ms | ggml ms | ggml / fp16 | % of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for k, n in shapes:
        w16 = torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
        for qtype in types:
            blocks = torch.randint(0, 256, (n, row_bytes(qtype, k)), dtype=torch.uint8, device=device)
            for m in batch_sizes:
                x = torch.randn(m, k, dtype=torch.float16, device=device)
                fp16 = bench(partial(torch.matmul, x, w16.T), device)
                ms = bench(partial(ggml_matmul_triton, x, blocks, qtype), device)
                share = (blocks.numel() + 2 * m * (k + n)) / (ms * 1e-3) / 1e9 / bandwidth
                print(f"| {qtype} | {k}x{n} | {m} | {fp16:.4f} | {ms:.4f} | {fp16 / ms:.2f}x "
                      f"| {100 * share:.0f}% |")  # fmt: skip


def decode_cache(kv_dtype: str, context: int, batch: int, kv_heads: int, head_dim: int, device):
    """A filled paged cache (block size 16) with scattered block tables, written by our KV store."""
    block = 16
    per_seq = -(-context // block)
    num_blocks = per_seq * batch
    dtype = torch.int8 if kv_dtype == "int8" else torch.float16
    k = torch.zeros(num_blocks, block, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    scales = (None, None)
    if kv_dtype == "int8":
        scales = tuple(torch.ones(num_blocks, block, kv_heads, device=device) for _ in range(2))
    tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).to(torch.int32)
    slots = (tables.long()[:, :, None] * block + torch.arange(block, device=device)).flatten()
    new = torch.randn(len(slots), kv_heads, head_dim, dtype=torch.float16, device=device)
    kv_store_triton(new, new, k, v, slots, *scales)
    return k, v, scales, tables


def time_decode(q: torch.Tensor, kv_dtype: str, context: int, lens, kv_heads: int, device) -> float:
    batch, _, head_dim = q.shape
    k, v, (ks, vs), tables = decode_cache(kv_dtype, context, batch, kv_heads, head_dim, device)
    run = partial(paged_decode_attention_triton, q, k, v, tables, lens, head_dim**-0.5, ks, vs)
    return bench(run, device)


def attention_rows(device: torch.device, contexts, batch: int = 8, heads=(32, 8), head_dim: int = 128):
    print("| context | fp16 KV ms | int8 KV ms | int8 / fp16 speed-up |")
    print("|---|---|---|---|")
    q = torch.randn(batch, heads[0], head_dim, dtype=torch.float16, device=device)
    for context in contexts:
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        times = {kv: time_decode(q, kv, context, lens, heads[1], device) for kv in ("float16", "int8")}
        print(f"| {context} | {times['float16']:.4f} | {times['int8']:.4f} | "
              f"{times['float16'] / times['int8']:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures GPU kernels: no CUDA device here (try --smoke)")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter smoke run)"
    bandwidth = copy_bandwidth(device)
    print(f"device: {name}; device-to-device copy: {bandwidth:.0f} GB/s")
    shapes, batches = (SMOKE_LINEAR, SMOKE_BATCH) if args.smoke else (LINEAR_SHAPES, BATCH_SIZES)
    group = 32 if args.smoke else 128
    linear_rows(device, shapes, batches, bandwidth, group)
    print()
    if args.smoke:
        ggml_rows(device, *SMOKE_GGML, bandwidth)
    else:
        ggml_rows(device, LINEAR_SHAPES[:3], GGML_TYPES, GGML_BATCH_SIZES, bandwidth)
    print()
    if args.smoke:
        attention_rows(device, SMOKE_CONTEXTS, batch=2, heads=(4, 2), head_dim=32)
    else:
        attention_rows(device, CONTEXTS)


if __name__ == "__main__":
    main()
