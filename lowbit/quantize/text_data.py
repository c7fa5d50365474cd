"""Standard calibration and evaluation text, shipped by the `exllamav2` PyPI package.

Found through package metadata and never imported (importing exllamav2 builds CUDA extensions).
Install with `pip install --no-deps exllamav2==0.3.2`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "exllamav2"
SETS = ("wiki", "c4", "tiny", "code", "technical", "multilingual")


def standard_text_path(name: str) -> Path:
    if name not in SETS:
        raise ValueError(f"text set must be one of {SETS}, got {name!r}")
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"standard text needs: pip install --no-deps {DISTRIBUTION}==0.3.2") from None
    return Path(dist.locate_file(f"exllamav2/conversion/standard_cal_data/{name}.utf8"))


def standard_text(name: str) -> str:
    return standard_text_path(name).read_text(encoding="utf-8")
