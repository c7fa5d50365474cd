"""Real GGUF block tensors for the kernel tests: every 2-D tensor of a type in the 12 presets that
llama.cpp's own quantizer wrote for a tiny Llama 3 (tests/data/gguf/llama3)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.loaders.gguf_file import read_gguf

FIXTURES = Path(__file__).parents[1] / "data" / "gguf" / "llama3"


@cache
def tensors_of(name: str) -> list[tuple[str, torch.Tensor]]:
    """(where, uint8 [N, row_bytes]) of every 2-D tensor of type `name` in the fixtures."""
    found = []
    for path in sorted(FIXTURES.glob("*.gguf")):
        gguf = read_gguf(path)
        for info in gguf.tensors.values():
            if info.qtype.name == name and len(info.shape) == 2:
                found.append(
                    (f"{path.name}:{info.name}", torch.from_numpy(gguf.tensor_bytes(info.name).copy()))
                )
    return found


def cut_cases(name: str, rows: int = 37) -> list[tuple[torch.Tensor, str]]:
    """Weights cut from the widest real tensor of a type: an odd number of rows, and inner sizes of
    one block, an odd number of blocks, and the whole row."""
    where, blocks = max(tensors_of(name), key=lambda t: t[1].shape[1])
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    n_blocks = blocks.shape[1] // type_size
    cuts = sorted({1, max(1, n_blocks // 2) | 1, n_blocks})
    return [(blocks[:rows, : c * type_size].contiguous(), f"{where} N={rows} K={c * block}") for c in cuts]
