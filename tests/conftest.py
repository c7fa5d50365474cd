"""Shared fixtures. Model-level fixtures are session-scoped: each model loads once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. `triton.jit` reads
# this when a kernel module is imported, so it must be set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the fused CPU ops once, before any test (or server subprocess) times its startup."""
    from lowbit.kernels.cpu import extension

    extension.load()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lowbit.loaders.default_model import default_model_path

    return default_model_path()
