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

# `make test` runs the suite in two pytest-xdist workers, one per core. Each keeps one intra-op
# thread: two workers with two threads each oversubscribe two cores, and spinning OpenMP threads
# then slow both several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# The files that take minutes, started first: `--dist loadfile` hands files to the two workers in
# collection order, and one of these left for last runs alone while the other worker idles
# (measured 2026-12-07: 164 s, 157 s, 162 s, 58 s, ...).
HEAVY_FIRST = (
    "tests/packaging/test_wheel.py",
    "tests/kernels/test_triton_sm90_compile.py",
    "tests/model/test_quantize_default_model.py",
    "tests/server/test_openai_load.py",
    "tests/model/test_parity.py",
    "tests/server/test_openai_hardening.py",
    "tests/model/test_batching.py",
    "tests/cli/test_chat_cli.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the fused CPU ops once, before any test (or server subprocess) times its startup."""
    from lowbit.kernels.cpu import extension

    extension.load()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lowbit.loaders.default_model import default_model_path

    return default_model_path()
