"""Format detection: a path -> the loader that reads it."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Checkpoint
from .gguf import load_gguf
from .gguf_file import MAGIC
from .safetensors_dir import load_safetensors_dir


def detect(path: str | os.PathLike) -> str:
    """ "gguf" or "safetensors_dir", or a ValueError saying what the path is not."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == MAGIC:
                return "gguf"
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic) and not a model directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "safetensors_dir"
        ggufs = list(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise ValueError(f"{path}: a model directory needs config.json + *.safetensors, or exactly one .gguf")
    raise ValueError(f"{path}: no such file or directory")


def load_checkpoint(path: str | os.PathLike, quantization: str | None = None) -> Checkpoint:
    kind = detect(path)
    if kind == "gguf":
        if quantization:
            raise ValueError("quantization= applies to dense checkpoints; a GGUF is already quantized")
        path = Path(path)
        return load_gguf(next(path.glob("*.gguf")) if path.is_dir() else path)
    return load_safetensors_dir(path, quantization)
