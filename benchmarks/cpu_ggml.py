"""CPU GEMM on GGUF blocks (kernels/cpu/ggml_blocks.cpp), per type, at SmolLM2-1.7B's FFN shapes.

Random bytes with sane fp16 scales (the speed of a block does not depend on its values). Printed
per type and shape: M = 1 (decode: the weight's bytes per second, against the copy bandwidth
measured in the same run; the weight is ~10 MiB, so it may sit in the last-level cache: this is
the kernel's compute rate, the engine's decode reads from memory), M = 8 (8 streams) and M = 512
(a prompt: the int8 path against dequantize + fp32 matmul), as GOP/s (2 x M x N x K / time).

    python benchmarks/cpu_ggml.py                       # every type
    python benchmarks/cpu_ggml.py --types Q4_K Q6_K --rows 1 8
    python benchmarks/cpu_ggml.py --peak                # also this core's int8 / fp32 peak rates
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES

from lowbit.kernels import ggml_blocks_ref
from lowbit.kernels.cpu import ggml

SHAPES = ((8192, 2048), (2048, 8192))  # (N, K): gate/up, down
# Byte offsets of each block's fp16 scale fields, set to a sane value in the random blocks.
SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,),
}  # fmt: skip


def random_blocks(name: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes] of random quants with every fp16 scale 0.01."""
    block, size = GGML_QUANT_SIZES[ggml_blocks_ref.qtype(name)]
    w = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=gen)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    for offset in SCALE_FIELDS[name]:
        w[:, :, offset : offset + 2] = scale
    return w.reshape(n, -1).contiguous()


def seconds(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def gemm_seconds(x: torch.Tensor, w: torch.Tensor, name: str, dense: bool) -> float:
    return seconds(lambda: ggml.gemm(x, w, name, dense=dense), 20 if x.shape[0] == 1 else 3)


def copy_bandwidth() -> float:
    a = torch.ones(1 << 28, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * a.numel() / seconds(lambda: b.copy_(a), 5) / 1e9


def peak() -> None:
    source = Path(__file__).with_name("cpu_peak.cpp")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "cpu_peak"
        subprocess.run(["g++", "-O2", "-march=native", str(source), "-o", str(exe)], check=True)
        print(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout, end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(ggml.TYPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 512])
    ap.add_argument("--peak", action="store_true")
    a = ap.parse_args()
    if a.peak:
        peak()
    gen = torch.Generator().manual_seed(0)
    print(f"copy bandwidth {copy_bandwidth():.1f} GB/s (read + write), {torch.get_num_threads()} threads")
    for name in a.types:
        for n, k in SHAPES:
            w = random_blocks(name, n, k, gen)
            for m in a.rows:
                x = torch.randn(m, k, dtype=torch.bfloat16, generator=gen)
                paths = (("int8", False), ("dense", True)) if m >= 32 else (("int8", False),)
                for label, dense in paths:
                    t = gemm_seconds(x, w, name, dense)
                    rate = f"{w.numel() / t / 1e9:6.1f} GB/s of weights" if m == 1 else ""
                    gops = 2 * m * n * k / t / 1e9
                    print(f"{name:7} {n}x{k} M={m:<4} {label:5} {t * 1e3:8.2f} ms {gops:7.1f} GOP/s {rate}")


if __name__ == "__main__":
    main()
