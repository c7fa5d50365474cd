"""Shared fixtures. Model-level fixtures are session-scoped: each model loads once per run."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the fused CPU ops once, before any test (or server subprocess) times its startup."""
    from lowbit.kernels import cpu_ops

    cpu_ops.load()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lowbit.default_model import default_model_path

    return default_model_path()
