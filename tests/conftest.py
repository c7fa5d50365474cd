"""Shared fixtures. Model-level fixtures are session-scoped: each model loads once per run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lowbit.default_model import default_model_path

    return default_model_path()
